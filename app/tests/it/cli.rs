//! The real `stored-messages` binary, run as a user would, against a per-test database.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use crate::common::{sqlite_url, PgSchema};

struct Cli {
    url: String,
    dir: tempfile::TempDir,
}

impl Cli {
    fn sqlite() -> Cli {
        let dir = tempfile::tempdir().unwrap();
        Cli {
            url: sqlite_url(&dir),
            dir,
        }
    }

    /// Runs the binary in an empty directory (no Rocket.toml) with this test's database.
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_stored-messages"))
            .args(args)
            .current_dir(self.dir.path())
            .env(
                "ROCKET_DATABASES",
                format!("{{stored_messages={{url=\"{}\"}}}}", self.url),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            let mut input = child.stdin.take().unwrap();
            if let Some(text) = stdin {
                input.write_all(text.as_bytes()).unwrap();
            }
        }
        child.wait_with_output().unwrap()
    }

    fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(args, stdin);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail; returns its one error line.
    fn fails(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(args, stdin);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "one clear line: {err}");
        err
    }
}

fn send_and_read_back(cli: &Cli) {
    let out = cli.ok(&["createuser", "alice"], Some("secret-password\n"));
    assert!(out.contains("created user alice"), "{out}");
    cli.ok(&["createuser", "bob", "--admin"], Some("secret-password\n"));
    let out = cli.ok(&["send", "--to", "alice", "hello ❤"], None);
    assert!(out.starts_with("sent message "), "{out}");
    let out = cli.ok(
        &[
            "send",
            "--to",
            "alice,bob",
            "--level",
            "stored_warning",
            "--tags",
            "ops",
            "--url",
            "/status",
            "disk full",
        ],
        None,
    );
    assert!(out.contains("to 2 users: alice, bob"), "{out}");
    let out = cli.ok(&["send", "--to", "alice,ALICE, Alice", "once"], None);
    assert!(
        out.contains("to 1 user: alice"),
        "each user once, in its own spelling: {out}"
    );
    let out = cli.ok(&["inbox", "alice"], None);
    assert!(out.contains("3 unread messages for alice"), "{out}");
    assert!(out.contains("[stored info] hello ❤"), "{out}");
    assert!(out.contains("[stored warning] disk full"), "{out}");
    let out = cli.ok(&["broadcast", "everyone"], None);
    assert!(out.contains("to 2 users"), "{out}");
    let out = cli.ok(&["endsessions", "alice"], None);
    assert!(out.contains("ended 0 sessions of alice"), "{out}");
    let out = cli.ok(&["passwd", "alice"], Some("a-new-secret-9\n"));
    assert!(
        out.contains("password of alice changed; 0 sessions ended"),
        "{out}"
    );
    let err = cli.fails(&["passwd", "alice"], Some("password\n"));
    assert!(err.contains("too easy to guess"), "{err}");
    let out = cli.ok(&["cleanup"], None);
    assert!(
        out.contains("cleanup removed 0 expired inbox entries and 0 expired messages"),
        "{out}"
    );
}

#[test]
fn createuser_send_and_inbox_on_sqlite() {
    let cli = Cli::sqlite();
    let out = cli.ok(&["migrate"], None);
    assert!(out.contains("migrations applied (sqlite backend)"), "{out}");
    send_and_read_back(&cli);
    // Sends and broadcasts from the command line are in the admin audit.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let entries = rt.block_on(async {
        let figment = crate::common::test_figment(&cli.url);
        let users =
            std::sync::Arc::new(stored_messages_app::connect_users(&figment).await.unwrap());
        stored_messages_app::jobs::Jobs::new(users)
            .audit_list(10)
            .await
            .unwrap()
    });
    assert_eq!(entries.len(), 4, "three sends and a broadcast");
    assert!(entries.iter().all(|e| e.actor == "command line"));
    assert_eq!(
        (entries[0].audience.as_str(), entries[0].audience_size),
        ("everyone", 2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn createuser_send_and_inbox_on_postgres() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli {
        url: schema.url.clone(),
        dir,
    };
    tokio::task::spawn_blocking(move || {
        let out = cli.ok(&["migrate"], None);
        assert!(out.contains("postgres backend"), "{out}");
        send_and_read_back(&cli);
    })
    .await
    .unwrap();
    drop(schema);
}

#[test]
fn bad_input_fails_with_one_clear_line() {
    let cli = Cli::sqlite();
    cli.ok(&["createuser", "alice"], Some("secret-password\n"));
    let cases: &[(&[&str], Option<&str>, &str)] = &[
        (
            &["send", "--to", "alice,nobody,ghost", "x"],
            None,
            "unknown users: nobody, ghost",
        ),
        (
            &["send", "--to", "alice", "--level", "urgent", "x"],
            None,
            "unknown level \"urgent\"",
        ),
        (
            &["send", "--to", "alice", "--level", "info", "x"],
            None,
            "is not a store level",
        ),
        (
            &["send", "--to", "alice", "--url", "javascript:alert(1)", "x"],
            None,
            "invalid url",
        ),
        (
            &["send", "--to", "alice", "  "],
            None,
            "message text is empty",
        ),
        (
            &["send", "--to", "", "x"],
            None,
            "give at least one username",
        ),
        (
            &["send", "--to", " , ", "x"],
            None,
            "give at least one username",
        ),
        (
            &["send", "--to", "alice", "\u{1b}]0;pwned\u{7}"],
            None,
            "control characters",
        ),
        (
            &["createuser", "alice"],
            Some("secret-password\n"),
            "user \"alice\" already exists",
        ),
        (
            &["createuser", "bad name"],
            Some("secret-password\n"),
            "invalid username",
        ),
        (
            &["createuser", "carol"],
            Some("short\n"),
            "password is too short",
        ),
        (
            &["createuser", "carol"],
            Some(""),
            "no password on standard input",
        ),
        (&["inbox", "nobody"], None, "unknown user \"nobody\""),
        // One spelling per name: case folds, look-alike letters are refused.
        (
            &["createuser", "Alice"],
            Some("secret-password\n"),
            "user \"alice\" already exists",
        ),
        (
            &["createuser", "\u{430}lice"],
            Some("secret-password\n"),
            "invalid username",
        ),
        (
            &["createuser", "\u{ff41}\u{ff4c}\u{ff49}\u{ff43}\u{ff45}"],
            Some("secret-password\n"),
            "invalid username",
        ),
        (
            &["createuser", "carol"],
            Some("password\n"),
            "too easy to guess",
        ),
        (
            &["createuser", "carol"],
            Some("        \n"),
            "too easy to guess",
        ),
        (&["createuser", "carol"], Some("carol\n"), "too short"),
        // A refused value is quoted with its control characters escaped: an escape
        // sequence in it does not reach the terminal (checked for every case below).
        (
            &["send", "--to", "ali\u{1b}ce", "x"],
            None,
            "unknown user: ali\\u{1b}ce",
        ),
        (
            &["send", "--to", "alice", "--url", "http://x/\u{1b}[2J", "x"],
            None,
            "invalid url \"http://x/\\u{1b}[2J\"",
        ),
        (
            &["createuser", "ev\u{1b}[31mil"],
            Some("secret-password\n"),
            "invalid username \"ev\\u{1b}[31mil\"",
        ),
        (
            &["send", "--to", "alice", "--level", "\u{7}", "x"],
            None,
            "unknown level \"\\u{7}\"",
        ),
        (&["inbox", "x\u{9b}y"], None, "unknown user \"x\\u{9b}y\""),
    ];
    for (args, stdin, expected) in cases {
        let err = cli.fails(args, *stdin);
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(
            !err.chars().any(|c| c.is_control() && c != '\n'),
            "{args:?}: {err:?}"
        );
    }
    let long = format!("{}\n", "x1".repeat(513));
    let err = cli.fails(&["createuser", "carol"], Some(&long));
    assert!(err.contains("too long"), "{err}");
    // The name logs in however it is cased.
    let out = cli.ok(&["inbox", "ALICE"], None);
    assert!(
        out.contains("for ALICE") || out.contains("for alice"),
        "{out}"
    );
    // Nothing was sent by the failed commands.
    let out = cli.ok(&["inbox", "alice"], None);
    assert!(out.contains("0 unread messages"), "{out}");
}

#[test]
fn unreachable_database_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli {
        url: "postgres://postgres@127.0.0.1:1/none?connect_timeout=1".to_string(),
        dir,
    };
    let err = cli.fails(&["migrate"], None);
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("127.0.0.1:1"), "names the database: {err}");
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli {
        url: "mysql://localhost/x".to_string(),
        dir,
    };
    assert!(cli
        .fails(&["migrate"], None)
        .contains("unsupported database url"));
}

#[test]
fn every_command_has_help() {
    let cli = Cli::sqlite();
    for command in [
        "serve",
        "migrate",
        "createuser",
        "send",
        "broadcast",
        "inbox",
        "cleanup",
    ] {
        let out = cli.ok(&[command, "--help"], None);
        assert!(out.contains("Usage: stored-messages"), "{command}: {out}");
    }
}
