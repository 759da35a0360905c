//! The admin's broadcast to everyone, end to end, against the request-free
//! `broadcast_message`, on PostgreSQL.
//!
//! ```text
//! cargo run --release -p stored-messages-app --example bench-broadcast -- --users 1000000
//! ```
//!
//! In a schema of its own (`DATABASE_URL`, default the local `test` database; dropped at the
//! end) it creates N users and an admin, serves the reference app in this process on
//! 127.0.0.1, logs the admin in over HTTP and sends the broadcast form to everyone with the
//! confirmation. The clock starts just before that request and stops when the recipients
//! can see the message: the background job reports `done` (its status route, polled every
//! 10 ms) and the first, middle and last user each count it unread. Then
//! `Store::broadcast_message` sends one to the same users, timed the same way. It prints
//! both, and what the SQL backend stored for each (runs and rows).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::Connection;
use stored_messages::{Level, NewMessage, Store, UserId};
use stored_messages_app::users::AppHost;

#[path = "http.rs"]
mod http;

const PASSWORD: &str = "bench-admin-password";

fn users_arg() -> Result<i64, String> {
    let mut users = 1_000_000;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--users" => users = value.parse().map_err(|e| format!("--users: {e}"))?,
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(users)
}

/// A schema of its own in the database at `base`; returns its url.
async fn create_schema(base: &str, name: &str) -> Result<String, String> {
    let mut db = sqlx::PgConnection::connect(base)
        .await
        .map_err(|e| format!("{base}: {e}"))?;
    sqlx::query(&format!("create schema {name}"))
        .execute(&mut db)
        .await
        .map_err(|e| e.to_string())?;
    let sep = if base.contains('?') { '&' } else { '?' };
    Ok(format!("{base}{sep}options=-c%20search_path%3D{name}"))
}

async fn drop_schema(base: &str, name: &str) {
    if let Ok(mut db) = sqlx::PgConnection::connect(base).await {
        let _ = sqlx::query(&format!("drop schema if exists {name} cascade"))
            .execute(&mut db)
            .await;
    }
}

/// What the SQL backend stored for `message`: (runs, rows).
async fn stored_forms(url: &str, message: i64) -> Result<(i64, i64), String> {
    let mut db = sqlx::PgConnection::connect(url)
        .await
        .map_err(|e| e.to_string())?;
    let runs: i64 = sqlx::query_scalar("select count(*) from sm_audiences where message_id = $1")
        .bind(message)
        .fetch_one(&mut db)
        .await
        .map_err(|e| e.to_string())?;
    let rows: i64 = sqlx::query_scalar("select count(*) from sm_deliveries where message_id = $1")
        .bind(message)
        .fetch_one(&mut db)
        .await
        .map_err(|e| e.to_string())?;
    Ok((runs, rows))
}

/// Waits until each of `users` counts `message` among its unread.
async fn visible(store: &Store, users: &[UserId], message: i64) -> Result<(), String> {
    for user in users {
        loop {
            let inbox = store
                .backend()
                .inbox_list(*user, stored_messages::ListQuery::first(1000))
                .await
                .map_err(|e| stored_messages::report(&e))?;
            if inbox.iter().any(|m| m.id.0 == message) {
                break;
            }
            rocket::tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    Ok(())
}

async fn run(users: i64, url: &str) -> Result<(), String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let server = format!("127.0.0.1:{port}");
    let mut key = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut key);
    let figment = rocket::Config::figment()
        .merge(("databases.stored_messages.url", url))
        .merge(("address", "127.0.0.1"))
        .merge(("port", port))
        .merge(("log_level", "critical"))
        .merge((
            "secret_key",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, key),
        ))
        .merge((
            "template_dir",
            concat!(env!("CARGO_MANIFEST_DIR"), "/templates"),
        ))
        .merge(("stored_messages.cleanup_interval_secs", 0));

    // arrange: the users (one statement) and an admin
    let app_users = Arc::new(stored_messages_app::connect_users(&figment).await?);
    let seeded = Instant::now();
    let mut db = sqlx::PgConnection::connect(url)
        .await
        .map_err(|e| e.to_string())?;
    sqlx::query(
        "insert into app_users (username, password_hash, is_admin, created_us) \
         select 'user' || i, 'x', false, 0 from generate_series(1, $1) as i",
    )
    .bind(users)
    .execute(&mut db)
    .await
    .map_err(|e| e.to_string())?;
    sqlx::query("analyze app_users")
        .execute(&mut db)
        .await
        .map_err(|e| e.to_string())?;
    let admin = app_users
        .create("bench-admin", PASSWORD, true)
        .await
        .map_err(|e| e.to_string())?;
    eprintln!(
        "{users} users created in {:.1} s",
        seeded.elapsed().as_secs_f64()
    );
    let everyone = users + 1;
    let sample = [UserId(1), UserId(users / 2), admin.user_id()];

    // the app, served in this process
    let rocket = stored_messages_app::rocket_from(figment.clone());
    rocket::tokio::spawn(async move {
        if let Err(e) = rocket.launch().await {
            eprintln!("bench-broadcast: the server failed: {e}");
        }
    });
    let started = Instant::now();
    loop {
        if let Ok((status, _, _)) = http::http(
            &server,
            format!("GET /health HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n\r\n"),
        )
        .await
        {
            if status.contains(" 200 ") {
                break;
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err("the server did not start".into());
        }
        rocket::tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let store = Store::connect(&figment, Arc::new(AppHost::new(app_users.clone())))
        .await
        .map_err(|e| stored_messages::report(&e))?;

    // the admin, logged in, on the broadcast form
    let cookie = http::login(&server, "bench-admin", PASSWORD).await?;
    let (_, set, page) = http::http(
        &server,
        format!(
            "GET /admin/broadcast HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n\
             Cookie: {cookie}\r\n\r\n"
        ),
    )
    .await?;
    let mut jar: Vec<(String, String)> = cookie
        .split("; ")
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    http::merge(&mut jar, set);
    let cookie = http::cookie_header(&jar);
    let token = page
        .split("name=\"csrf_token\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .ok_or("no CSRF token on the broadcast form")?;
    let form = format!(
        "csrf_token={}&level=stored_info&message=to+everyone+from+the+form&recipients=everyone\
         &action=send&confirmed=yes",
        http::form_encode(token)
    );

    // act: the admin's broadcast, until every sampled recipient sees it
    let sent = Instant::now();
    let (status, _, body) = http::http(
        &server,
        format!(
            "POST /admin/broadcast HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
             Cookie: {cookie}\r\n\r\n{form}",
            form.len()
        ),
    )
    .await?;
    let answered = sent.elapsed();
    if !status.contains(" 303 ") {
        return Err(format!("the broadcast form answered {status}: {body}"));
    }
    let job = app_users_job(&app_users).await?;
    loop {
        let (_, _, status) = http::http(
            &server,
            format!(
                "GET /admin/jobs/{job}/status HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n\
                 Accept: application/json\r\nCookie: {cookie}\r\n\r\n"
            ),
        )
        .await?;
        let status: Value =
            serde_json::from_str(&status).map_err(|e| format!("job status {status}: {e}"))?;
        match status["status"].as_str() {
            Some("running") => {}
            Some("done") => break,
            other => return Err(format!("the job ended {other:?}: {status}")),
        }
        if sent.elapsed() > Duration::from_secs(600) {
            return Err("the job did not finish in 10 minutes".into());
        }
        rocket::tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let jobs = stored_messages_app::jobs::Jobs::new(app_users.clone());
    let done = jobs
        .get(job)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the job is gone")?;
    visible(&store, &sample, done.message_id).await?;
    let admin_took = sent.elapsed();
    let (runs, rows) = stored_forms(url, done.message_id).await?;
    println!(
        "admin broadcast to {everyone:>9} users (background job): {:>7.3} s until every recipient sees it \
         (form answered in {:.0} ms; {} delivered; stored as {runs} runs and {rows} rows)   target < 5 s",
        admin_took.as_secs_f64(),
        answered.as_secs_f64() * 1000.0,
        done.delivered,
    );

    // the same audience through the request-free API
    let sent = Instant::now();
    let delivery = store
        .broadcast_message(
            NewMessage::new(Level::STORED_INFO, "to everyone from the API")
                .map_err(|e| stored_messages::report(&e))?,
        )
        .await
        .map_err(|e| stored_messages::report(&e))?;
    visible(&store, &sample, delivery.message.id.0).await?;
    let api_took = sent.elapsed();
    let (runs, rows) = stored_forms(url, delivery.message.id.0).await?;
    println!(
        "broadcast_message to {:>9} users:                   {:>7.3} s until every recipient sees it \
         (stored as {runs} runs and {rows} rows)   target < 2 s",
        delivery.recipients,
        api_took.as_secs_f64(),
    );
    println!(
        "admin path / broadcast_message: {:.1}x",
        admin_took.as_secs_f64() / api_took.as_secs_f64()
    );
    Ok(())
}

/// The newest background job's id.
async fn app_users_job(users: &Arc<stored_messages_app::users::Users>) -> Result<i64, String> {
    let jobs = stored_messages_app::jobs::Jobs::new(users.clone());
    let job = jobs
        .recent(1)
        .await
        .map_err(|e| e.to_string())?
        .pop()
        .ok_or("the broadcast did not become a background job")?;
    Ok(job.id)
}

fn main() -> std::process::ExitCode {
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = format!("sm_bench_broadcast_{}", std::process::id());
    let result = users_arg().and_then(|users| {
        rocket::tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?
            .block_on(async {
                let url = create_schema(&base, &schema).await?;
                let result = run(users, &url).await;
                drop_schema(&base, &schema).await;
                result
            })
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-broadcast: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
