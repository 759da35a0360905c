//! Live streams (`GET /messages/stream`) across processes: every write, by the CLI or by
//! another server on the same store, reaches an open stream; a reconnect with `Last-Event-ID`
//! replays what was missed or asks for a resync; a killed change feed loses nothing; SIGTERM
//! ends the streams and the server.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{get, random_id, Backend, Browser, Server, Shared, PASSWORD};

/// How long a test waits for an event before it fails.
const EVENT_WAIT: Duration = Duration::from_secs(10);

/// One server-sent event.
#[derive(Debug, Clone)]
struct Sse {
    id: Option<String>,
    event: String,
    data: Value,
}

/// A stream read over a raw HTTP/1.0 connection (no chunked framing to undo).
struct EventReader {
    connection: TcpStream,
    buffer: String,
    headers: Vec<(String, String)>,
    status: u16,
    /// Where the stream was served: the server, or its stream listener after a redirect.
    address: String,
    /// The redirect followed to get there, if any.
    redirected: Option<String>,
}

impl EventReader {
    /// Opens `GET /messages/stream` as a browser does: following a redirect to the stream
    /// listener, with the same headers (its cookies too: they are not bound to a port).
    async fn open(server: &Server, cookie: &str, last_event_id: Option<&str>) -> EventReader {
        let mut reader =
            EventReader::request(&server.address, "/messages/stream", cookie, last_event_id).await;
        if reader.status == 307 {
            let location = reader
                .header("location")
                .expect("a redirect's location")
                .to_string();
            let rest = location
                .strip_prefix("http://")
                .unwrap_or_else(|| panic!("the listener's URL: {location}"));
            let (address, target) = rest.split_at(rest.find('/').unwrap());
            let mut followed = EventReader::request(address, target, cookie, last_event_id).await;
            followed.redirected = Some(location);
            reader = followed;
        }
        reader
    }

    async fn request(
        address: &str,
        target: &str,
        cookie: &str,
        last_event_id: Option<&str>,
    ) -> EventReader {
        let mut connection = TcpStream::connect(address).await.unwrap();
        let last = last_event_id
            .map(|id| format!("Last-Event-ID: {id}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET {target} HTTP/1.0\r\nHost: {address}\r\nAccept: text/event-stream\r\n\
             Cookie: {cookie}\r\n{last}\r\n"
        );
        connection.write_all(request.as_bytes()).await.unwrap();
        let mut reader = EventReader {
            connection,
            buffer: String::new(),
            headers: Vec::new(),
            status: 0,
            address: address.to_string(),
            redirected: None,
        };
        while !reader.buffer.contains("\r\n\r\n") {
            assert!(reader.fill().await, "the stream's head: {}", reader.buffer);
        }
        let (head, rest) = reader.buffer.split_once("\r\n\r\n").unwrap();
        let mut lines = head.lines();
        reader.status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        reader.headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        reader.buffer = rest.to_string();
        reader
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Reads more; `false` at the end of the stream.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout(EVENT_WAIT, self.connection.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.buffer.push_str(&String::from_utf8_lossy(&chunk[..n]));
                true
            }
            Err(_) => panic!("no event within {EVENT_WAIT:?}; have {:?}", self.buffer),
        }
    }

    /// The next event (comments and `retry:` skipped); `None` when the stream ended.
    async fn next(&mut self) -> Option<Sse> {
        loop {
            while let Some((block, rest)) = self.buffer.split_once("\n\n") {
                let block = block.to_string();
                self.buffer = rest.to_string();
                let (mut id, mut event, mut data) = (None, String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if !event.is_empty() {
                    let data = serde_json::from_str(&data).unwrap_or(Value::Null);
                    return Some(Sse { id, event, data });
                }
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next event, which must be `event`.
    async fn expect(&mut self, event: &str) -> Sse {
        let next = self.next().await.expect("the stream is open");
        assert_eq!(next.event, event, "{next:?}");
        next
    }
}

process_tests!(
    a_stream_hears_every_process,
    a_reconnect_replays_what_it_missed_or_resyncs,
    sigterm_ends_the_streams_and_the_server,
    streams_closed_by_their_clients_free_what_they_held,
    ending_a_session_ends_its_streams_on_every_server,
);

/// The same, with the servers' streams served by the stream listener (`stream_address`):
/// `GET /messages/stream` redirects there, and everything above holds as well.
macro_rules! with_listener {
    ($($backend:ident),*) => {
        $(process_tests!(
            @backend $backend,
            a_stream_hears_every_process,
            a_reconnect_replays_what_it_missed_or_resyncs,
            sigterm_ends_the_streams_and_the_server,
            streams_closed_by_their_clients_free_what_they_held,
            ending_a_session_ends_its_streams_on_every_server,
            the_stream_listener_trusts_tickets_only
        );)*
    };
}
with_listener!(sqlite_listener, postgres_listener, redis_listener);

/// A stream lives no longer than its session: after a logout on one server, or the CLI's
/// `endsessions` (another process), the session's streams on both servers end without
/// sending what arrives next; another user's stream goes on.
async fn ending_a_session_ends_its_streams_on_every_server(shared: &Shared) {
    shared.cli(&["createuser", "alice"], &format!("{PASSWORD}\n"));
    shared.cli(&["createuser", "bob"], &format!("{PASSWORD}\n"));
    let one = shared.serve(&format!("sm_e1_{}", random_id())).await;
    let two = shared.serve(&format!("sm_e2_{}", random_id())).await;
    shared.wait_feeds(&[&one, &two]).await;
    let bob = Browser::login(&two, "bob", PASSWORD).await;
    let mut bobs = EventReader::open(&one, &bob.cookie, None).await;
    bobs.expect("count").await;

    for (round, how) in ["logout", "endsessions"].into_iter().enumerate() {
        let alice = Browser::login(&one, "alice", PASSWORD).await;
        let mut streams = Vec::new();
        for server in [&one, &two] {
            let mut stream = EventReader::open(server, &alice.cookie, None).await;
            stream.expect("count").await;
            streams.push(stream);
        }

        // act: the session ends, then a message arrives for alice and one for bob
        if how == "logout" {
            let form = format!("csrf_token={}", alice.token);
            let answer = super::post(&one.address, "/logout", &alice.cookie, &form)
                .await
                .unwrap();
            assert_eq!(answer.status, 303, "logout: {}", answer.body);
        } else {
            let out = shared.cli(&["endsessions", "alice"], "");
            assert!(out.starts_with("ended 1 session"), "{out}");
        }
        let secret = format!("secret {round}");
        shared.cli(&["send", "--to", "alice", &secret], "");
        shared.cli(&["send", "--to", "bob", &format!("for bob {round}")], "");

        // assert: alice's streams end, neither sends the message; bob's goes on
        for (i, mut stream) in streams.into_iter().enumerate() {
            while let Some(event) = stream.next().await {
                assert_ne!(
                    event.event, "message",
                    "{how}: stream {i} sent {event:?} after the session ended"
                );
            }
        }
        let message = bobs.expect("message").await;
        assert_eq!(message.data["message"], format!("for bob {round}"));
        bobs.expect("count").await;
    }
}

async fn a_stream_hears_every_process(shared: &Shared) {
    shared.cli(&["createuser", "alice"], &format!("{PASSWORD}\n"));
    let one = shared.serve(&format!("sm_one_{}", random_id())).await;
    let two = shared.serve(&format!("sm_two_{}", random_id())).await;
    let alice = Browser::login(&one, "alice", PASSWORD).await;
    shared.wait_feeds(&[&one, &two]).await;

    // Anonymous: 401 with the API's JSON error.
    let anonymous = get(&two.address, "/messages/stream", "").await.unwrap();
    assert_eq!(anonymous.status, 401);
    assert!(anonymous.json()["error"]["message"].is_string());

    let mut stream = EventReader::open(&two, &alice.cookie, None).await;
    assert_eq!(stream.redirected.is_some(), shared.stream_listener);
    assert_eq!(stream.status, 200);
    assert_eq!(stream.header("content-type"), Some("text/event-stream"));
    assert_eq!(
        stream.header("cache-control"),
        Some("private, no-store, no-cache")
    );
    assert_eq!(stream.header("x-accel-buffering"), Some("no"));
    let first = stream.expect("count").await;
    assert_eq!(first.data["unread"], 0);

    // The CLI, another process.
    shared.cli(&["send", "--to", "alice", "from the CLI"], "");
    let message = stream.expect("message").await;
    assert_eq!(message.data["message"], "from the CLI");
    assert!(message.id.is_some());
    assert_eq!(stream.expect("count").await.data["unread"], 1);

    // Another server.
    alice.add(&one, "from server one").await;
    assert_eq!(
        stream.expect("message").await.data["message"],
        "from server one"
    );
    assert_eq!(stream.expect("count").await.data["unread"], 2);

    // Its feed connection killed: the next write still arrives.
    if !matches!(shared.backend, Backend::Sqlite) {
        assert!(shared.kill_feed(&two.name).await, "a feed to kill");
        shared.cli(&["send", "--to", "alice", "after the kill"], "");
        assert_eq!(
            stream.expect("message").await.data["message"],
            "after the kill"
        );
        assert_eq!(stream.expect("count").await.data["unread"], 3);
    }

    // Read through the other server: the ids leave, the count drops.
    let marked = alice.mark_all_read(&one).await;
    let read = stream.expect("read").await;
    assert_eq!(read.data["ids"].as_array().unwrap().len() as u64, marked);
    assert_eq!(stream.expect("count").await.data["unread"], 0);
}

async fn a_reconnect_replays_what_it_missed_or_resyncs(shared: &Shared) {
    shared.cli(&["createuser", "alice"], &format!("{PASSWORD}\n"));
    let server = shared.serve(&format!("sm_r_{}", random_id())).await;
    let alice = Browser::login(&server, "alice", PASSWORD).await;
    shared.wait_feeds(&[&server]).await;
    shared.cli(&["send", "--to", "alice", "before"], "");

    let mut stream = EventReader::open(&server, &alice.cookie, None).await;
    let seen = stream.expect("count").await;
    assert_eq!(seen.data["unread"], 1);
    drop(stream);

    // Missed while away: replayed in order, then the count.
    shared.cli(&["send", "--to", "alice", "away 1"], "");
    shared.cli(&["send", "--to", "alice", "away 2"], "");
    let mut stream = EventReader::open(&server, &alice.cookie, seen.id.as_deref()).await;
    assert_eq!(stream.expect("message").await.data["message"], "away 1");
    assert_eq!(stream.expect("message").await.data["message"], "away 2");
    let now = stream.expect("count").await;
    assert_eq!(now.data["unread"], 3);
    drop(stream);

    // Nothing missed: just the count.
    let mut stream = EventReader::open(&server, &alice.cookie, now.id.as_deref()).await;
    assert_eq!(stream.expect("count").await.data["unread"], 3);
    drop(stream);

    // Messages left the inbox meanwhile: which ones cannot be told, so resync.
    alice.mark_all_read(&server).await;
    shared.cli(&["send", "--to", "alice", "after the read"], "");
    let mut stream = EventReader::open(&server, &alice.cookie, now.id.as_deref()).await;
    let resync = stream.expect("resync").await;
    assert_eq!(resync.data["unread"], 1);
    // From the resync's id on, it is exact again.
    drop(stream);
    shared.cli(&["send", "--to", "alice", "after the resync"], "");
    let mut stream = EventReader::open(&server, &alice.cookie, resync.id.as_deref()).await;
    assert_eq!(
        stream.expect("message").await.data["message"],
        "after the resync"
    );
    drop(stream);

    // An id that is not one of ours: resync.
    let mut stream = EventReader::open(&server, &alice.cookie, Some("garbage")).await;
    assert_eq!(stream.expect("resync").await.data["unread"], 2);
}

async fn sigterm_ends_the_streams_and_the_server(shared: &Shared) {
    shared.cli(&["createuser", "alice"], &format!("{PASSWORD}\n"));
    let mut server = shared.serve(&format!("sm_t_{}", random_id())).await;
    let alice = Browser::login(&server, "alice", PASSWORD).await;
    let mut streams = Vec::new();
    for _ in 0..5 {
        let mut stream = EventReader::open(&server, &alice.cookie, None).await;
        stream.expect("count").await;
        streams.push(stream);
    }
    // A request in flight: its head and half its body sent before the signal.
    let body = format!(
        "csrf_token={}&level=stored_info&message=in+flight",
        alice.token
    );
    let (first, rest) = body.split_at(body.len() / 2);
    let mut in_flight = TcpStream::connect(&server.address).await.unwrap();
    in_flight
        .write_all(
            format!(
                "POST /demo/message HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
                 Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
                 Cookie: {}\r\n\r\n{first}",
                server.address,
                body.len(),
                alice.cookie
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let listener = streams[0]
        .redirected
        .as_ref()
        .map(|_| streams[0].address.clone());
    assert_eq!(listener.is_some(), shared.stream_listener);
    let asked = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    for stream in &mut streams {
        assert!(stream.next().await.is_none(), "the stream ends");
    }
    // No new request is taken (by the server, nor by its stream listener): a connection is
    // refused, or closed unanswered.
    for address in std::iter::once(&server.address).chain(&listener) {
        let Ok(mut late) = TcpStream::connect(address).await else {
            continue;
        };
        let request =
            format!("GET /health HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        let _ = late.write_all(request.as_bytes()).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(EVENT_WAIT, late.read_to_end(&mut answer)).await;
        assert!(
            answer.is_empty(),
            "a request after the signal was answered: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    // The request in flight is finished: the rest of its body arrives after the signal,
    // and it is answered (and its message stored).
    tokio::time::sleep(Duration::from_millis(200)).await;
    in_flight.write_all(rest.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(EVENT_WAIT, in_flight.read_to_end(&mut answer))
        .await
        .expect("an answer to the request in flight")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 303"),
        "the request in flight was answered: {answer}"
    );
    println!("SIGTERM: the streams ended after {:?}", asked.elapsed());
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            println!(
                "SIGTERM: streams ended and the server exited ({status}) after {:?}",
                asked.elapsed()
            );
            break;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(30),
            "the server did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = shared.cli(&["inbox", "alice"], "");
    assert!(out.contains("in flight"), "stored before the exit: {out}");
}

/// Open file descriptors of a process (each open stream holds one socket).
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Clients that go away free what their streams held, in a real server: three rounds of
/// 500 streams opened (each has its first event) and closed. The next write tells each
/// stream that its client left (the heartbeat would, at the latest); then the server's
/// sockets are back to where they were, and its memory after the third round is what it
/// was after the first (a leak of what a stream holds, ~50 KiB, would show as 25 MB).
async fn streams_closed_by_their_clients_free_what_they_held(shared: &Shared) {
    // 500 streams need 32 users: one may hold MAX_STREAMS_PER_USER (16).
    let names: Vec<String> = (0..32).map(|i| format!("user{i:02}")).collect();
    for name in &names {
        shared.cli(&["createuser", name], &format!("{PASSWORD}\n"));
    }
    let server = shared.serve(&format!("sm_free_{}", random_id())).await;
    let mut users = Vec::new();
    for name in &names {
        users.push(Browser::login(&server, name, PASSWORD).await);
    }
    let pid = server.child.id();
    let baseline = open_fds(pid);
    let mut memory = Vec::new();
    for round in 0..3 {
        let before = open_fds(pid);
        let mut streams = Vec::new();
        for i in 0..500 {
            let user = &users[i % users.len()];
            let mut stream = EventReader::open(&server, &user.cookie, None).await;
            stream.expect("count").await;
            streams.push(stream);
        }
        // (Give or take a pooled connection closing meanwhile.)
        let open = open_fds(pid);
        assert!(
            open + 12 >= before + 500,
            "round {round}: {open} open, {before} before"
        );
        drop(streams);
        shared.cli(
            &["send", "--to", &names.join(","), &format!("round {round}")],
            "",
        );
        let closed = Instant::now();
        // (The pools may have opened a few connections of their own meanwhile.)
        while open_fds(pid) > baseline + 12 {
            assert!(
                closed.elapsed() < Duration::from_secs(30),
                "round {round}: {} descriptors open, {baseline} before",
                open_fds(pid)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        memory.push(rss_kib(pid));
    }
    println!("server memory after each round of 500 streams: {memory:?} KiB");
    assert!(
        memory[2] <= memory[0] + 8 * 1024,
        "memory grew from round to round: {memory:?} KiB"
    );
}

/// The stream listener reads no cookie: it opens a stream for a valid ticket only, which
/// `GET /messages/stream` gives (a redirect that no cache may keep) to the session's user,
/// and which opens nothing once the session has ended. Whatever else it is sent, it answers
/// with the API's JSON error and CORS headers (the page's script reads its status from
/// another origin), and goes on serving.
async fn the_stream_listener_trusts_tickets_only(shared: &Shared) {
    shared.cli(&["createuser", "alice"], &format!("{PASSWORD}\n"));
    let server = shared.serve(&format!("sm_tk_{}", random_id())).await;
    let alice = Browser::login(&server, "alice", PASSWORD).await;
    let redirect = get(&server.address, "/messages/stream", &alice.cookie)
        .await
        .unwrap();
    assert_eq!(redirect.status, 307, "{}", redirect.body);
    let header = |answer: &super::Answer, name: &str| {
        answer
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        header(&redirect, "cache-control").as_deref(),
        Some("private, no-store")
    );
    let location = header(&redirect, "location").unwrap();
    let rest = location.strip_prefix("http://").unwrap();
    let (address, target) = rest.split_at(rest.find('/').unwrap());
    let (path, ticket) = target.split_once("?ticket=").unwrap();
    assert_eq!(path, "/messages/stream");
    let ask = |target: String, extra: &str| {
        super::exchange(
            address,
            format!("GET {target} HTTP/1.1\r\nHost: {address}\r\nOrigin: http://page.example\r\n{extra}\r\n"),
        )
    };

    // No ticket, a forged one, a tampered one, alice's cookie without one: 401.
    let mut tampered = ticket.to_string().into_bytes();
    tampered[10] = if tampered[10] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    for (target, extra) in [
        (path.to_string(), format!("Cookie: {}\r\n", alice.cookie)),
        (format!("{path}?ticket=forged"), String::new()),
        (format!("{path}?ticket={tampered}"), String::new()),
    ] {
        let answer = ask(target.clone(), &extra).await.unwrap();
        assert_eq!(answer.status, 401, "{target}: {}", answer.body);
        assert_eq!(answer.json()["error"]["status"], 401);
        assert_eq!(
            header(&answer, "access-control-allow-origin").as_deref(),
            Some("http://page.example")
        );
    }

    // Other methods: 405; a CORS preflight (a reconnect sends Last-Event-ID): allowed.
    let post = super::exchange(
        address,
        format!("POST {target} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\n\r\n"),
    )
    .await
    .unwrap();
    assert_eq!(post.status, 405);
    assert_eq!(post.json()["error"]["status"], 405);
    let preflight = super::exchange(
        address,
        format!(
            "OPTIONS {target} HTTP/1.1\r\nHost: {address}\r\nOrigin: http://page.example\r\n\
             Access-Control-Request-Method: GET\r\nAccess-Control-Request-Headers: last-event-id\r\n\r\n"
        ),
    )
    .await
    .unwrap();
    assert_eq!(preflight.status, 204);
    assert_eq!(
        header(&preflight, "access-control-allow-headers").as_deref(),
        Some("last-event-id")
    );

    // Odd input: not HTTP, an endless head, a client that leaves halfway.
    let garbage = super::exchange(address, "\x16\x03\x01\x02\x00 hello\r\n\r\n".into())
        .await
        .unwrap();
    assert_eq!(garbage.status, 400);
    let endless = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\n{}\r\n",
        "X-A: b\r\n".repeat(60)
    );
    let endless = super::exchange(address, endless).await.unwrap();
    assert_eq!(endless.status, 431);
    let mut halfway = TcpStream::connect(address).await.unwrap();
    halfway.write_all(b"GET /messages/str").await.unwrap();
    drop(halfway);

    // The ticket opens alice's stream, from any origin.
    let mut stream = EventReader::open(&server, &alice.cookie, None).await;
    assert_eq!(stream.status, 200);
    assert_eq!(
        stream.header("access-control-allow-origin"),
        Some("*"),
        "no Origin was sent"
    );
    assert_eq!(stream.expect("count").await.data["unread"], 0);
    drop(stream);

    // After a logout, the ticket given before it opens nothing, though it has not expired.
    let form = format!("csrf_token={}", alice.token);
    let logout = super::post(&server.address, "/logout", &alice.cookie, &form)
        .await
        .unwrap();
    assert_eq!(logout.status, 303);
    let after = ask(target.to_string(), "").await.unwrap();
    assert_eq!(after.status, 401, "{}", after.body);
    assert!(
        after.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("session has ended"),
        "{}",
        after.body
    );
}
