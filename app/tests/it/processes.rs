//! The consistency guarantee, tested with real processes: a write that has returned in any
//! process (the CLI, another app server) is seen by the next request of every server
//! sharing the store, on SQLite, PostgreSQL and Redis, including while a server's change
//! feed loses its connection. Zero stale answers are allowed.
//!
//! Each round first reads through the server under test, so that its inbox cache holds the
//! user's entry; then another process writes; then the server is asked again at once. A
//! cache that trusted its entry without hearing of the write would answer the old inbox.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{random_id, redis_connection, sqlite_url, PgSchema, RedisPrefix};

/// Where the processes keep their data: one store, shared by every process of a test.
enum Backend {
    Sqlite,
    Postgres(PgSchema),
    Redis(RedisPrefix),
}

/// One store for a test's processes: its configuration as `ROCKET_*` variables.
struct Shared {
    backend: Backend,
    dir: tempfile::TempDir,
    secret_key: String,
    /// The servers serve live streams with the stream listener (`stream_address`).
    stream_listener: bool,
}

impl Shared {
    async fn sqlite() -> Option<Shared> {
        Some(Shared::new(Backend::Sqlite))
    }

    async fn postgres() -> Option<Shared> {
        Some(Shared::new(Backend::Postgres(PgSchema::create().await?)))
    }

    async fn redis() -> Option<Shared> {
        Some(Shared::new(Backend::Redis(RedisPrefix::create()?)))
    }

    async fn sqlite_listener() -> Option<Shared> {
        Some(Shared::sqlite().await?.with_stream_listener())
    }

    async fn postgres_listener() -> Option<Shared> {
        Some(Shared::postgres().await?.with_stream_listener())
    }

    async fn redis_listener() -> Option<Shared> {
        Some(Shared::redis().await?.with_stream_listener())
    }

    fn new(backend: Backend) -> Shared {
        let mut key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut key);
        Shared {
            backend,
            dir: tempfile::tempdir().unwrap(),
            secret_key: base64::engine::general_purpose::STANDARD.encode(key),
            stream_listener: false,
        }
    }

    /// The same store, its servers serving live streams with the stream listener.
    fn with_stream_listener(mut self) -> Shared {
        self.stream_listener = true;
        self
    }

    /// The environment of a process named `name` (PostgreSQL connections carry it as their
    /// `application_name`, so a test can find a server's change feed).
    fn env(&self, name: &str) -> Vec<(&'static str, String)> {
        let (database, stored) = match &self.backend {
            Backend::Sqlite => (sqlite_url(&self.dir), String::new()),
            Backend::Postgres(schema) => (
                format!("{}&application_name={name}", schema.url),
                String::new(),
            ),
            Backend::Redis(prefix) => (
                sqlite_url(&self.dir),
                format!(
                    "backend=\"redis\",redis_url=\"{}\",redis_key_prefix=\"{}\",",
                    prefix.url, prefix.prefix
                ),
            ),
        };
        let listener = if self.stream_listener {
            "stream_address=\"127.0.0.1:0\","
        } else {
            ""
        };
        vec![
            (
                "ROCKET_DATABASES",
                format!("{{stored_messages={{url=\"{database}\"}}}}"),
            ),
            (
                "ROCKET_STORED_MESSAGES",
                format!("{{{stored}{listener}cleanup_interval_secs=0}}"),
            ),
            ("ROCKET_SECRET_KEY", self.secret_key.clone()),
            ("ROCKET_LOG_LEVEL", "critical".into()),
            (
                "ROCKET_TEMPLATE_DIR",
                concat!(env!("CARGO_MANIFEST_DIR"), "/templates").into(),
            ),
        ]
    }

    fn command(&self, name: &str) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_stored-messages"));
        command.current_dir(self.dir.path()).envs(self.env(name));
        command
    }

    /// Runs a CLI command to completion; panics with its error output when it fails.
    fn cli(&self, args: &[&str], stdin: &str) -> String {
        use std::io::Write;
        let mut child = self
            .command("cli")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Starts `stored-messages serve` and waits until it answers.
    async fn serve(&self, name: &str) -> Server {
        let mut server = self.start(name, None);
        server.wait_ready().await;
        server
    }

    /// Starts `stored-messages serve` without waiting; with `log`, its output goes there at
    /// Rocket's normal log level (errors included).
    fn start(&self, name: &str, log: Option<&std::path::Path>) -> Server {
        self.start_with(name, log, &[])
    }

    /// [`Shared::start`] with more `ROCKET_*` variables.
    fn start_with(
        &self,
        name: &str,
        log: Option<&std::path::Path>,
        extra: &[(&str, &str)],
    ) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut command = self.command(name);
        command
            .arg("serve")
            .env("ROCKET_ADDRESS", "127.0.0.1")
            .env("ROCKET_PORT", port.to_string())
            .envs(extra.iter().copied())
            .stdin(Stdio::null());
        match log {
            Some(path) => {
                let file = std::fs::File::create(path).unwrap();
                command
                    .env("ROCKET_LOG_LEVEL", "normal")
                    .env("ROCKET_CLI_COLORS", "false")
                    .stdout(file.try_clone().unwrap())
                    .stderr(file);
            }
            None => {
                command.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        Server {
            name: name.to_string(),
            address: format!("127.0.0.1:{port}"),
            child: command.spawn().unwrap(),
        }
    }
}

impl Server {
    async fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            if let Ok(answer) = get(&self.address, "/health", "").await {
                if answer.status == 200 {
                    return;
                }
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("server {} exited at start: {status}", self.name);
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "server {} did not answer",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A running `stored-messages serve`, killed when dropped.
struct Server {
    name: String,
    address: String,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP answer.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }
}

/// One HTTP/1.1 exchange on a fresh connection.
async fn exchange(address: &str, request: String) -> std::io::Result<Answer> {
    let mut stream = TcpStream::connect(address).await?;
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok(Answer {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || after.len() < size {
            break;
        }
        body.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    body
}

async fn get(address: &str, path: &str, cookie: &str) -> std::io::Result<Answer> {
    exchange(
        address,
        format!(
            "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\
             Accept: application/json\r\nCookie: {cookie}\r\n\r\n"
        ),
    )
    .await
}

/// A logged-in browser: its cookies (valid on every server, which share the secret key)
/// and CSRF token.
struct Browser {
    cookie: String,
    token: String,
}

impl Browser {
    /// Logs `username` in through `server`.
    async fn login(server: &Server, username: &str, password: &str) -> Browser {
        let page = get(&server.address, "/login", "").await.unwrap();
        let mut jar = Vec::new();
        keep_cookies(&mut jar, &page);
        let token = csrf_token(&page.body);
        let form = format!("csrf_token={token}&username={username}&password={password}");
        let answer = post(&server.address, "/login", &cookies(&jar), &form)
            .await
            .unwrap();
        assert_eq!(answer.status, 303, "login: {}", answer.body);
        keep_cookies(&mut jar, &answer);
        let mut browser = Browser {
            cookie: cookies(&jar),
            token: String::new(),
        };
        // The token may change at login: take the one the logged-in pages carry.
        let home = get(&server.address, "/", &browser.cookie).await.unwrap();
        keep_cookies(&mut jar, &home);
        browser.cookie = cookies(&jar);
        browser.token = csrf_token(&home.body);
        browser
    }

    async fn inbox(&self, server: &Server) -> Vec<String> {
        let answer = get(&server.address, "/messages/inbox", &self.cookie)
            .await
            .unwrap();
        assert_eq!(answer.status, 200, "{}: {}", server.name, answer.body);
        answer.json()["messages"]
            .as_array()
            .expect("a page of messages")
            .iter()
            .map(|m| m["message"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    async fn count(&self, server: &Server) -> u64 {
        let answer = get(&server.address, "/messages/count", &self.cookie)
            .await
            .unwrap();
        assert_eq!(answer.status, 200, "{}: {}", server.name, answer.body);
        answer.json()["unread"].as_u64().expect("a count")
    }

    /// Adds a stored message through the demo form (the `Messages` guard).
    async fn add(&self, server: &Server, text: &str) {
        let form = format!(
            "csrf_token={}&level=stored_info&message={}",
            self.token,
            text.replace(' ', "+")
        );
        let answer = post(&server.address, "/demo/message", &self.cookie, &form)
            .await
            .unwrap();
        assert_eq!(answer.status, 303, "{}: {}", server.name, answer.body);
    }

    async fn mark_all_read(&self, server: &Server) -> u64 {
        let answer = exchange(
            &server.address,
            format!(
                "POST /messages/mark_all_read HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
                 Cookie: {}\r\nX-CSRF-Token: {}\r\nContent-Length: 0\r\n\r\n",
                server.address, self.cookie, self.token
            ),
        )
        .await
        .unwrap();
        assert_eq!(answer.status, 200, "{}: {}", server.name, answer.body);
        answer.json()["marked"].as_u64().expect("a count")
    }
}

async fn processes_post(address: &str, path: &str, cookie: &str, form: &str) -> Answer {
    post(address, path, cookie, form).await.unwrap()
}

async fn post(address: &str, path: &str, cookie: &str, form: &str) -> std::io::Result<Answer> {
    exchange(
        address,
        format!(
            "POST {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
             Cookie: {cookie}\r\n\r\n{form}",
            form.len()
        ),
    )
    .await
}

fn keep_cookies(jar: &mut Vec<(String, String)>, answer: &Answer) {
    for (name, value) in &answer.headers {
        if name != "set-cookie" {
            continue;
        }
        let pair = value.split(';').next().unwrap_or_default();
        if let Some((k, v)) = pair.split_once('=') {
            jar.retain(|(name, _)| name != k);
            if !v.is_empty() {
                jar.push((k.to_string(), v.to_string()));
            }
        }
    }
}

fn cookies(jar: &[(String, String)]) -> String {
    jar.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn csrf_token(html: &str) -> String {
    html.split("name=\"csrf_token\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a CSRF token in the page")
        .to_string()
}

/// How a test cuts a server's change feed off (PostgreSQL and Redis).
impl Shared {
    /// Kills the change feed connection of the server `name`, and returns whether there was
    /// one to kill.
    async fn kill_feed(&self, name: &str) -> bool {
        match &self.backend {
            Backend::Sqlite => false,
            Backend::Postgres(_) => {
                let pool = sqlx::PgPool::connect(&crate::common::postgres_url())
                    .await
                    .unwrap();
                let killed: Vec<bool> = sqlx::query_scalar(
                    "select pg_terminate_backend(pid) from pg_stat_activity \
                     where application_name = $1",
                )
                .bind(format!("{name} (change feed)"))
                .fetch_all(&pool)
                .await
                .unwrap();
                pool.close().await;
                killed.iter().any(|k| *k)
            }
            Backend::Redis(prefix) => {
                // Every subscriber on the server goes, as the issue asks: other tests'
                // feeds reconnect by themselves, which is what this test checks too.
                let mut connection = redis_connection(&prefix.url).unwrap();
                let killed: i64 = ::redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("TYPE")
                    .arg("pubsub")
                    .query(&mut connection)
                    .unwrap();
                killed > 0
            }
        }
    }

    /// Whether `servers` change feeds are connected (PostgreSQL: two connections per server;
    /// Redis: a subscriber per server on this test's change channel).
    async fn feeds_connected(&self, servers: &[&Server]) -> bool {
        match &self.backend {
            Backend::Sqlite => true,
            Backend::Postgres(_) => {
                let pool = sqlx::PgPool::connect(&crate::common::postgres_url())
                    .await
                    .unwrap();
                let names: Vec<String> = servers
                    .iter()
                    .map(|s| format!("{} (change feed)", s.name))
                    .collect();
                let listening: i64 = sqlx::query_scalar(
                    "select count(*) from pg_stat_activity where application_name = any($1)",
                )
                .bind(&names)
                .fetch_one(&pool)
                .await
                .unwrap();
                pool.close().await;
                // each feed holds two connections: the listener and the sync connection
                listening == 2 * servers.len() as i64
            }
            Backend::Redis(prefix) => {
                let mut connection = redis_connection(&prefix.url).unwrap();
                let (_, subscribers): (String, i64) = ::redis::cmd("PUBSUB")
                    .arg("NUMSUB")
                    .arg(format!("{}changes", prefix.prefix))
                    .query(&mut connection)
                    .unwrap();
                subscribers == servers.len() as i64
            }
        }
    }

    /// Waits until the feeds of `servers` are connected (they reconnect by themselves).
    async fn wait_feeds(&self, servers: &[&Server]) {
        let started = Instant::now();
        while !self.feeds_connected(servers).await {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the change feeds did not connect"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Stamps out one test per behaviour and backend.
macro_rules! process_tests {
    ($($name:ident),* $(,)?) => {
        process_tests!(@backend sqlite, $($name),*);
        process_tests!(@backend postgres, $($name),*);
        process_tests!(@backend redis, $($name),*);
    };
    (@backend $backend:ident, $($name:ident),*) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(shared) = super::Shared::$backend().await {
                        super::$name(&shared).await;
                    }
                }
            )*
        }
    };
}

mod live;

process_tests!(
    any_request_may_go_to_any_instance,
    four_instances_start_together_on_a_fresh_store,
    a_broadcast_whose_instance_is_killed_is_finished_by_another,
    a_cli_send_is_seen_by_the_next_request,
    a_write_through_one_server_is_seen_by_the_next_request_to_another,
    writes_are_seen_by_a_server_kept_busy,
    writes_stay_visible_while_the_change_feed_is_killed,
    periodic_cleanup_runs_on_one_instance_per_interval,
    an_ended_session_is_refused_by_the_next_request_everywhere,
);

const PASSWORD: &str = "correct-horse-battery";

async fn a_cli_send_is_seen_by_the_next_request(shared: &Shared) {
    // arrange
    shared.cli(&["createuser", "alice"], &format!("{PASSWORD}\n"));
    let server = shared.serve(&format!("sm_a_{}", random_id())).await;
    let alice = Browser::login(&server, "alice", PASSWORD).await;
    shared.wait_feeds(&[&server]).await;
    for round in 0..200 {
        // the server has alice's inbox cached
        assert_eq!(
            alice.inbox(&server).await,
            Vec::<String>::new(),
            "round {round}"
        );
        // act: another process writes, and returns
        let text = format!("round {round}");
        let out = shared.cli(&["send", "--to", "alice", &text], "");
        assert!(out.starts_with("sent message "), "{out}");
        // assert: the very next request sees it
        assert_eq!(alice.inbox(&server).await, [text], "round {round}");
        assert_eq!(alice.mark_all_read(&server).await, 1, "round {round}");
    }
}

/// `rounds` of: a write through `writer`, then at once a read through `reader` (which had
/// the inbox cached); then mark-all-read through `writer`, then at once a count through
/// `reader`. With `kill`, the reader's change feed connection is killed every tenth round,
/// just before the write; returns how many kills hit a connection.
async fn write_here_read_there(
    alice: &Browser,
    writer: &Server,
    reader: &Server,
    rounds: usize,
    kill: Option<&Shared>,
) -> usize {
    let mut kills = 0;
    for round in 0..rounds {
        assert_eq!(
            alice.inbox(reader).await,
            Vec::<String>::new(),
            "round {round}"
        );
        if let Some(shared) = kill.filter(|_| round % 10 == 5) {
            if shared.kill_feed(&reader.name).await {
                kills += 1;
            }
        }
        let text = format!("round {round}");
        alice.add(writer, &text).await;
        assert_eq!(
            alice.inbox(reader).await,
            [text],
            "round {round}: stale read"
        );
        assert_eq!(alice.count(reader).await, 1, "round {round}");
        assert_eq!(alice.mark_all_read(writer).await, 1, "round {round}");
        assert_eq!(alice.count(reader).await, 0, "round {round}: stale count");
    }
    kills
}

async fn a_write_through_one_server_is_seen_by_the_next_request_to_another(shared: &Shared) {
    shared.cli(&["createuser", "alice"], &format!("{PASSWORD}\n"));
    let one = shared.serve(&format!("sm_one_{}", random_id())).await;
    let two = shared.serve(&format!("sm_two_{}", random_id())).await;
    let alice = Browser::login(&one, "alice", PASSWORD).await;
    shared.wait_feeds(&[&one, &two]).await;
    write_here_read_there(&alice, &one, &two, 100, None).await;
    write_here_read_there(&alice, &two, &one, 100, None).await;
}

/// Under load a server trusts a sync that began moments ago instead of waiting for its own
/// (PostgreSQL and Redis writers wait for that: see `stored_messages::changes`). Another
/// user's reads keep the reader busy, so its syncs are always recent, while writes through
/// the other server and the CLI are read back at once.
async fn writes_are_seen_by_a_server_kept_busy(shared: &Shared) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    shared.cli(&["createuser", "alice"], &format!("{PASSWORD}\n"));
    shared.cli(&["createuser", "bob"], &format!("{PASSWORD}\n"));
    let one = shared.serve(&format!("sm_one_{}", random_id())).await;
    let two = shared.serve(&format!("sm_two_{}", random_id())).await;
    let alice = Browser::login(&one, "alice", PASSWORD).await;
    let bob = Browser::login(&two, "bob", PASSWORD).await;
    shared.wait_feeds(&[&one, &two]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let busy: Vec<_> = (0..4)
        .map(|_| {
            let (stop, reads) = (Arc::clone(&stop), Arc::clone(&reads));
            let (address, cookie) = (two.address.clone(), bob.cookie.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let answer = get(&address, "/messages/inbox", &cookie).await.unwrap();
                    assert_eq!(answer.status, 200, "{}", answer.body);
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    write_here_read_there(&alice, &one, &two, 100, None).await;
    for round in 0..20 {
        let text = format!("sent {round}");
        let out = shared.cli(&["send", "--to", "alice", &text], "");
        assert!(out.starts_with("sent message "), "{out}");
        assert_eq!(alice.inbox(&two).await, [text], "round {round}: stale read");
        assert_eq!(alice.mark_all_read(&one).await, 1, "round {round}");
        assert_eq!(alice.count(&two).await, 0, "round {round}: stale count");
    }
    stop.store(true, Ordering::Relaxed);
    for task in busy {
        task.await.unwrap();
    }
    // the reader was busy all along: bob read more often than alice
    let reads = reads.load(Ordering::Relaxed);
    assert!(reads > 240, "only {reads} reads kept the reader busy");
}

async fn writes_stay_visible_while_the_change_feed_is_killed(shared: &Shared) {
    if matches!(shared.backend, Backend::Sqlite) {
        // SQLite's feed reads a file: there is no connection to kill.
        return;
    }
    shared.cli(&["createuser", "alice"], &format!("{PASSWORD}\n"));
    let one = shared.serve(&format!("sm_one_{}", random_id())).await;
    let two = shared.serve(&format!("sm_two_{}", random_id())).await;
    let alice = Browser::login(&one, "alice", PASSWORD).await;
    shared.wait_feeds(&[&one, &two]).await;
    let kills = write_here_read_there(&alice, &one, &two, 100, Some(shared)).await;
    assert!(kills >= 5, "the feed was killed {kills} times");
    // and the feeds came back by themselves
    shared.wait_feeds(&[&one, &two]).await;
    write_here_read_there(&alice, &one, &two, 10, None).await;
}

/// Servers keep sessions in memory; a session ended anywhere (logout through another
/// server, `stored-messages endsessions`, a password change) is refused by the very next
/// request to any server, also while a server's change feed connection is being killed.
async fn an_ended_session_is_refused_by_the_next_request_everywhere(shared: &Shared) {
    shared.cli(&["createuser", "alice"], &format!("{PASSWORD}\n"));
    let one = shared.serve(&format!("sm_one_{}", random_id())).await;
    let two = shared.serve(&format!("sm_two_{}", random_id())).await;
    shared.wait_feeds(&[&one, &two]).await;
    let mut kills = 0;
    for round in 0..24 {
        // arrange: a session both servers have answered (and so keep)
        let alice = Browser::login(&one, "alice", PASSWORD).await;
        let other = Browser::login(&two, "alice", PASSWORD).await;
        for server in [&one, &two] {
            assert_eq!(alice.count(server).await, 0, "round {round}");
            assert_eq!(other.count(server).await, 0, "round {round}");
        }
        if round % 4 == 3 && shared.kill_feed(&two.name).await {
            kills += 1;
        }
        // act: end it elsewhere, and return
        match round % 3 {
            0 => {
                let form = format!("csrf_token={}", alice.token);
                let answer = post(&one.address, "/logout", &alice.cookie, &form)
                    .await
                    .unwrap();
                assert_eq!(answer.status, 303, "logout: {}", answer.body);
            }
            1 => {
                let out = shared.cli(&["endsessions", "alice"], "");
                assert!(out.starts_with("ended 2 sessions"), "{out}");
            }
            _ => {
                let out = shared.cli(&["passwd", "alice"], &format!("{PASSWORD}\n"));
                assert!(out.contains("2 sessions ended"), "{out}");
            }
        }
        // assert: the very next request, to either server, is anonymous
        let ended: &[&Browser] = if round % 3 == 0 {
            &[&alice]
        } else {
            &[&alice, &other]
        };
        for server in [&two, &one] {
            for browser in ended {
                let answer = get(&server.address, "/messages/count", &browser.cookie)
                    .await
                    .unwrap();
                assert_eq!(
                    answer.status, 401,
                    "round {round}, {}: stale session",
                    server.name
                );
            }
        }
        // the logout ended only its own session
        if round % 3 == 0 {
            assert_eq!(other.count(&two).await, 0, "round {round}");
            let answer = post(
                &two.address,
                "/logout",
                &other.cookie,
                &format!("csrf_token={}", other.token),
            )
            .await
            .unwrap();
            assert_eq!(answer.status, 303, "logout: {}", answer.body);
            let answer = get(&one.address, "/messages/count", &other.cookie)
                .await
                .unwrap();
            assert_eq!(answer.status, 401, "round {round}: stale session");
        }
    }
    if !matches!(shared.backend, Backend::Sqlite) {
        assert!(kills >= 3, "the feed was killed {kills} times");
    }
}

/// Four instances started at once on a fresh store: migrations applied once, the first
/// admin created by exactly one of them (one login banner), no error logged anywhere, and
/// every one of them ready.
async fn four_instances_start_together_on_a_fresh_store(shared: &Shared) {
    let logs: Vec<std::path::PathBuf> = (0..4)
        .map(|i| shared.dir.path().join(format!("instance-{i}.log")))
        .collect();
    let _keep = KeepLogs(logs.clone());
    let mut servers: Vec<Server> = logs
        .iter()
        .enumerate()
        .map(|(i, log)| shared.start(&format!("sm_four_{i}_{}", random_id()), Some(log)))
        .collect();
    for server in &mut servers {
        server.wait_ready().await;
        let ready = get(&server.address, "/health/ready", "").await.unwrap();
        assert_eq!(ready.status, 200, "{}: {}", server.name, ready.body);
    }
    // The liftoff work (first admin) runs right after the servers answer.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut banners = 0;
    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap();
        banners += text.matches("first start, no users yet").count();
        // (Rocket's launch report lists the catchers, `html_error` among them.)
        for line in text.lines().filter(|l| !l.contains(">>")) {
            let lower = line.to_ascii_lowercase();
            assert!(
                !lower.contains("error")
                    && !lower.contains("failed")
                    && !lower.contains("panicked"),
                "{}: {line}",
                log.display()
            );
        }
    }
    assert_eq!(banners, 1, "one instance created the first admin");
    // One admin account.
    let sql = "select cast(count(*) as bigint) from app_users where is_admin";
    let admins: i64 = match &shared.backend {
        Backend::Postgres(schema) => {
            use sqlx::Connection;
            let mut db = sqlx::PgConnection::connect(&schema.url).await.unwrap();
            sqlx::query_scalar(sql).fetch_one(&mut db).await.unwrap()
        }
        _ => {
            use sqlx::Connection;
            let mut db = sqlx::SqliteConnection::connect(&sqlite_url(&shared.dir))
                .await
                .unwrap();
            sqlx::query_scalar(sql).fetch_one(&mut db).await.unwrap()
        }
    };
    assert_eq!(admins, 1);
}

/// Prints the logs of a failed test.
struct KeepLogs(Vec<std::path::PathBuf>);

impl Drop for KeepLogs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in &self.0 {
                eprintln!(
                    "--- {}\n{}",
                    log.display(),
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
        }
    }
}

/// The figment of a process of `shared` (what its `ROCKET_*` variables say), for a store in
/// the test itself.
fn figment_of(shared: &Shared) -> rocket::figment::Figment {
    let figment = rocket::Config::figment()
        .merge(("stored_messages.cleanup_interval_secs", 0))
        .merge(("stored_messages.inbox_cache_messages", 0));
    match &shared.backend {
        Backend::Sqlite => {
            figment.merge(("databases.stored_messages.url", sqlite_url(&shared.dir)))
        }
        Backend::Postgres(schema) => {
            figment.merge(("databases.stored_messages.url", schema.url.clone()))
        }
        Backend::Redis(prefix) => figment
            .merge(("databases.stored_messages.url", sqlite_url(&shared.dir)))
            .merge(("stored_messages.backend", "redis"))
            .merge(("stored_messages.redis_url", prefix.url.clone()))
            .merge(("stored_messages.redis_key_prefix", prefix.prefix.clone())),
    }
}

/// Several instances, one job: an admin broadcasts to 50,000 users through one instance,
/// which is killed (`SIGKILL`) while its background job runs; another instance takes the job
/// over once the lease expired and finishes it; every user has the message exactly once.
async fn a_broadcast_whose_instance_is_killed_is_finished_by_another(shared: &Shared) {
    const USERS: i64 = 50_000;
    shared.cli(&["createuser", "root", "--admin"], &format!("{PASSWORD}\n"));
    let figment = figment_of(shared);
    let users = std::sync::Arc::new(stored_messages_app::connect_users(&figment).await.unwrap());
    // The audience, inserted in one statement (the same in both dialects).
    let sql = format!(
        "with recursive n(i) as (select 1 union all select i + 1 from n where i < {USERS}) \
         insert into app_users (username, password_hash, is_admin, created_us) \
         select 'bulk' || i, 'x', false, 0 from n"
    );
    match users.pool() {
        stored_messages::SqlPool::Sqlite(pool) => {
            sqlx::query(&sql).execute(pool).await.unwrap();
        }
        stored_messages::SqlPool::Postgres(pool) => {
            sqlx::query(&sql).execute(pool).await.unwrap();
        }
    }
    // The doomed instance goes at a gentle pace (2,000 users, then a pause), so that it
    // can be killed midway.
    let mut doomed = shared.start_with(
        &format!("sm_doomed_{}", random_id()),
        None,
        &[(
            "ROCKET_ADMIN",
            "{broadcast_chunk=2000,broadcast_pause_ms=100}",
        )],
    );
    doomed.wait_ready().await;
    let survivor = shared.serve(&format!("sm_survivor_{}", random_id())).await;
    let root = Browser::login(&doomed, "root", PASSWORD).await;
    let form = format!(
        "csrf_token={}&level=stored_info&message=to+everyone&recipients=everyone&action=send&confirmed=yes",
        root.token
    );
    let answer = processes_post(&doomed.address, "/admin/broadcast", &root.cookie, &form).await;
    assert_eq!(answer.status, 303, "{}", answer.body);
    // Killed while its job runs, once it recorded a first chunk.
    let jobs = stored_messages_app::jobs::Jobs::new(users.clone());
    let started = Instant::now();
    loop {
        let job = jobs.recent(1).await.unwrap().pop();
        if job.is_some_and(|job| job.delivered > 0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no chunk delivered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    doomed.child.kill().unwrap();
    let killed = Instant::now();
    doomed.child.wait().unwrap();
    let job = jobs
        .recent(1)
        .await
        .unwrap()
        .pop()
        .expect("a background job");
    assert_eq!(
        job.status, "running",
        "the job ended before the kill: {job:?}"
    );
    assert!(
        job.delivered > 0 && job.delivered < job.total,
        "killed midway: {job:?}"
    );
    println!(
        "job {} killed at {} of {} users",
        job.id, job.delivered, job.total
    );
    let done = loop {
        let job = jobs.get(job.id).await.unwrap().unwrap();
        if job.status != "running" {
            break job;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "not taken over: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "taken over and finished {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(done.status, "done", "{done:?}");
    assert_eq!(done.delivered, USERS + 1, "{done:?}");
    // Exactly once: as many archive entries as users.
    let store = stored_messages::Store::connect(
        &figment,
        std::sync::Arc::new(stored_messages_app::users::AppHost::new(users.clone())),
    )
    .await
    .unwrap();
    let stats = store
        .backend()
        .admin()
        .expect("every backend administers its messages")
        .message_stats(1, None)
        .await
        .unwrap();
    assert_eq!(stats[0].message.id.0, done.message_id);
    assert_eq!(
        stats[0].recipients,
        (USERS + 1) as u64,
        "each user exactly once"
    );
    drop(survivor);
}

/// Any request, any instance: three servers on one store and one secret key, each request
/// of a scripted session sent to a random one. Login, messages added through the form (a
/// stored one, and flash ones over the cookie's budget, which spill to the store), pages,
/// the API, mark read: the same results as on one instance.
async fn any_request_may_go_to_any_instance(shared: &Shared) {
    use rand::Rng;
    shared.cli(&["createuser", "alice"], &format!("{PASSWORD}\n"));
    let servers = [
        shared.serve(&format!("sm_any0_{}", random_id())).await,
        shared.serve(&format!("sm_any1_{}", random_id())).await,
        shared.serve(&format!("sm_any2_{}", random_id())).await,
    ];
    let refs: Vec<&Server> = servers.iter().collect();
    shared.wait_feeds(&refs).await;
    let mut rng = rand::thread_rng();
    let mut any = || &servers[rng.gen_range(0..servers.len())];
    let alice = Browser::login(any(), "alice", PASSWORD).await;
    for round in 0..10 {
        let text = format!("stored {round}");
        alice.add(any(), &text).await;
        assert_eq!(alice.count(any()).await, 1, "round {round}");
        assert_eq!(
            alice.inbox(any()).await,
            std::slice::from_ref(&text),
            "round {round}"
        );
        // A page shows it (and marks it read), on another instance.
        let page = get(&any().address, "/", &alice.cookie).await.unwrap();
        assert_eq!(page.status, 200);
        assert!(page.body.contains(&text), "round {round}");
        assert_eq!(
            alice.count(any()).await,
            0,
            "round {round}: read everywhere"
        );
    }
    // Anonymous flash messages over the cookie's budget: the spill is in the store, so the
    // page that shows them may be served by any instance.
    let login = get(&any().address, "/login", "").await.unwrap();
    let mut jar = Vec::new();
    keep_cookies(&mut jar, &login);
    let token = csrf_token(&login.body);
    let long = "x".repeat(1500);
    for i in 0..4 {
        let form = format!("csrf_token={token}&level=info&message=flash{i}+{long}");
        let answer = post(&any().address, "/demo/message", &cookies(&jar), &form)
            .await
            .unwrap();
        assert_eq!(answer.status, 303, "{}", answer.body);
        keep_cookies(&mut jar, &answer);
    }
    assert!(
        jar.iter().any(|(k, _)| k == "sm_flash_spill"),
        "the queue spilled: {jar:?}"
    );
    let page = get(&any().address, "/", &cookies(&jar)).await.unwrap();
    for i in 0..4 {
        assert!(page.body.contains(&format!("flash{i} ")), "flash {i} shown");
    }
}

/// Three instances with a cleanup every second: between them, one cleanup per interval
/// (each takes the store's `cleanup` lease for 0.9 of the interval), not one per instance.
async fn periodic_cleanup_runs_on_one_instance_per_interval(shared: &Shared) {
    let stored = shared
        .env("cleanup")
        .into_iter()
        .find(|(name, _)| *name == "ROCKET_STORED_MESSAGES")
        .map(|(_, value)| value.replace("cleanup_interval_secs=0", "cleanup_interval_secs=1"))
        .unwrap();
    let logs: Vec<std::path::PathBuf> = (0..3)
        .map(|i| shared.dir.path().join(format!("cleanup-{i}.log")))
        .collect();
    let _keep = KeepLogs(logs.clone());
    // The database exists before the instances start (no race on the first admin).
    shared.cli(&["migrate"], "");
    let started = Instant::now();
    let mut servers: Vec<Server> = logs
        .iter()
        .enumerate()
        .map(|(i, log)| {
            shared.start_with(
                &format!("sm_cleanup_{i}_{}", random_id()),
                Some(log),
                &[("ROCKET_STORED_MESSAGES", &stored)],
            )
        })
        .collect();
    for server in &mut servers {
        server.wait_ready().await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    drop(servers);
    let elapsed = started.elapsed();
    let mut runs = Vec::new();
    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap();
        runs.push(text.matches("periodic cleanup:").count());
        assert!(!text.contains("cleanup failed"), "{}", log.display());
    }
    let total: usize = runs.iter().sum();
    let most = (elapsed.as_secs_f64() / 0.9).floor() as usize + 1;
    println!("{total} cleanups in {elapsed:?} by three instances ({runs:?}), at most {most}");
    assert!(
        (4..=most).contains(&total),
        "{total} cleanups in {elapsed:?} ({runs:?}): one per interval, at most {most}"
    );
}
