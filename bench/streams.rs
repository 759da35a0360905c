//! The live-streams benchmark (`bench/streams.sh`): holds one `GET /messages/stream` per
//! user open against one or more running servers, then measures
//!
//! - **idle streams**: how many are open and what each costs the servers (their resident
//!   memory after, minus before, divided by the streams);
//! - **latency to one user**: a message stored through the request-free `Store` (this
//!   process, a third one beside the servers), from the moment `add_message_for` returned to
//!   the moment the user's stream delivered it; p50 and p99 over `--samples` sends;
//! - **a broadcast to everyone**: from `broadcast_message`'s return until every stream
//!   delivered it (and its p50/p99 over the streams); `--broadcasts` of them (3 by default),
//!   a second apart, each on its own line, then their median.
//!
//! ```text
//! cargo run --release --example bench-streams -- --servers 127.0.0.1:8000,127.0.0.1:8001 \
//!     --pids 1234,1235 --cookies /tmp/cookies.txt --samples 200
//! ```
//!
//! The cookies file is bench-seed's (one `Cookie:` value per line; user `benchNNNNN` on line
//! NNNNN); it reads the servers' configuration (`ROCKET_*` variables) to reach their store.
//! With `--idle-only` it opens the streams, prints their memory and stops: that is how
//! `bench/streams.sh` measures `bench-sse-floor`, a bare Rocket stream, in the same run.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rocket::tokio::io::{AsyncReadExt, AsyncWriteExt};
use rocket::tokio::net::{TcpSocket, TcpStream};
use rocket::tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use stored_messages::{Level, NewMessage, Store};
use stored_messages_app::users::AppHost;

struct Args {
    servers: Vec<String>,
    pids: Vec<u32>,
    cookies: String,
    samples: usize,
    broadcasts: usize,
    /// Only the idle streams (no store, no users): for `bench-sse-floor`.
    idle_only: bool,
    /// The most streams being opened at once (0: 100 every 5 ms, however many are still
    /// waiting for their first event).
    opening: usize,
}

fn args() -> Result<Args, String> {
    let mut args = Args {
        servers: vec!["127.0.0.1:8000".into()],
        pids: Vec::new(),
        cookies: "cookies.txt".into(),
        samples: 200,
        broadcasts: 3,
        idle_only: false,
        opening: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--idle-only" {
            args.idle_only = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--servers" => args.servers = value.split(',').map(str::to_string).collect(),
            "--pids" => {
                args.pids = value
                    .split(',')
                    .map(|p| p.parse().map_err(|e| format!("--pids: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--cookies" => args.cookies = value,
            "--samples" => args.samples = value.parse().map_err(|e| format!("--samples: {e}"))?,
            "--broadcasts" => {
                args.broadcasts = value.parse().map_err(|e| format!("--broadcasts: {e}"))?
            }
            "--opening" => args.opening = value.parse().map_err(|e| format!("--opening: {e}"))?,
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(args)
}

/// Resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A delivered `message` event: which stream, its text, when.
struct Delivery {
    stream: usize,
    text: String,
    at: Instant,
}

/// Opens the stream of one user from its own source address (127.0.0.x, so that ten
/// thousands of connections do not run out of ports), waits for its first event, then
/// reports every `message` event's text.
async fn open_stream(
    index: usize,
    server: String,
    cookie: String,
    deliveries: mpsc::UnboundedSender<Delivery>,
    ready: mpsc::UnboundedSender<usize>,
    mut opening: Option<OwnedSemaphorePermit>,
) -> Result<(), String> {
    let (mut connection, head, mut buffer) = match ask(index, &server, "/messages/stream", &cookie)
        .await?
    {
        // The stream listener (`stream_address`): follow the redirect, as browsers do.
        (_, head, _) if head.starts_with("HTTP/1.1 307") || head.starts_with("HTTP/1.0 307") => {
            let location = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("location")
                        .then(|| value.trim().to_string())
                })
                .ok_or_else(|| format!("stream {index}: a redirect without a location"))?;
            let rest = location
                .strip_prefix("http://")
                .ok_or_else(|| format!("stream {index}: redirected to {location}"))?;
            let (address, target) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            ask(index, address, target, &cookie).await?
        }
        answer => answer,
    };
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(format!("stream {index}: {head}"));
    }
    let mut chunk = vec![0u8; 4096];
    let mut first = true;
    loop {
        while let Some((block, rest)) = buffer.split_once("\n\n") {
            let block = block.to_string();
            buffer = rest.to_string();
            let event = block.lines().find_map(|l| l.strip_prefix("event:"));
            let data = block.lines().find_map(|l| l.strip_prefix("data:"));
            if event.is_some() && first {
                first = false;
                opening.take();
                let _ = ready.send(index);
            }
            if let (Some("message"), Some(data)) = (event, data) {
                let text = serde_json::from_str::<serde_json::Value>(data)
                    .ok()
                    .and_then(|v| v["message"].as_str().map(str::to_string))
                    .unwrap_or_default();
                let _ = deliveries.send(Delivery {
                    stream: index,
                    text,
                    at: Instant::now(),
                });
            }
        }
        let n = connection
            .read(&mut chunk)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("stream {index} ended: {buffer}"));
        }
        buffer.push_str(&String::from_utf8_lossy(&chunk[..n]));
    }
}

/// Sends `GET target` to `server` from the stream's own source address (127.0.0.x, so that
/// ten thousands of connections do not run out of ports); returns the connection, the
/// answer's head and what followed it.
async fn ask(
    index: usize,
    server: &str,
    target: &str,
    cookie: &str,
) -> Result<(TcpStream, String, String), String> {
    let source: std::net::SocketAddr = format!("127.0.0.{}:0", 2 + index % 200)
        .parse()
        .map_err(|e| format!("{e}"))?;
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket.bind(source).map_err(|e| e.to_string())?;
    let address = server.parse().map_err(|e| format!("{server}: {e}"))?;
    let mut connection: TcpStream = socket
        .connect(address)
        .await
        .map_err(|e| format!("connecting to {server}: {e}"))?;
    let request = format!(
        "GET {target} HTTP/1.0\r\nHost: {server}\r\nAccept: text/event-stream\r\n\
         Cookie: {cookie}\r\n\r\n"
    );
    connection
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buffer = String::new();
    let mut chunk = vec![0u8; 4096];
    loop {
        if let Some((head, rest)) = buffer.split_once("\r\n\r\n") {
            let (head, rest) = (head.to_string(), rest.to_string());
            return Ok((connection, head, rest));
        }
        let n = connection
            .read(&mut chunk)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!(
                "stream {index}: the answer ended in its head: {buffer}"
            ));
        }
        buffer.push_str(&String::from_utf8_lossy(&chunk[..n]));
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Opens one stream per cookie, spread over the servers, and prints what the idle streams
/// cost the servers' memory. The streams' `message` events arrive on the receiver.
async fn idle_streams(
    args: &Args,
    cookies: &[String],
) -> Result<mpsc::UnboundedReceiver<Delivery>, String> {
    let streams = cookies.len();
    let before: u64 = args.pids.iter().map(|p| rss_kib(*p)).sum();
    let (deliveries_tx, deliveries) = mpsc::unbounded_channel();
    let (ready_tx, mut ready) = mpsc::unbounded_channel();
    let opening = Instant::now();
    let bound = Arc::new(Semaphore::new(args.opening));
    for (index, cookie) in cookies.iter().enumerate() {
        let server = args.servers[index % args.servers.len()].clone();
        let (cookie, deliveries, ready) = (cookie.clone(), deliveries_tx.clone(), ready_tx.clone());
        let permit = match args.opening {
            0 => None,
            _ => Some(
                Arc::clone(&bound)
                    .acquire_owned()
                    .await
                    .map_err(|e| e.to_string())?,
            ),
        };
        rocket::tokio::spawn(async move {
            if let Err(e) = open_stream(index, server, cookie, deliveries, ready, permit).await {
                eprintln!("bench-streams: {e}");
            }
        });
        if args.opening == 0 && index % 100 == 99 {
            // Let the servers keep up with the openings.
            rocket::tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let mut open = 0;
    while open < streams {
        match rocket::tokio::time::timeout(Duration::from_secs(60), ready.recv()).await {
            Ok(Some(_)) => open += 1,
            _ => return Err(format!("only {open} of {streams} streams opened")),
        }
    }
    let opened_in = opening.elapsed();
    rocket::tokio::time::sleep(Duration::from_secs(2)).await;
    let after: u64 = args.pids.iter().map(|p| rss_kib(*p)).sum();
    let pace = match args.opening {
        0 => String::new(),
        n => format!(", at most {n} opening at once"),
    };
    println!(
        "idle streams   {streams} open on {} server(s) in {:.1} s{pace}; server memory {:.1} MB → {:.1} MB, {:.1} KiB per stream",
        args.servers.len(),
        opened_in.as_secs_f64(),
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        after.saturating_sub(before) as f64 / streams as f64
    );

    Ok(deliveries)
}

async fn bench(args: Args) -> Result<(), String> {
    let cookies: Vec<String> = std::fs::read_to_string(&args.cookies)
        .map_err(|e| format!("{}: {e}", args.cookies))?
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    let streams = cookies.len();
    if args.idle_only {
        // Held open until the figures are printed.
        let _deliveries = idle_streams(&args, &cookies).await?;
        return Ok(());
    }
    let figment = rocket::Config::figment().merge(("stored_messages.inbox_cache_messages", 0));
    let users = Arc::new(stored_messages_app::connect_users(&figment).await?);
    let store = Store::connect(&figment, Arc::new(AppHost::new(users.clone())))
        .await
        .map_err(|e| stored_messages::report(&e))?;
    let mut ids = Vec::with_capacity(streams);
    for i in 1..=streams {
        let name = format!("bench{i:05}");
        let user = users
            .by_name(&name)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no user {name}: seed first"))?;
        ids.push(user.user_id());
    }

    let mut deliveries = idle_streams(&args, &cookies).await?;

    // latency to one user
    let mut latencies = Vec::with_capacity(args.samples);
    for sample in 0..args.samples {
        let index = (sample * 7919) % streams;
        let text = format!("latency sample {sample}");
        let message = NewMessage::new(Level::STORED_INFO, &text).map_err(|e| e.to_string())?;
        store
            .add_message_for(&[ids[index]], message)
            .await
            .map_err(|e| stored_messages::report(&e))?;
        let returned = Instant::now();
        loop {
            let delivery = rocket::tokio::time::timeout(Duration::from_secs(10), deliveries.recv())
                .await
                .map_err(|_| format!("sample {sample} never arrived"))?
                .ok_or("streams closed")?;
            if delivery.stream == index && delivery.text == text {
                latencies.push(delivery.at.saturating_duration_since(returned));
                break;
            }
        }
    }
    latencies.sort();
    println!(
        "one user       {} sends: write returned → event delivered  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        latencies.len(),
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 99.0)),
        ms(*latencies.last().unwrap_or(&Duration::ZERO))
    );

    // broadcasts to everyone
    let mut reached_all = Vec::with_capacity(args.broadcasts);
    for round in 1..=args.broadcasts {
        rocket::tokio::time::sleep(Duration::from_secs(1)).await;
        let text = format!("broadcast {round} to everyone");
        let message = NewMessage::new(Level::STORED_INFO, &text).map_err(|e| e.to_string())?;
        let sent = Instant::now();
        store
            .broadcast_message(message)
            .await
            .map_err(|e| stored_messages::report(&e))?;
        let returned = Instant::now();
        let mut arrivals: HashMap<usize, Duration> = HashMap::with_capacity(streams);
        while arrivals.len() < streams {
            let delivery = rocket::tokio::time::timeout(Duration::from_secs(60), deliveries.recv())
                .await
                .map_err(|_| {
                    format!(
                        "broadcast {round} reached {} of {streams} streams",
                        arrivals.len()
                    )
                })?
                .ok_or("streams closed")?;
            if delivery.text == text {
                arrivals.insert(
                    delivery.stream,
                    delivery.at.saturating_duration_since(returned),
                );
            }
        }
        let mut arrivals: Vec<Duration> = arrivals.into_values().collect();
        arrivals.sort();
        let all = *arrivals.last().unwrap_or(&Duration::ZERO);
        reached_all.push(all);
        println!(
            "broadcast {round}    stored in {:.0} ms; after it returned, every one of {streams} streams had it within {:.0} ms (p50 {:.0} ms, p99 {:.0} ms)",
            ms(returned - sent),
            ms(all),
            ms(percentile(&arrivals, 50.0)),
            ms(percentile(&arrivals, 99.0))
        );
    }
    reached_all.sort();
    if let Some(median) = reached_all.get(reached_all.len() / 2) {
        println!(
            "broadcasts     median of {}: every stream had it within {:.0} ms",
            reached_all.len(),
            ms(*median)
        );
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let result = args().and_then(|args| {
        rocket::tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?
            .block_on(bench(args))
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-streams: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
