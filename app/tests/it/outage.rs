//! The store through a TCP proxy the test controls: connections reset while the store is up,
//! a store that accepts and then says nothing, and one whose old connections stay frozen
//! after it came back. Requests answer 503 within the configured timeout (never hang), and
//! recover by themselves.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rocket::http::Status;
use rocket::tokio::io::{AsyncReadExt, AsyncWriteExt};
use rocket::tokio::net::{TcpListener, TcpStream};
use rocket::tokio::task::JoinHandle;

use crate::common::TestApp;

/// The proxy's open connections: each one's task, and whether it is frozen.
type Connections = Arc<Mutex<Vec<(JoinHandle<()>, Arc<AtomicBool>)>>>;

/// A TCP forwarder to `target`: `reset` drops every connection, `freeze` stops forwarding on
/// every connection open now (for good: they stay frozen), new connections always flow.
struct Proxy {
    port: u16,
    connections: Connections,
    _accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections: Connections = Arc::default();
        let list = Arc::clone(&connections);
        let accept = rocket::tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&target).await else {
                    continue;
                };
                let frozen = Arc::new(AtomicBool::new(false));
                let flag = Arc::clone(&frozen);
                let task = rocket::tokio::spawn(async move {
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    // Both directions to their end; a frozen one never ends, and holds its
                    // sockets open.
                    rocket::tokio::join!(forward(cr, sw, &flag), forward(sr, cw, &flag));
                });
                list.lock().unwrap().push((task, frozen));
            }
        });
        Proxy {
            port,
            connections,
            _accept: accept,
        }
    }

    /// Drops every connection (both sides see it closed).
    fn reset(&self) {
        for (task, _) in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Stops forwarding on every open connection, which stays open, silent.
    fn freeze(&self) {
        for (_, frozen) in self.connections.lock().unwrap().iter() {
            frozen.store(true, Ordering::SeqCst);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.reset();
        self._accept.abort();
    }
}

/// Copies `from` to `to` until either closes; once `frozen`, forwards nothing more and
/// never returns (the connection stays open and silent).
async fn forward(
    mut from: rocket::tokio::net::tcp::OwnedReadHalf,
    mut to: rocket::tokio::net::tcp::OwnedWriteHalf,
    frozen: &AtomicBool,
) {
    let mut buf = [0u8; 16384];
    while let Ok(n) = from.read(&mut buf).await {
        if frozen.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// `GET /messages/count` of `b`, or `None` if it did not answer within a minute (a hang).
async fn count(b: &crate::common::Browser) -> Option<Status> {
    let request = b.client.get("/messages/count").dispatch();
    rocket::tokio::time::timeout(Duration::from_secs(60), request)
        .await
        .ok()
        .map(|r| r.status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outages_answer_503_promptly_and_heal() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    app.user("alice", false).await;
    let mut url = url::Url::parse(&app.url).unwrap();
    let target = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
    let proxy = Proxy::start(target).await;
    url.set_port(Some(proxy.port)).unwrap();
    let figment = app
        .figment()
        .merge(("databases.stored_messages.url", url.as_str()))
        .merge(("databases.stored_messages.connect_timeout", 2));
    let b = app
        .browser_with(stored_messages_app::rocket_from(figment))
        .await;
    b.login_as("alice").await;
    freeze_heal_and_reset(&proxy, &b).await;
}

/// The same with the messages in Redis (the users stay in SQLite): its one multiplexed
/// connection and the change feed's subscription both go through the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outages_answer_503_promptly_and_heal() {
    let Some(app) = TestApp::redis().await else {
        return;
    };
    app.user("alice", false).await;
    let figment = app.figment();
    let mut url = url::Url::parse(
        &figment
            .extract_inner::<String>("stored_messages.redis_url")
            .unwrap(),
    )
    .unwrap();
    let target = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(6379));
    let proxy = Proxy::start(target).await;
    url.set_port(Some(proxy.port)).unwrap();
    let figment = figment
        .merge(("stored_messages.redis_url", url.as_str()))
        .merge(("stored_messages.redis_timeout_secs", 2));
    let b = app
        .browser_with(stored_messages_app::rocket_from(figment))
        .await;
    b.login_as("alice").await;
    freeze_heal_and_reset(&proxy, &b).await;
}

/// Counts through `proxy`: 503 (not a hang) while every open connection is frozen, healed
/// by itself once new connections flow, and unharmed by every connection being dropped.
async fn freeze_heal_and_reset(proxy: &Proxy, b: &crate::common::Browser) {
    for _ in 0..3 {
        assert_eq!(count(b).await, Some(Status::Ok));
    }
    // Frozen: every open connection stops answering. 503, not a hang, once no sync is
    // recent enough to vouch for the cache (until then, answering from it is correct).
    proxy.freeze();
    rocket::tokio::time::sleep(stored_messages::changes::RECENT_SYNC * 2).await;
    assert_eq!(count(b).await, Some(Status::ServiceUnavailable));
    // New connections flow again while the old ones stay frozen: the app recovers by itself.
    let mut healed = false;
    for _ in 0..20 {
        match count(b).await {
            Some(Status::Ok) => {
                healed = true;
                break;
            }
            Some(Status::ServiceUnavailable) => {
                rocket::tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => panic!("{other:?} while healing"),
        }
    }
    assert!(
        healed,
        "still 503 twenty requests after the store came back"
    );
    // Every connection dropped while the store is up: the next requests do not pay for the
    // broken ones that were kept.
    proxy.reset();
    for round in 0..6 {
        assert_eq!(
            count(b).await,
            Some(Status::Ok),
            "round {round} after a reset"
        );
    }
}
