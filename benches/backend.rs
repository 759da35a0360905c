//! In-process benchmarks of the backend hot paths, on every reachable backend, printed as one
//! table. Run with `cargo bench --bench backend` (release build).
//!
//! - W3: broadcast (one `deliver`) to 10,000 / 100,000 / 1,000,000 users: seconds. The users
//!   are consecutive ids, as a broadcast to every user of an app usually is, so the SQL
//!   backend stores runs (see `src/backend/sql.rs`); `BENCH_SPARSE=1` spreads them out (every
//!   other id), which makes it write one row per user.
//! - W4: `add_message_for` one user, 1,000 calls: mean and p99 latency.
//! - W5: `mark_all_read` of a user with 20 unread: mean latency.
//! - W6: inbox listing of a user with 10 unread and a large archive, against a user with an
//!   empty archive: the ratio (the data model promises it stays near 1).
//!
//! `BENCH_SIZES` (default `10000,100000`) picks the broadcast sizes; `BENCH_ARCHIVE`
//! (default 1000000) the archive size of W6; `BENCH_BACKENDS` (default `sqlite,postgres,redis`)
//! the backends. Each backend runs in a fresh database/schema/key prefix, dropped afterwards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use stored_messages::backend::Settings;
use stored_messages::config::SecretUrl;
use stored_messages::{
    BoxError, Config, Host, Level, ListQuery, MessageBackend, NewMessage, RedisBackend, SqlBackend,
    SqlPool, Store, UserId,
};

struct NoUsers;

#[rocket::async_trait]
impl Host for NoUsers {
    async fn current_user(&self, _: &rocket::Request<'_>) -> Option<UserId> {
        None
    }
    async fn all_users(&self) -> Result<Vec<UserId>, BoxError> {
        Ok(Vec::new())
    }
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn msg(text: &str) -> NewMessage {
    NewMessage::new(Level::STORED_INFO, text).unwrap()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Target {
    name: &'static str,
    store: Store,
    pool: Option<SqlPool>,
    redis: Option<redis::aio::ConnectionManager>,
    /// Redis key prefix (empty for SQL).
    prefix: String,
    cleanup: Box<dyn FnOnce() + Send>,
}

async fn open(name: &str) -> Option<Target> {
    // The storage itself is measured: the in-process inbox cache, which would answer W6's
    // listings from memory, is off (the HTTP workloads of bench/run.sh measure it).
    let config = Config {
        cleanup_interval_secs: 0,
        inbox_cache_messages: 0,
        ..Config::default()
    };
    let settings = Settings::from_config(&config);
    match name {
        "sqlite" => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!(
                "sqlite://{}?mode=rwc",
                dir.path().join("bench.sqlite").display()
            );
            let backend = SqlBackend::connect(&SecretUrl::new(url), settings)
                .await
                .ok()?;
            let pool = Some(backend.pool().clone());
            let store = Store::new(Arc::new(backend), Arc::new(NoUsers), config).unwrap();
            Some(Target {
                name: "sqlite",
                store,
                pool,
                redis: None,
                prefix: String::new(),
                cleanup: Box::new(move || drop(dir)),
            })
        }
        "postgres" => {
            let base = std::env::var("DATABASE_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
            let admin = sqlx::PgPool::connect(&base).await.ok()?;
            let schema = format!("sm_bench_{}", std::process::id());
            sqlx::query(&format!("drop schema if exists {schema} cascade"))
                .execute(&admin)
                .await
                .ok()?;
            sqlx::query(&format!("create schema {schema}"))
                .execute(&admin)
                .await
                .ok()?;
            let sep = if base.contains('?') { '&' } else { '?' };
            let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
            let backend = SqlBackend::connect(&SecretUrl::new(url), settings)
                .await
                .ok()?;
            let pool = Some(backend.pool().clone());
            let store = Store::new(Arc::new(backend), Arc::new(NoUsers), config).unwrap();
            let cleanup = Box::new(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let _ = sqlx::query(&format!("drop schema if exists {schema} cascade"))
                        .execute(&admin)
                        .await;
                });
            });
            Some(Target {
                name: "postgres",
                store,
                pool,
                redis: None,
                prefix: String::new(),
                cleanup,
            })
        }
        "redis" => {
            let url =
                std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
            let prefix = format!("sm_bench_{}:", std::process::id());
            let backend = RedisBackend::connect(&SecretUrl::new(&url), &prefix, settings)
                .await
                .ok()?;
            let connection = backend.connection();
            let store = Store::new(Arc::new(backend), Arc::new(NoUsers), config).unwrap();
            let key_prefix = prefix.clone();
            let cleanup = Box::new(move || {
                // Every key under the bench prefix, found with SCAN.
                let client = redis::Client::open(url).unwrap();
                let mut c = client.get_connection().unwrap();
                let keys: Vec<String> = redis::Commands::scan_match(&mut c, format!("{prefix}*"))
                    .unwrap()
                    .collect::<redis::RedisResult<_>>()
                    .unwrap();
                for chunk in keys.chunks(1000) {
                    let _: redis::RedisResult<()> = redis::cmd("UNLINK").arg(chunk).query(&mut c);
                }
            });
            Some(Target {
                name: "redis",
                store,
                pool: None,
                redis: Some(connection),
                prefix: key_prefix,
                cleanup,
            })
        }
        _ => None,
    }
}

/// Gives `user` an archive of `n` read messages, dated in the last day, in two statements.
async fn seed_archive(target: &Target, user: UserId, n: i64) {
    if let Some(connection) = &target.redis {
        return seed_redis_archive(target, connection.clone(), user, n).await;
    }
    let Some(pool) = &target.pool else { return };
    let start = chrono::Utc::now().timestamp_micros() - 86_400_000_000;
    let messages = "with recursive g(x) as (select 1 union all select x + 1 from g where x < cast($2 as bigint)) \
                    insert into sm_messages (level, message, extra_tags, url, date_us) \
                    select 21, 'archived', '', null, cast($1 as bigint) + x from g";
    let deliveries = "insert into sm_deliveries (user_id, date_us, message_id, in_inbox) \
                      select cast($1 as bigint), date_us, id, false from sm_messages where message = 'archived'";
    match pool {
        SqlPool::Sqlite(p) => {
            sqlx::query(messages)
                .bind(start)
                .bind(n)
                .execute(p)
                .await
                .unwrap();
            sqlx::query(deliveries)
                .bind(user.0)
                .execute(p)
                .await
                .unwrap();
        }
        SqlPool::Postgres(p) => {
            sqlx::query(messages)
                .bind(start)
                .bind(n)
                .execute(p)
                .await
                .unwrap();
            sqlx::query(deliveries)
                .bind(user.0)
                .execute(p)
                .await
                .unwrap();
            sqlx::query("analyze").execute(p).await.unwrap();
        }
    }
}

/// The Redis form of `seed_archive`: message hashes and archive members written directly in
/// pipelines, in the layout documented in `src/backend/redis.rs` (ids from 10^12 up, far from
/// the counter's).
async fn seed_redis_archive(
    target: &Target,
    mut c: redis::aio::ConnectionManager,
    user: UserId,
    n: i64,
) {
    let start = chrono::Utc::now().timestamp_micros() - 86_400_000_000;
    let archive = format!("{}user:{}:archive", target.prefix, user.0);
    let mut i = 0;
    while i < n {
        let mut pipe = redis::pipe();
        for _ in 0..10_000.min(n - i) {
            i += 1;
            let id = 1_000_000_000_000 + i;
            let date = start + i;
            let member = format!("{date:019}:{id:019}");
            pipe.cmd("HSET")
                .arg(format!("{}message:{id}", target.prefix))
                .arg(&["level", "21", "message", "archived", "extra_tags", ""])
                .arg("date_us")
                .arg(date)
                .arg("member")
                .arg(&member)
                .ignore();
            pipe.cmd("ZADD").arg(&archive).arg(0).arg(&member).ignore();
        }
        pipe.query_async::<()>(&mut c).await.unwrap();
    }
}

/// Whether W3's users are every other id (`BENCH_SPARSE=1`) rather than consecutive.
fn sparse() -> bool {
    std::env::var("BENCH_SPARSE").is_ok_and(|v| v == "1")
}

async fn broadcast(store: &Store, n: i64) -> Duration {
    let step = if sparse() { 2 } else { 1 };
    let users: Vec<UserId> = (1..=n).map(|i| UserId(i * step)).collect();
    let started = Instant::now();
    let d = store
        .add_message_for(&users, msg("broadcast"))
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(d.recipients, n as u64);
    took
}

async fn run(target: &Target, sizes: &[i64], archive: i64) {
    let store = &target.store;
    let backend: &dyn MessageBackend = store.backend();
    let name = target.name;
    // W3
    for &n in sizes {
        let took = broadcast(store, n).await;
        println!(
            "{name:<9} W3 broadcast to {n:>9} {:<12} {:>10.3} s",
            if sparse() { "sparse users" } else { "users" },
            took.as_secs_f64()
        );
    }
    // W4: the user has an inbox of its own (ids far from the broadcast audience)
    let u = UserId(10_000_001);
    let mut lat = Vec::with_capacity(1000);
    for i in 0..1000 {
        let started = Instant::now();
        store
            .add_message_for(&[u], msg(&format!("m{i}")))
            .await
            .unwrap();
        lat.push(started.elapsed());
    }
    lat.sort();
    let mean = lat.iter().sum::<Duration>() / lat.len() as u32;
    println!(
        "{name:<9} W4 add_message_for x1000        mean {:>7.3} ms  p99 {:>7.3} ms",
        ms(mean),
        ms(lat[lat.len() * 99 / 100])
    );
    // W5
    let mut total = Duration::ZERO;
    let rounds = 50;
    let w5 = UserId(10_000_002);
    for r in 0..rounds {
        for i in 0..20 {
            store
                .add_message_for(&[w5], msg(&format!("r{r} m{i}")))
                .await
                .unwrap();
        }
        let started = Instant::now();
        assert_eq!(store.mark_all_read(w5).await.unwrap(), 20);
        total += started.elapsed();
    }
    println!(
        "{name:<9} W5 mark_all_read of 20 unread   mean {:>7.3} ms",
        ms(total / rounds)
    );
    // W6
    let big = UserId(10_000_003);
    let small = UserId(10_000_004);
    seed_archive(target, big, archive).await;
    let archived = archive;
    for i in 0..10 {
        store
            .add_message_for(&[big, small], msg(&format!("unread {i}")))
            .await
            .unwrap();
    }
    let time = |user: UserId| async move {
        let mut best = Duration::MAX;
        for _ in 0..200 {
            let started = Instant::now();
            let inbox = backend
                .inbox_list(user, ListQuery::first(50))
                .await
                .unwrap();
            best = best.min(started.elapsed());
            assert_eq!(inbox.len(), 10);
        }
        best
    };
    let (tb, ts) = (time(big).await, time(small).await);
    println!(
        "{name:<9} W6 inbox list, {archived} archived vs empty   {:.3} ms vs {:.3} ms  ratio {:.2}",
        ms(tb),
        ms(ts),
        tb.as_secs_f64() / ts.as_secs_f64()
    );
}

fn main() {
    let sizes: Vec<i64> = env_list("BENCH_SIZES", "10000,100000")
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    let archive: i64 = std::env::var("BENCH_ARCHIVE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let backends = env_list("BENCH_BACKENDS", "sqlite,postgres,redis");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for name in backends {
        let target = rt.block_on(open(&name));
        let Some(target) = target else {
            println!("{name:<9} skipped (not reachable)");
            continue;
        };
        rt.block_on(run(&target, &sizes, archive));
        (target.cleanup)();
    }
}
