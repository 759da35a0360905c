//! The `stored-messages` command line: `serve` (the default), `migrate`, `createuser`,
//! `send`, `broadcast`, `inbox`, `cleanup`.
//!
//! Every command reads the same configuration as `serve` (Rocket.toml and `ROCKET_*`
//! variables), and fails with one clear line and a non-zero exit code.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use rocket::figment::Figment;

use crate::users::{AppHost, UserError, Users};
use stored_messages::report;
use stored_messages::ListQuery;
use stored_messages::{Level, NewMessage, Printable, Store};

/// Flash and stored messages for Rocket: the reference app and its tools.
#[derive(Debug, Parser)]
#[command(name = "stored-messages", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the reference app (the default command).
    Serve,
    /// Create or update the database tables, then exit.
    Migrate,
    /// Create a user; the password is read from standard input when it is not a terminal,
    /// and prompted for otherwise.
    Createuser {
        /// The username (letters, digits, '.', '_', '-', '@').
        name: String,
        /// Make the user an admin (may use /admin).
        #[arg(long)]
        admin: bool,
    },
    /// Set a user's password (read as for `createuser`) and end all of their sessions.
    Passwd {
        /// The username.
        name: String,
    },
    /// Send a stored message to some users.
    Send {
        /// Recipients, by username, separated by commas.
        #[arg(long, value_delimiter = ',', required = true)]
        to: Vec<String>,
        #[command(flatten)]
        message: MessageArgs,
    },
    /// Send a stored message to every user.
    Broadcast {
        #[command(flatten)]
        message: MessageArgs,
    },
    /// List a user's unread messages, oldest first.
    Inbox {
        /// The username.
        name: String,
    },
    /// Remove expired inbox entries and messages now.
    Cleanup,
    /// End every session of a user, on every app instance (they must log in again).
    Endsessions {
        /// The username.
        name: String,
    },
}

#[derive(Debug, Args)]
struct MessageArgs {
    /// Level: a name (stored_info, stored_warning, …) or an integer store level.
    #[arg(long, default_value = "stored_info")]
    level: String,
    /// Extra tags, space separated.
    #[arg(long, default_value = "")]
    tags: String,
    /// A link: https://… or a site-relative /path.
    #[arg(long)]
    url: Option<String>,
    /// The message text.
    text: String,
}

impl MessageArgs {
    fn parse(&self) -> Result<NewMessage, String> {
        let level = Level::parse(&self.level).map_err(|e| e.to_string())?;
        NewMessage::parse(level, &self.text, &self.tags, self.url.as_deref(), None)
            .map_err(|e| e.to_string())
    }
}

/// Parses the command line and runs the command.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(),
        command => {
            let runtime = rocket::tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build();
            match runtime {
                Ok(runtime) => runtime.block_on(execute(command, crate::figment())),
                Err(e) => Err(format!("cannot start the async runtime: {e}")),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(line) => {
            eprintln!("error: {line}");
            ExitCode::FAILURE
        }
    }
}

fn serve() -> Result<(), String> {
    rocket::execute(crate::rocket().launch())
        .map(|_| ())
        .map_err(|e| format!("the server stopped: {e}"))
}

/// The users table and the store, as `serve` would open them, without the inbox cache: a
/// command runs once, so a cache (and its change feed's connection) would be wasted.
async fn open(figment: &Figment) -> Result<(Arc<Users>, Store), String> {
    let users = Arc::new(crate::connect_users(figment).await?);
    let figment = figment
        .clone()
        .merge(("stored_messages.inbox_cache_messages", 0));
    let store = Store::connect(&figment, Arc::new(AppHost::new(users.clone())))
        .await
        .map_err(|e| report(&e))?;
    // Sessions a command ends are dropped from the session caches of running servers.
    users.announce_on(store.change_announcer());
    Ok((users, store))
}

fn user_error(e: UserError) -> String {
    report(&e)
}

async fn execute(command: Command, figment: Figment) -> Result<(), String> {
    let (users, store) = open(&figment).await?;
    match command {
        Command::Serve => unreachable!("serve is handled before the runtime starts"),
        Command::Migrate => {
            println!("migrations applied ({} backend)", store.backend().name());
        }
        Command::Createuser { name, admin } => {
            crate::users::check_username(&name).map_err(user_error)?;
            let password = read_password()?;
            let user = users
                .create(&name, &password, admin)
                .await
                .map_err(user_error)?;
            println!(
                "created {}user {} (id {})",
                if admin { "admin " } else { "" },
                user.username,
                user.id
            );
        }
        Command::Passwd { name } => {
            let user = users
                .by_name(&name)
                .await
                .map_err(user_error)?
                .ok_or_else(|| format!("unknown user \"{}\"", Printable(&name)))?;
            let password = read_password()?;
            let ended = users
                .set_password(&user, &password)
                .await
                .map_err(user_error)?;
            println!(
                "password of {} changed; {ended} session{} ended",
                user.username,
                if ended == 1 { "" } else { "s" }
            );
        }
        Command::Send { to, message } => {
            let message = message.parse()?;
            // Each name once, in its one spelling, in the order given.
            let names = crate::users::recipient_names(to.iter().map(String::as_str));
            if names.is_empty() {
                return Err("--to names no user: give at least one username".to_string());
            }
            let ids = users.ids_by_names(&names).await.map_err(user_error)?;
            let started = std::time::Instant::now();
            let delivery = store
                .add_message_for(&ids, message)
                .await
                .map_err(|e| report(&e))?;
            audit(&users, &delivery, &names.join(", "), started).await;
            println!(
                "sent message {} to {} user{}: {}",
                delivery.message.id,
                delivery.recipients,
                if delivery.recipients == 1 { "" } else { "s" },
                names.join(", ")
            );
        }
        Command::Broadcast { message } => {
            let message = message.parse()?;
            let started = std::time::Instant::now();
            let delivery = store
                .broadcast_message(message)
                .await
                .map_err(|e| report(&e))?;
            audit(&users, &delivery, "everyone", started).await;
            println!(
                "broadcast message {} to {} users in {} ms",
                delivery.message.id,
                delivery.recipients,
                started.elapsed().as_millis()
            );
        }
        Command::Endsessions { name } => {
            let user = users
                .by_name(&name)
                .await
                .map_err(user_error)?
                .ok_or_else(|| format!("unknown user \"{}\"", Printable(&name)))?;
            let ended = users.end_sessions(user.id).await.map_err(user_error)?;
            println!(
                "ended {ended} session{} of {}",
                if ended == 1 { "" } else { "s" },
                user.username
            );
        }
        Command::Inbox { name } => {
            let user = users
                .by_name(&name)
                .await
                .map_err(user_error)?
                .ok_or_else(|| format!("unknown user \"{}\"", Printable(&name)))?;
            let inbox = store
                .backend()
                .inbox_list(user.user_id(), ListQuery::ALL)
                .await
                .map_err(|e| report(&e))?;
            // Written line by line; a reader that stops early (`| head`) ends the listing
            // quietly instead of a panic over a broken pipe.
            let mut out = std::io::stdout().lock();
            let mut lines = vec![format!(
                "{} unread message{} for {}",
                inbox.len(),
                if inbox.len() == 1 { "" } else { "s" },
                name
            )];
            lines.extend(inbox.iter().map(|m| {
                format!(
                    "{}  {}  [{}] {}",
                    m.id,
                    m.date.format("%Y-%m-%d %H:%M:%S"),
                    printable(store.level_tags().tag(m.level)),
                    printable(&m.message)
                )
            }));
            for line in lines {
                if let Err(e) = writeln!(out, "{line}") {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        break;
                    }
                    return Err(format!("cannot write the listing: {e}"));
                }
            }
        }
        Command::Cleanup => {
            let cleanup = store.cleanup().await.map_err(|e| report(&e))?;
            println!(
                "cleanup removed {} expired inbox entries and {} expired messages",
                cleanup.inbox_entries, cleanup.messages
            );
        }
    }
    Ok(())
}

/// `text` on one line of a terminal: control characters (line breaks, and anything that a
/// terminal would take as a command, such as ESC or BEL, in messages stored before such
/// text was refused) are shown escaped (`\n`, `\u{1b}`).
fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// Records a send or broadcast from the command line in the admin audit, as actor
/// "command line". The message is already delivered: a failed audit is reported, not fatal.
async fn audit(
    users: &Arc<Users>,
    delivery: &stored_messages::Delivery,
    audience: &str,
    started: std::time::Instant,
) {
    let actor = crate::users::User {
        id: 0,
        username: "command line".to_string(),
        is_admin: true,
    };
    let entry = crate::jobs::Audit {
        actor: &actor,
        message: &delivery.message,
        audience,
        audience_size: delivery.recipients as i64,
        duration_ms: Some(started.elapsed().as_millis() as i64),
        job_id: None,
    };
    if let Err(e) = crate::jobs::Jobs::new(users.clone()).audit(entry).await {
        eprintln!(
            "warning: the message was sent, but recording it in the audit failed: {}",
            report(&e)
        );
    }
}

/// The new user's password: one line of standard input when it is not a terminal,
/// otherwise prompted twice without echo.
fn read_password() -> Result<String, String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| format!("reading the password: {e}"))?;
        let password = line.trim_end_matches(['\n', '\r']).to_string();
        if password.is_empty() {
            return Err("no password on standard input".to_string());
        }
        return Ok(password);
    }
    let first = rpassword::prompt_password("Password: ")
        .map_err(|e| format!("reading the password: {e}"))?;
    let second = rpassword::prompt_password("Password (again): ")
        .map_err(|e| format!("reading the password: {e}"))?;
    if first != second {
        return Err("the passwords do not match".to_string());
    }
    Ok(first)
}
