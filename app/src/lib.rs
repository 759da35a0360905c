//! The reference application of stored-messages: users, login, demo pages, the admin area
//! and the `stored-messages` command line around the library.
//!
//! It is a crate of its own so that it is built the way any host is: with the library's
//! public API only. It implements [`stored_messages::Host`], attaches
//! [`StoredMessages::fairing`], registers the template helpers and mounts its pages.

#[macro_use]
extern crate rocket;

use std::sync::Arc;

use rocket::fairing::AdHoc;
use rocket::figment::Figment;
use rocket::fs::{relative, FileServer};
use rocket::shield::Shield;
use rocket::{Build, Rocket};

use crate::jobs::Jobs;
use crate::users::{AppHost, Users};
use stored_messages::config::database_config;
use stored_messages::report;
use stored_messages::SqlPool;
use stored_messages::StoredMessages;

/// Runs `$body` with `$pool` bound to the concrete pool of either SQL dialect, so one piece
/// of generic sqlx code serves the app's tables on SQLite and PostgreSQL.
macro_rules! with_pool {
    ($sql_pool:expr, $pool:ident => $body:expr) => {
        match $sql_pool {
            stored_messages::SqlPool::Sqlite($pool) => $body,
            stored_messages::SqlPool::Postgres($pool) => $body,
        }
    };
}

/// Runs `$body` with `$conn` bound to a connection of `$reads` (a
/// [`stored_messages::backend::SqlReads`]), which goes back for reuse only if `$body`
/// completed within the reads' timeout (beyond, it fails as the pool's timeout does): for
/// one-statement reads on every request. A read that fails on a reused connection runs once
/// more on a new one (`Lease::settle`). `$body`'s `?` returns `sqlx::Error`.
macro_rules! with_read {
    ($reads:expr, $conn:ident => $body:expr) => {
        match $reads {
            stored_messages::backend::SqlReads::Sqlite(reuse) => {
                with_read!(@lease reuse, $conn => $body)
            }
            stored_messages::backend::SqlReads::Postgres(reuse) => {
                with_read!(@lease reuse, $conn => $body)
            }
        }
    };
    (@lease $reuse:ident, $conn:ident => $body:expr) => {{
        let mut retried = false;
        loop {
            let mut lease = $reuse.lease().await?;
            let read = async {
                let $conn = &mut *lease;
                Ok::<_, sqlx::Error>($body)
            };
            let outcome = rocket::tokio::time::timeout($reuse.read_timeout(), read).await;
            let timed_out = || sqlx::Error::PoolTimedOut;
            if let Some(out) = lease.settle(outcome.ok(), &mut retried, timed_out)? {
                break out;
            }
        }
    }};
}

pub mod admin;
pub mod auth;
pub mod cli;
pub mod jobs;
pub mod pages;
pub mod paging;
pub mod sessions;
pub mod throttle;
pub mod users;

/// Headers of every response: the pages load scripts and styles from `/static` only (no
/// inline code anywhere), no page may be framed, and links to other sites carry no path.
/// They replace Rocket's default `Shield`, whose `X-Frame-Options: SAMEORIGIN` disagreed
/// with `frame-ancestors 'none'` and whose `Permissions-Policy: interest-cohort=()` opts out
/// of FLoC, which browsers have dropped. A handler that sets one of these itself keeps its
/// own.
const SECURITY_HEADERS: [(&str, &str); 4] = [
    (
        "Content-Security-Policy",
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'",
    ),
    ("Referrer-Policy", "same-origin"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
];

/// The form limit unless the configuration sets `limits.form` itself.
const FORM_LIMIT: &str = "64 KiB";

/// The reference app with Rocket's usual configuration (Rocket.toml, `ROCKET_*`), over the
/// app's own defaults (see [`figment_from`]).
pub fn rocket() -> Rocket<Build> {
    rocket_from(figment())
}

/// The app's configuration: [`figment_from`] the file `ROCKET_CONFIG` names (Rocket.toml by
/// default).
pub fn figment() -> Figment {
    use rocket::figment::providers::Env;
    figment_from(&Env::var_or("ROCKET_CONFIG", "Rocket.toml"))
}

/// Rocket's usual configuration sources (as `rocket::Config::figment()`: its defaults, the
/// TOML file at `config_file`, `ROCKET_*` variables), with the app's defaults between
/// Rocket's and the file: `ip_header` is off, so a client's address is the peer's and a
/// client cannot pick it with an `X-Real-IP` header (login throttling and the flash-spill
/// quota count by address). Behind a proxy, set it to the proxy's header. Before, only the
/// repository's Rocket.toml turned it off: an installed binary run elsewhere trusted the
/// header.
pub fn figment_from(config_file: &str) -> Figment {
    use rocket::figment::providers::{Env, Format, Serialized, Toml};
    Figment::from(rocket::Config::default())
        .merge(Serialized::default("ip_header", false))
        .merge(Toml::file(config_file).nested())
        .merge(Env::prefixed("ROCKET_").ignore(&["PROFILE"]).global())
}

/// The reference app over a given figment (tests build theirs in code).
pub fn rocket_from(figment: Figment) -> Rocket<Build> {
    // A message may be 4,000 characters of up to 4 bytes each, which a urlencoded form
    // triples: Rocket's default form limit (32 KiB) is too small for the longest one.
    let figment = figment.join(("limits.form", FORM_LIMIT));
    rocket::custom(figment)
        // No default `Shield`: the "security headers" fairing below sets every such header.
        .attach(Shield::new())
        .attach(AdHoc::try_on_ignite(
            "reference app users",
            |rocket| async {
                match connect_users(rocket.figment()).await {
                    Ok(users) => {
                        let users = Arc::new(users);
                        let host = AppHost::new(users.clone());
                        let threshold = setting(
                            &rocket,
                            "admin.background_threshold",
                            admin::DEFAULT_BACKGROUND_THRESHOLD,
                        );
                        let session_days =
                            setting(&rocket, "app.session_days", auth::DEFAULT_SESSION_DAYS).max(1);
                        let chunk = setting(&rocket, "admin.broadcast_chunk", jobs::CHUNK);
                        let pause = setting(&rocket, "admin.broadcast_pause_ms", 0u64);
                        let jobs = Jobs::new(users.clone())
                            .paced(chunk, std::time::Duration::from_millis(pause));
                        Ok(rocket
                            .manage(jobs)
                            .manage(throttle::LoginThrottle::default())
                            .manage(auth::SessionLifetime(std::time::Duration::from_secs(
                                session_days.saturating_mul(86_400),
                            )))
                            .manage(admin::BackgroundThreshold(threshold))
                            .manage(users)
                            // Static files and health checks have no forms: no token
                            // to resolve (it would ask for the session on every file).
                            .attach(
                                StoredMessages::fairing(host)
                                    .csrf_exempt("/static")
                                    .csrf_exempt("/health"),
                            )
                            .attach(AdHoc::on_ignite("reference app sessions", |rocket| async {
                                // After the store's fairing: sessions end through its feed.
                                let cache = setting(&rocket, "app.session_cache", true);
                                if let (Some(users), Some(store)) = (
                                    rocket.state::<Arc<Users>>(),
                                    rocket.state::<stored_messages::Store>(),
                                ) {
                                    if cache {
                                        users.cache_sessions(store);
                                    } else {
                                        users.announce_on(store.change_announcer());
                                    }
                                }
                                rocket
                            })))
                    }
                    Err(e) => {
                        log::error!("reference app: cannot open the users database: {e}");
                        Err(rocket)
                    }
                }
            },
        ))
        .attach(AdHoc::on_liftoff("first admin, broadcast jobs", |rocket| {
            Box::pin(async move {
                if let Some(users) = rocket.state::<Arc<Users>>() {
                    first_admin(users).await;
                }
                // Resumes the broadcasts a restart interrupted, then runs new ones.
                if let (Some(jobs), Some(store)) = (
                    rocket.state::<Jobs>(),
                    rocket.state::<stored_messages::Store>(),
                ) {
                    rocket::tokio::spawn(jobs.clone().worker(store.clone(), rocket.shutdown()));
                }
            })
        }))
        .attach(stored_messages::template::fairing())
        .attach(AdHoc::on_response(
            "security headers",
            |request, response| {
                Box::pin(async move {
                    // Which are set already, in one pass over the few headers there are: a
                    // lookup by name in Rocket's header map hashes the name byte by byte.
                    let mut set = [false; SECURITY_HEADERS.len()];
                    for header in response.headers().iter() {
                        let name = header.name().as_str();
                        for (i, (security, _)) in SECURITY_HEADERS.iter().enumerate() {
                            set[i] |= name.eq_ignore_ascii_case(security);
                        }
                    }
                    for ((name, value), set) in SECURITY_HEADERS.into_iter().zip(set) {
                        if !set {
                            response.set_raw_header(name, value);
                        }
                    }
                    // Live streams served by the stream listener, on another origin: the pages'
                    // script follows the stream's redirect there.
                    if let Some(origin) = stored_messages::live::listener::stream_origin(request) {
                        let policy = response
                            .headers()
                            .get_one("Content-Security-Policy")
                            .map(|p| format!("{p}; connect-src 'self' {origin}"));
                        if let Some(policy) = policy {
                            response.set_raw_header("Content-Security-Policy", policy);
                        }
                    }
                })
            },
        ))
        .mount("/", pages::routes())
        .mount("/", auth::routes())
        .mount("/", admin::routes())
        .mount("/static", FileServer::from(relative!("static")))
        .register("/", pages::catchers())
}

/// The app's setting `key`, or `default` when it is not set (or not of its type).
fn setting<T: serde::de::DeserializeOwned>(rocket: &Rocket<Build>, key: &str, default: T) -> T {
    rocket.figment().extract_inner(key).unwrap_or(default)
}

/// Connects the users database (the same url as the SQL backend) and applies the app's
/// migrations.
pub async fn connect_users(figment: &Figment) -> Result<Users, String> {
    let config = database_config(figment).map_err(|e| e.to_string())?;
    let url = stored_messages::config::SecretUrl::new(&config.url);
    let pool = SqlPool::connect_with(&config)
        .await
        .map_err(|e| format!("{url}: {}", report(&e)))?;
    let users = Users::new(pool);
    users.migrate().await.map_err(|e| report(&e))?;
    Ok(users)
}

/// On the first start (no users at all) creates `admin` with a random password and prints
/// how to log in, once.
async fn first_admin(users: &Users) {
    match users.count().await {
        Ok(0) => {}
        Ok(_) => return,
        Err(e) => {
            log::error!("reference app: counting users failed: {}", report(&e));
            return;
        }
    }
    let password = users::random_password();
    match users.create("admin", &password, true).await {
        Ok(_) => eprintln!(
            "\n  stored-messages: first start, no users yet.\n  \
             Log in at /login as  admin  with password  {password}\n  \
             (shown only now; create more users with `stored-messages createuser NAME [--admin]`)\n"
        ),
        // Several instances started together on a fresh database: one of them made it.
        Err(users::UserError::Exists(_)) => {
            log::info!("reference app: the first admin was created by another instance")
        }
        Err(e) => log::error!(
            "reference app: creating the first admin failed: {}",
            report(&e)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a configuration file (an installed binary run from another folder), the
    /// client's address is still the peer's; a file can set a proxy's header.
    #[test]
    fn ip_header_is_off_unless_configured() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("Rocket.toml");
        let config: rocket::Config = figment_from(missing.to_str().unwrap()).extract().unwrap();
        assert_eq!(config.ip_header, None);

        std::fs::write(&missing, "[default]\nip_header = \"X-Forwarded-For\"\n").unwrap();
        let config: rocket::Config = figment_from(missing.to_str().unwrap()).extract().unwrap();
        assert_eq!(
            config.ip_header.as_ref().map(|h| h.as_str()),
            Some("X-Forwarded-For")
        );
    }
}
