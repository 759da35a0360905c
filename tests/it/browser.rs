//! A real browser against the real reference app: headless Chromium, driven over WebDriver by
//! fantoccini, clicks the inbox buttons and `static/stored-messages.js` answers through the
//! JSON API, without a page load. Rocket's local client cannot run that script; this can.
//!
//! Needs `chromium` and `chromedriver` on PATH (Debian: `apt-get install chromium
//! chromium-driver`). Without them the tests skip with one line, unless
//! `STORED_MESSAGES_REQUIRE_SERVICES=1`, which makes that a failure naming what is missing.

use std::future::Future;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::wd::{Capabilities, TimeoutConfiguration};
use fantoccini::{Client, ClientBuilder, Locator};
use rocket::fairing::AdHoc;
use rocket::tokio::io::{AsyncReadExt, AsyncWriteExt};
use rocket::tokio::net::TcpStream;
use rocket::tokio::sync::oneshot;
use rocket::tokio::task::JoinHandle;
use rocket::tokio::time::{sleep, timeout};
use serde_json::json;
use stored_messages::{Level, ListQuery, MessageId, NewMessage, Store, UserId};

use crate::common::{service_available, test_figment, TestApp};

/// How long a page may take to show what a test waits for.
const WAIT: Duration = Duration::from_secs(10);
/// How long the server, chromedriver and Chromium may take to start on a busy machine.
const STARTUP: Duration = Duration::from_secs(30);
/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(50);

/// The flags every headless Chromium of this project runs with (plus a fresh profile).
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mark_read_button_updates_the_count_in_place_and_reads_exactly_that_message() {
    let Some(session) = Session::start(3).await else {
        return;
    };
    let client = &session.client;

    // arrange: logged in, on the home page that keeps messages unread
    session.login_and_open_home().await;
    assert_eq!(unread_count_text(client).await.as_deref(), Some("3"));
    let url_before = client.current_url().await.unwrap();
    mark_page_as_loaded(client).await;
    let first = client
        .find(Locator::Css("ul.stored-messages-inbox li.message"))
        .await
        .expect("an inbox item");
    let clicked: MessageId = first
        .attr("data-id")
        .await
        .unwrap()
        .expect("inbox items carry data-id")
        .parse()
        .unwrap();

    // act
    first
        .find(Locator::Css("form.sm-mark-read button"))
        .await
        .expect("a \"Mark read\" button in the item")
        .click()
        .await
        .unwrap();

    // assert: the count drops in place, the item leaves the list, the page stays
    wait_for_unread_count(client, "2").await;
    assert_same_page(client, &url_before).await;
    let still_listed = client
        .find_all(Locator::Css(&format!(
            "ul.stored-messages-inbox li[data-id=\"{clicked}\"]"
        )))
        .await
        .unwrap();
    assert!(still_listed.is_empty(), "message {clicked} is still listed");
    let listed = client
        .find_all(Locator::Css("ul.stored-messages-inbox li.message"))
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);

    // assert: in the backend, exactly that message was read
    let mut expected = session.messages.clone();
    expected.retain(|id| *id != clicked);
    assert_eq!(session.inbox_ids().await, expected);
    assert_eq!(
        session.archive_len().await,
        3,
        "the archive keeps all three"
    );

    session.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mark_all_read_button_drops_the_count_to_zero_in_place() {
    let Some(session) = Session::start(3).await else {
        return;
    };
    let client = &session.client;

    // arrange
    session.login_and_open_home().await;
    assert_eq!(unread_count_text(client).await.as_deref(), Some("3"));
    let url_before = client.current_url().await.unwrap();
    mark_page_as_loaded(client).await;

    // act
    client
        .find(Locator::Css("form.sm-mark-all-read button"))
        .await
        .expect("a \"Mark all read\" button")
        .click()
        .await
        .unwrap();

    // assert: count 0, the list says it is empty, its button is gone, the page stays
    wait_for_unread_count(client, "0").await;
    assert_same_page(client, &url_before).await;
    let empty = client
        .find(Locator::Css("ul.stored-messages-inbox li.empty"))
        .await
        .expect("the empty-list note");
    assert_eq!(empty.text().await.unwrap(), "No unread messages.");
    assert!(client
        .find_all(Locator::Css(
            "ul.stored-messages-inbox li.message, form.sm-mark-all-read"
        ))
        .await
        .unwrap()
        .is_empty());

    // assert: in the backend, the inbox is empty and the archive full
    assert!(session.inbox_ids().await.is_empty());
    assert_eq!(session.archive_len().await, 3);

    session.stop().await;
}

/// The reference app on a port of its own, a logged-in-able user with stored messages, and a
/// WebDriver session on a fresh Chromium.
struct Session {
    client: Client,
    base: String,
    store: Store,
    user: UserId,
    /// The user's stored messages, oldest first.
    messages: Vec<MessageId>,
    processes: Processes,
    /// Owns the database directory; dropped after the server is told to stop.
    _app: TestApp,
}

impl Session {
    /// Starts everything, or `None` (after one line) when the browser tools are missing.
    async fn start(message_count: usize) -> Option<Session> {
        let (chromium, chromedriver) = browser_tools()?;

        // the app's database, with the user in it before launch (so no first admin is made)
        let app = TestApp::sqlite().await?;
        let user = app.user("alice", false).await.user_id();

        // the server, on a port the OS picks and liftoff reports
        let (port_tx, port_rx) = oneshot::channel();
        let figment = test_figment(&app.url)
            .merge(("port", 0))
            .merge(("shutdown.ctrlc", false))
            .merge(("shutdown.signals", Vec::<String>::new()))
            .merge(("shutdown.grace", 1))
            .merge(("shutdown.mercy", 1));
        let rocket = stored_messages::app::rocket_from(figment)
            .attach(AdHoc::on_liftoff("report the port", move |rocket| {
                let port = rocket.config().port;
                Box::pin(async move {
                    let _ = port_tx.send(port);
                })
            }))
            .ignite()
            .await
            .expect("the app ignites");
        let store = rocket.state::<Store>().expect("store is managed").clone();
        let mut processes = Processes {
            shutdown: Some(rocket.shutdown()),
            server: Some(rocket::tokio::spawn(rocket.launch())),
            chromedriver: None,
            driver_port: 0,
            session_id: None,
            profile: tempfile::tempdir().unwrap(),
        };
        let port = timeout(STARTUP, port_rx)
            .await
            .expect("the server lifts off in time")
            .expect("the server lifts off");
        let base = format!("http://127.0.0.1:{port}");
        eventually("the app to answer /health", STARTUP, || async {
            http_get(port, "/health")
                .await
                .filter(|(status, _)| *status == 200)
                .ok_or("no answer yet")
        })
        .await;

        // the user's messages
        let mut messages = Vec::new();
        for i in 1..=message_count {
            let text = format!("Stored message {i} for the browser");
            let delivery = store
                .add_message_for(&[user], NewMessage::new(Level::STORED_INFO, &text).unwrap())
                .await
                .unwrap();
            messages.push(delivery.message.id);
        }

        // chromedriver, on a port that was free a moment ago
        let driver_port = free_port();
        processes.driver_port = driver_port;
        let child = Command::new(&chromedriver)
            .arg(format!("--port={driver_port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        processes.chromedriver = Some(child);
        eventually("chromedriver to be ready", STARTUP, || {
            if let Some(Ok(Some(status))) = processes.chromedriver.as_mut().map(Child::try_wait) {
                panic!("chromedriver exited early with {status}");
            }
            async {
                http_get(driver_port, "/status")
                    .await
                    .filter(|(status, body)| *status == 200 && body.contains("\"ready\":true"))
                    .ok_or("not ready yet")
            }
        })
        .await;

        // a Chromium with a fresh profile
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|f| f.to_string()).collect();
        args.push(format!(
            "--user-data-dir={}",
            processes.profile.path().display()
        ));
        let mut capabilities = Capabilities::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": chromium, "args": args }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = timeout(
            STARTUP,
            ClientBuilder::new(connector)
                .capabilities(capabilities)
                .connect(&format!("http://127.0.0.1:{driver_port}")),
        )
        .await
        .expect("chromedriver opens a session in time")
        .expect("chromedriver opens a session");
        processes.session_id = client.session_id().await.unwrap();
        client
            .update_timeouts(TimeoutConfiguration::new(
                Some(WAIT),
                Some(STARTUP),
                Some(Duration::ZERO),
            ))
            .await
            .unwrap();

        Some(Session {
            client,
            base,
            store,
            user,
            messages,
            processes,
            _app: app,
        })
    }

    /// Logs in through the form, then opens `/?keep=1`, which shows the inbox and keeps it
    /// unread (plain `/` would mark everything it shows read).
    async fn login_and_open_home(&self) {
        let client = &self.client;
        client
            .goto(&format!("{}/login?next=%2F%3Fkeep%3D1", self.base))
            .await
            .unwrap();
        client
            .find(Locator::Id("username"))
            .await
            .unwrap()
            .send_keys("alice")
            .await
            .unwrap();
        client
            .find(Locator::Id("password"))
            .await
            .unwrap()
            .send_keys("password123")
            .await
            .unwrap();
        client
            .find(Locator::Css("form.card button[type=submit]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        eventually("the login to redirect home", WAIT, || async {
            let url = client.current_url().await.map_err(|e| e.to_string())?;
            if url.path() == "/" {
                Ok(())
            } else {
                Err(format!("still at {url}"))
            }
        })
        .await;
        client
            .goto(&format!("{}/?keep=1", self.base))
            .await
            .unwrap();
        let logout = client
            .find(Locator::Css("header.site form button"))
            .await
            .expect("a logout button once logged in");
        assert_eq!(logout.text().await.unwrap(), "Log out alice");
    }

    async fn inbox_ids(&self) -> Vec<MessageId> {
        self.store
            .backend()
            .inbox_list(self.user, ListQuery::ALL)
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.id)
            .collect()
    }

    async fn archive_len(&self) -> usize {
        self.store
            .backend()
            .archive_list(self.user, ListQuery::ALL)
            .await
            .unwrap()
            .len()
    }

    /// Ends the WebDriver session (Chromium quits), stops chromedriver and the server, and
    /// checks the server really ended.
    async fn stop(mut self) {
        self.client.close().await.expect("the browser session ends");
        self.processes.session_id = None;
        let server = self.processes.server.take();
        drop(self.processes);
        if let Some(server) = server {
            timeout(STARTUP, server)
                .await
                .expect("the server stops in time")
                .expect("the server task did not panic")
                .expect("the server shut down cleanly");
        }
    }
}

/// What the browser tests start, stopped on drop, so also when an assertion fails.
struct Processes {
    shutdown: Option<rocket::Shutdown>,
    server: Option<JoinHandle<Result<rocket::Rocket<rocket::Ignite>, rocket::Error>>>,
    chromedriver: Option<Child>,
    driver_port: u16,
    session_id: Option<String>,
    profile: tempfile::TempDir,
}

impl Drop for Processes {
    fn drop(&mut self) {
        // A session still open means the test failed before `stop`: end it the blocking way
        // (the runtime may be unwinding) so chromedriver quits Chromium before it goes itself.
        if let Some(id) = self.session_id.take() {
            delete_session(self.driver_port, &id);
        }
        if let Some(mut driver) = self.chromedriver.take() {
            let _ = driver.kill();
            let _ = driver.wait();
        }
        if let Some(shutdown) = self.shutdown.take() {
            shutdown.notify();
        }
    }
}

/// `chromium` and `chromedriver` from PATH, or `None` after the skip line (or a panic
/// naming what is missing when services are required).
fn browser_tools() -> Option<(PathBuf, PathBuf)> {
    let chromium = on_path("chromium");
    let chromedriver = on_path("chromedriver");
    let missing: Vec<&str> = [("chromium", &chromium), ("chromedriver", &chromedriver)]
        .into_iter()
        .filter(|(_, found)| found.is_none())
        .map(|(name, _)| name)
        .collect();
    let name = format!(
        "{} on PATH (Debian packages chromium, chromium-driver)",
        missing.join(" and ")
    );
    if !service_available(&name, missing.is_empty()) {
        return None;
    }
    Some((chromium?, chromedriver?))
}

fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// A port nobody listened on a moment ago (chromedriver needs a number up front).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free local port")
        .port()
}

/// A plain GET on 127.0.0.1: the status and the body, or `None` if nothing answers. HTTP/1.1,
/// because chromedriver refuses 1.0 requests.
async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        let mut chunk = [0; 4096];
        loop {
            let read = stream.read(&mut chunk).await.ok()?;
            response.extend_from_slice(&chunk[..read]);
            if let Some(complete) = complete_response(&response) {
                return Some(complete);
            }
            if read == 0 {
                return None;
            }
        }
    };
    timeout(Duration::from_secs(2), exchange).await.ok()?
}

/// The status and body of `bytes` once they hold a whole response, by its `Content-Length`
/// (chromedriver answers `Connection: close` and still keeps the connection open).
fn complete_response(bytes: &[u8]) -> Option<(u16, String)> {
    let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&bytes[..head_end]);
    let body = &bytes[head_end + 4..];
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let length: usize = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if name.trim().eq_ignore_ascii_case("content-length") {
            value.trim().parse().ok()
        } else {
            None
        }
    })?;
    (body.len() >= length).then(|| (status, String::from_utf8_lossy(body).into_owned()))
}

/// Ends a WebDriver session without a runtime (from `Drop`); errors are moot by then.
fn delete_session(port: u16, id: &str) {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return;
    };
    let _ = stream.set_read_timeout(Some(WAIT));
    let _ = stream.set_write_timeout(Some(WAIT));
    let request = format!(
        "DELETE /session/{id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return;
    }
    // Wait for the answer: chromedriver answers once Chromium has quit.
    let mut response = Vec::new();
    let mut chunk = [0; 4096];
    while let Ok(read @ 1..) = stream.read(&mut chunk) {
        response.extend_from_slice(&chunk[..read]);
        if complete_response(&response).is_some() {
            break;
        }
    }
}

/// Polls `check` until it succeeds, or fails the test after `limit` with the last reason.
async fn eventually<T, E, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(reason) if Instant::now() >= deadline => {
                panic!("gave up waiting {limit:?} for {what}: {reason}")
            }
            Err(_) => sleep(POLL).await,
        }
    }
}

/// The text of the header's unread count, if the page has one.
async fn unread_count_text(client: &Client) -> Option<String> {
    let count = client
        .find(Locator::Css("[data-unread-count]"))
        .await
        .ok()?;
    Some(count.text().await.ok()?.trim().to_string())
}

async fn wait_for_unread_count(client: &Client, expected: &str) {
    eventually(
        &format!("the unread count to show {expected}"),
        WAIT,
        || async {
            match unread_count_text(client).await {
                Some(text) if text == expected => Ok(()),
                other => Err(format!("it shows {other:?}")),
            }
        },
    )
    .await;
}

/// Leaves a mark in the page's JavaScript state; any page load wipes it.
async fn mark_page_as_loaded(client: &Client) {
    client
        .execute("window.storedMessagesTestMark = true;", vec![])
        .await
        .unwrap();
}

/// The page was not reloaded or left since [`mark_page_as_loaded`].
async fn assert_same_page(client: &Client, url_before: &url::Url) {
    let mark = client
        .execute("return window.storedMessagesTestMark === true;", vec![])
        .await
        .unwrap();
    assert_eq!(mark, json!(true), "the page was reloaded");
    assert_eq!(&client.current_url().await.unwrap(), url_before);
}
