//! Seeds the many-users benchmark (W1many, W2many of `bench/run.sh`): creates N users, gives
//! each M unread stored messages of their own, logs each one in to the running server and
//! writes one `Cookie:` header value per user to a file, for wrk's rotating script.
//!
//! ```text
//! cargo run --release --example bench-seed -- --users 1000 --messages 10 \
//!     --server 127.0.0.1:8000 --cookies /tmp/cookies.txt
//! ```
//!
//! It reads the same configuration as `serve` (Rocket.toml and `ROCKET_*` variables), so it
//! seeds the store the server uses. Every user gets one password hash computed once with
//! argon2's smallest parameters: the benchmark measures pages, not password checks, and
//! 1,000 logins with the app's real parameters would take about half a minute.

use std::sync::Arc;
use std::time::Instant;

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use stored_messages::{Level, NewMessage, Store, UserId};
use stored_messages_app::users::AppHost;

#[path = "http.rs"]
mod http;

const PASSWORD: &str = "bench-password";
/// Requests in flight at once while seeding.
const PARALLEL: usize = 8;

struct Args {
    users: usize,
    messages: usize,
    server: String,
    cookies: String,
}

fn args() -> Result<Args, String> {
    let mut args = Args {
        users: 1000,
        messages: 10,
        server: "127.0.0.1:8000".into(),
        cookies: "cookies.txt".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--users" => args.users = value.parse().map_err(|e| format!("--users: {e}"))?,
            "--messages" => {
                args.messages = value.parse().map_err(|e| format!("--messages: {e}"))?
            }
            "--server" => args.server = value,
            "--cookies" => args.cookies = value,
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(args)
}

async fn seed(args: Args) -> Result<(), String> {
    let figment = rocket::Config::figment().merge(("stored_messages.inbox_cache_messages", 0));
    let users = Arc::new(stored_messages_app::connect_users(&figment).await?);
    let store = Store::connect(&figment, Arc::new(AppHost::new(users.clone())))
        .await
        .map_err(|e| stored_messages::report(&e))?;

    // arrange: users sharing one cheap hash
    let started = Instant::now();
    let salt = SaltString::generate(&mut rand::thread_rng());
    let cheap = Argon2::new(
        Algorithm::Argon2id,
        Version::V0x13,
        Params::new(Params::MIN_M_COST, 1, 1, None).map_err(|e| e.to_string())?,
    );
    let hash = cheap
        .hash_password(PASSWORD.as_bytes(), &salt)
        .map_err(|e| e.to_string())?
        .to_string();
    let names: Vec<String> = (1..=args.users).map(|i| format!("bench{i:05}")).collect();
    let mut ids = Vec::with_capacity(names.len());
    for name in &names {
        let user = match users.insert_hashed(name, &hash, false).await {
            Ok(user) => user,
            Err(_) => users
                .by_name(name)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("user {name} neither created nor found"))?,
        };
        ids.push(user.user_id());
    }

    // messages of their own: distinct texts, one delivery each
    let work: Vec<(UserId, String)> = ids
        .iter()
        .zip(&names)
        .flat_map(|(id, name)| {
            (1..=args.messages).map(move |i| (*id, format!("message {i} for {name}")))
        })
        .collect();
    // SQLite has one writer at a time: concurrent sends would only wait for each other.
    let parallel = if store.backend().name() == "sqlite" {
        1
    } else {
        PARALLEL
    };
    for chunk in work.chunks(parallel) {
        let sends = chunk.iter().map(|(id, text)| {
            let store = store.clone();
            async move {
                let message = NewMessage::new(Level::STORED_INFO, text)
                    .map_err(|e| stored_messages::report(&e))?;
                store
                    .add_message_for(&[*id], message)
                    .await
                    .map_err(|e| stored_messages::report(&e))
            }
        });
        for result in rocket::futures::future::join_all(sends).await {
            result?;
        }
    }

    // log everyone in
    let mut cookies = Vec::with_capacity(names.len());
    for chunk in names.chunks(PARALLEL) {
        let logins = chunk
            .iter()
            .map(|name| http::login(&args.server, name, PASSWORD));
        for result in rocket::futures::future::join_all(logins).await {
            cookies.push(result?);
        }
    }
    std::fs::write(&args.cookies, cookies.join("\n") + "\n")
        .map_err(|e| format!("{}: {e}", args.cookies))?;
    eprintln!(
        "seeded {} users with {} unread messages each in {:.1} s",
        args.users,
        args.messages,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    let result = args().and_then(|args| {
        rocket::tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?
            .block_on(seed(args))
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-seed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
