//! The stream listener: live streams served on an address of their own, by a small server
//! written for them alone, instead of by Rocket.
//!
//! Rocket 0.5 keeps about 36 KiB for every open response, whatever the response is (hyper's
//! read and write buffers, the request, the task and the channel that carry the body; see the
//! README's "Live streams"), and offers no setting for any of it. An idle stream needs far
//! less: this server keeps a few KiB per stream, so one instance holds ten times as many.
//!
//! Turned on by `stream_address` (`[default.stored_messages]`), the address it listens on
//! (port 0 picks a free one). `GET <api>/stream` on Rocket then checks the request as always
//! (the session's user, the page's `?session=`) and answers `307 Temporary Redirect` to the
//! listener, with a **ticket** in the query: the user, what ties the stream to its session
//! ([`crate::Host::stream_session`]) and the client's last event id, encrypted and
//! authenticated with a key derived from Rocket's `secret_key` (so any instance of the site
//! takes any instance's tickets), valid for [`TICKET_LIFETIME`]. Browsers follow the redirect
//! by themselves, and reconnect through `GET <api>/stream` again. The listener reads the
//! request head (at most [`HEAD_LIMIT`] bytes, within [`HEAD_TIMEOUT`]), checks the ticket
//! and that the session still goes on, and then streams exactly what Rocket's route would:
//! the same events, limits and ends (the session's end, the client's, SIGTERM). A client that
//! stops reading is dropped after [`WRITE_TIMEOUT`].
//!
//! The listener is another origin (another port), so it answers with CORS headers for any
//! origin: it reads no cookie and trusts nothing but the ticket. Where browsers should reach
//! it at another address (a reverse proxy in front, TLS), set `stream_url`, the URL the
//! redirect names; by default it is `http://` + the request's host + the listener's port +
//! the request's path.

use std::net::SocketAddr;
use std::time::Duration;

use rocket::figment::Figment;
use rocket::http::Status;
use rocket::request::{FromRequest, Outcome};
use rocket::tokio::io::{AsyncReadExt, AsyncWriteExt};
use rocket::tokio::net::{TcpListener, TcpStream};
use rocket::{Request, Shutdown};
use serde::{Deserialize, Serialize};

use super::{session_goes_on, Follower, HEARTBEAT, RETRY};
use crate::message::UserId;
use crate::ops::Store;

/// How long a ticket opens a stream after `GET <api>/stream` gave it.
pub const TICKET_LIFETIME: Duration = Duration::from_secs(60);
/// The longest request head the listener reads.
pub const HEAD_LIMIT: usize = 8 * 1024;
/// How long a client has to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one write to a client may take before the client is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The name the ticket is encrypted under (its associated data).
const TICKET: &str = "stored-messages-stream-ticket";

/// The listener as the library keeps it (managed by Rocket).
pub(crate) struct StreamListener {
    address: SocketAddr,
    url: Option<String>,
    key: cookie::Key,
    socket: std::sync::Mutex<Option<std::net::TcpListener>>,
}

impl StreamListener {
    /// Binds `address` (so that a taken port stops the launch); `url` is `stream_url`.
    pub(crate) fn bind(
        address: SocketAddr,
        url: Option<String>,
        figment: &Figment,
    ) -> std::io::Result<StreamListener> {
        let socket = std::net::TcpListener::bind(address)?;
        socket.set_nonblocking(true)?;
        Ok(StreamListener {
            address: socket.local_addr()?,
            url,
            key: ticket_key(figment),
            socket: std::sync::Mutex::new(Some(socket)),
        })
    }

    /// Starts serving (once; Rocket's liftoff), until `shutdown`.
    pub(crate) fn start(&self, store: Store, shutdown: Shutdown) {
        let socket = self.socket.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(socket) = socket else { return };
        let listener = match TcpListener::from_std(socket) {
            Ok(listener) => listener,
            Err(e) => {
                log::error!("stored-messages: the stream listener cannot start: {e}");
                return;
            }
        };
        let key = self.key.clone();
        log::info!("stored-messages: live streams served on {}", self.address);
        rocket::tokio::spawn(accept(listener, store, key, shutdown));
    }

    /// The listener's URL as the browser of a request to `host` reaches it: `stream_url`, or
    /// `http://` + that host + the listener's port + `path`.
    fn base_url(&self, host: Option<&str>, path: &str) -> String {
        if let Some(url) = &self.url {
            return url.clone();
        }
        let host = host
            .and_then(host_name)
            .unwrap_or_else(|| match self.address.ip() {
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                ip => ip.to_string(),
            });
        format!("http://{host}:{}{path}", self.address.port())
    }

    fn ticket(&self, ticket: &Ticket) -> String {
        let mut jar = cookie::CookieJar::new();
        let plain = serde_json::to_string(ticket).unwrap_or_default();
        jar.private_mut(&self.key)
            .add(cookie::Cookie::new(TICKET, plain));
        jar.get(TICKET)
            .map(|c| c.value().to_string())
            .unwrap_or_default()
    }
}

/// The key of the tickets: derived from Rocket's `secret_key`, which every instance of a site
/// shares; a key of this process only when there is none (a debug build without one, whose
/// cookies do not outlive the process either).
fn ticket_key(figment: &Figment) -> cookie::Key {
    let provided = figment
        .extract::<rocket::Config>()
        .is_ok_and(|config| !config.secret_key.is_zero());
    match figment.find_value(rocket::Config::SECRET_KEY) {
        Ok(value) if provided => {
            let material = format!(
                "stored-messages: the stream listener's tickets, from the secret key {}",
                serde_json::to_string(&value).unwrap_or_default()
            );
            cookie::Key::derive_from(material.as_bytes())
        }
        _ => cookie::Key::generate(),
    }
}

/// What a ticket says.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Ticket {
    /// The user.
    u: UserId,
    /// What ties the stream to its session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    s: Option<String>,
    /// The event id the client last saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    l: Option<String>,
    /// Until when it is valid (seconds since the epoch).
    e: i64,
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn open_ticket(key: &cookie::Key, text: &str) -> Option<Ticket> {
    let mut jar = cookie::CookieJar::new();
    jar.add_original(cookie::Cookie::new(TICKET, text.to_string()));
    let plain = jar.private(key).get(TICKET)?;
    let ticket: Ticket = serde_json::from_str(plain.value()).ok()?;
    (ticket.e >= now()).then_some(ticket)
}

/// Request guard of `GET <api>/stream`: with a stream listener, where to send the client.
pub(crate) struct Tickets<'r> {
    listener: Option<&'r StreamListener>,
    host: Option<&'r str>,
    path: &'r str,
}

impl Tickets<'_> {
    /// The listener's URL with a new ticket; `None` without a listener.
    pub(crate) fn redirect(
        &self,
        user: UserId,
        session: Option<&str>,
        last: Option<&str>,
    ) -> Option<String> {
        let listener = self.listener?;
        let ticket = listener.ticket(&Ticket {
            u: user,
            s: session.map(str::to_string),
            l: last.map(str::to_string),
            e: now() + TICKET_LIFETIME.as_secs() as i64,
        });
        let base = listener.base_url(self.host, self.path);
        let query = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("ticket", &ticket)
            .finish();
        let separator = if base.contains('?') { '&' } else { '?' };
        Some(format!("{base}{separator}{query}"))
    }
}

/// The origin of the stream listener as the browser of `request` reaches it, when that is
/// another origin than the page's (`None` without a listener, or when `stream_url` is a
/// path): what a page's `Content-Security-Policy` must allow in `connect-src` for its live
/// updates, since the stream's redirect leads there.
///
/// ```
/// # use rocket::{Request, Response};
/// fn content_security_policy(request: &Request<'_>) -> String {
///     let policy = "default-src 'self'".to_string();
///     match stored_messages::live::listener::stream_origin(request) {
///         Some(origin) => format!("{policy}; connect-src 'self' {origin}"),
///         None => policy,
///     }
/// }
/// ```
pub fn stream_origin(request: &Request<'_>) -> Option<String> {
    let listener = request.rocket().state::<StreamListener>()?;
    let host = request.headers().get_one("Host");
    let base = listener.base_url(host, "/");
    let url = url::Url::parse(&base).ok()?;
    Some(url.origin().ascii_serialization())
}

/// The host of a `Host` header, without its port; `None` for anything but a host name or an
/// IP address (the redirect must not lead anywhere a header names).
fn host_name(host: &str) -> Option<String> {
    let name = match host.strip_prefix('[') {
        Some(rest) => {
            let (ip, _) = rest.split_once(']')?;
            ip.parse::<std::net::Ipv6Addr>().ok()?;
            return Some(format!("[{ip}]"));
        }
        None => host.split(':').next()?,
    };
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    valid.then(|| name.to_string())
}

#[rocket::async_trait]
impl<'r> FromRequest<'r> for Tickets<'r> {
    type Error = std::convert::Infallible;

    async fn from_request(request: &'r Request<'_>) -> Outcome<Self, Self::Error> {
        Outcome::Success(Tickets {
            listener: request.rocket().state::<StreamListener>(),
            host: request.headers().get_one("Host"),
            path: request.uri().path().as_str(),
        })
    }
}

async fn accept(listener: TcpListener, store: Store, key: cookie::Key, mut shutdown: Shutdown) {
    let key = std::sync::Arc::new(key);
    loop {
        let accepted = rocket::tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut shutdown => return,
        };
        match accepted {
            Ok((connection, _)) => {
                let _ = connection.set_nodelay(true);
                rocket::tokio::spawn(serve(
                    connection,
                    store.clone(),
                    std::sync::Arc::clone(&key),
                    shutdown.clone(),
                ));
            }
            Err(e) => {
                // Out of file descriptors, most likely: wait instead of spinning.
                log::warn!("stored-messages: the stream listener cannot accept: {e}");
                rocket::tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What the listener needs of a request head.
#[derive(Debug, Default, PartialEq, Eq)]
struct Head {
    method: String,
    ticket: Option<String>,
    origin: Option<String>,
    last_event_id: Option<String>,
    preflight_headers: Option<String>,
}

/// Why a request head could not be read.
#[derive(Debug, PartialEq, Eq)]
enum BadHead {
    /// Not HTTP (or not what this server takes).
    Malformed,
    /// Longer than [`HEAD_LIMIT`].
    TooLarge,
    /// The client left or was too slow: nothing to answer.
    Gone,
}

async fn read_head(connection: &mut TcpStream) -> Result<Head, BadHead> {
    let mut buffer = Vec::with_capacity(1024);
    loop {
        if buffer.len() >= HEAD_LIMIT {
            return Err(BadHead::TooLarge);
        }
        buffer.reserve(1024.min(HEAD_LIMIT - buffer.len()));
        match connection.read_buf(&mut buffer).await {
            Ok(0) | Err(_) => return Err(BadHead::Gone),
            Ok(_) => {}
        }
        if let Some(head) = parse_head(&buffer)? {
            return Ok(head);
        }
    }
}

/// Parses a complete head; `None` when more is needed.
fn parse_head(bytes: &[u8]) -> Result<Option<Head>, BadHead> {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(BadHead::TooLarge),
        Err(_) => Err(BadHead::Malformed),
        Ok(httparse::Status::Complete(_)) => {
            let header = |name: &str| {
                request
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
            };
            let target = request.path.unwrap_or("");
            let ticket = target.split_once('?').and_then(|(_, query)| {
                url::form_urlencoded::parse(query.as_bytes())
                    .find(|(k, _)| k == "ticket")
                    .map(|(_, v)| v.into_owned())
            });
            Ok(Some(Head {
                method: request.method.unwrap_or("").to_string(),
                ticket,
                origin: header("Origin"),
                last_event_id: header("Last-Event-ID"),
                preflight_headers: header("Access-Control-Request-Headers"),
            }))
        }
    }
}

/// The CORS headers of every answer: any origin may read a stream it holds a ticket for.
fn cors(head: &Head) -> String {
    match &head.origin {
        Some(origin) if !origin.contains(['\r', '\n']) => format!(
            "Access-Control-Allow-Origin: {origin}\r\nAccess-Control-Allow-Credentials: true\r\n\
             Vary: Origin\r\n"
        ),
        _ => "Access-Control-Allow-Origin: *\r\n".to_string(),
    }
}

/// An answer that is not a stream: the API's JSON error (or an empty 204), then the end.
async fn answer(connection: &mut TcpStream, status: Status, extra: &str, message: Option<&str>) {
    let body = message
        .map(|m| crate::error::error_body(status, m).to_string())
        .unwrap_or_default();
    let content_type = if message.is_some() {
        "Content-Type: application/json\r\n"
    } else {
        ""
    };
    let text = format!(
        "HTTP/1.1 {status}\r\n{content_type}Content-Length: {}\r\nCache-Control: no-store\r\n\
         {extra}Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ =
        rocket::tokio::time::timeout(WRITE_TIMEOUT, connection.write_all(text.as_bytes())).await;
    let _ = connection.shutdown().await;
}

/// Writes `bytes`; `false` when the client is gone or too slow.
async fn send(connection: &mut TcpStream, bytes: &[u8]) -> bool {
    matches!(
        rocket::tokio::time::timeout(WRITE_TIMEOUT, connection.write_all(bytes)).await,
        Ok(Ok(()))
    )
}

/// Serves one connection: one stream, or one error.
async fn serve(
    mut connection: TcpStream,
    store: Store,
    key: std::sync::Arc<cookie::Key>,
    mut shutdown: Shutdown,
) {
    // Boxed, so that what the opening needs is given back once the stream is open: the
    // connection's task then keeps only what following takes.
    let opened = Box::pin(open(&mut connection, store, key)).await;
    if let Some(follower) = opened {
        follow(connection, follower, &mut shutdown).await;
    }
}

/// Reads the request and answers it: with a stream's head and first events (then the
/// follower of the stream), or with an error.
async fn open(
    connection: &mut TcpStream,
    store: Store,
    key: std::sync::Arc<cookie::Key>,
) -> Option<Follower> {
    let head = match rocket::tokio::time::timeout(HEAD_TIMEOUT, read_head(connection)).await {
        Ok(Ok(head)) => head,
        Ok(Err(BadHead::Malformed)) => {
            let message = "not an HTTP request";
            answer(connection, Status::BadRequest, "", Some(message)).await;
            return None;
        }
        Ok(Err(BadHead::TooLarge)) => {
            let message = format!("the request head is larger than {HEAD_LIMIT} bytes");
            let status = Status::RequestHeaderFieldsTooLarge;
            answer(connection, status, "", Some(&message)).await;
            return None;
        }
        Ok(Err(BadHead::Gone)) | Err(_) => return None,
    };
    let cors = cors(&head);
    match head.method.as_str() {
        "GET" => {}
        "OPTIONS" => {
            let allowed = head
                .preflight_headers
                .as_deref()
                .filter(|h| !h.contains(['\r', '\n']))
                .map(|h| format!("Access-Control-Allow-Headers: {h}\r\n"))
                .unwrap_or_default();
            let extra = format!(
                "{cors}Access-Control-Allow-Methods: GET\r\n{allowed}Access-Control-Max-Age: 600\r\n"
            );
            answer(connection, Status::NoContent, &extra, None).await;
            return None;
        }
        _ => {
            let extra = format!("{cors}Allow: GET, OPTIONS\r\n");
            let message = "the stream listener answers GET only";
            answer(connection, Status::MethodNotAllowed, &extra, Some(message)).await;
            return None;
        }
    }
    let Some(ticket) = head.ticket.as_deref().and_then(|t| open_ticket(&key, t)) else {
        let message = "this stream's ticket is missing, invalid or expired: open the stream \
                       through the API (GET <api>/stream) for a new one";
        answer(connection, Status::Unauthorized, &cors, Some(message)).await;
        return None;
    };
    // The session may have ended since the ticket was given.
    if !session_goes_on(&store, ticket.u, ticket.s.as_deref()).await {
        let message = "this stream's session has ended";
        answer(connection, Status::Unauthorized, &cors, Some(message)).await;
        return None;
    }
    // A browser that reconnects straight here (not through the API) sends its last id.
    let last = head.last_event_id.or(ticket.l);
    let (follower, first) = match Follower::open(store, ticket.u, ticket.s, last.as_deref()).await {
        Ok(opened) => opened,
        Err(refused) => {
            let error = crate::api::ApiError::from(refused);
            let (status, message) = error.parts();
            answer(connection, status, &cors, Some(message)).await;
            return None;
        }
    };
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
         Cache-Control: private, no-store, no-cache\r\nX-Accel-Buffering: no\r\n{cors}\
         Connection: close\r\n\r\nretry:{}\n\n",
        RETRY.as_millis()
    )
    .into_bytes();
    for event in &first {
        event.write_to(&mut out);
    }
    send(connection, &out).await.then_some(follower)
}

/// Streams a follower's events until the stream, the client or the server ends.
async fn follow(mut connection: TcpStream, follower: Follower, shutdown: &mut Shutdown) {
    let step = Follower::step(follower);
    rocket::tokio::pin!(step);
    let start = rocket::tokio::time::Instant::now() + HEARTBEAT;
    let mut heartbeat = rocket::tokio::time::interval_at(start, HEARTBEAT);
    heartbeat.set_missed_tick_behavior(rocket::tokio::time::MissedTickBehavior::Delay);
    let mut probe = [0u8; 64];
    loop {
        rocket::tokio::select! {
            _ = &mut *shutdown => break,
            // The client sends nothing more: a read that ends means it left.
            read = connection.read(&mut probe) => match read {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
            (follower, events) = &mut step => {
                let Some(events) = events else { break };
                let mut out = Vec::new();
                for event in &events {
                    event.write_to(&mut out);
                }
                if !send(&mut connection, &out).await {
                    break;
                }
                step.set(Follower::step(follower));
                heartbeat.reset();
            }
            _ = heartbeat.tick() => {
                if !send(&mut connection, b":\n\n").await {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::LiveEvent;

    #[test]
    fn tickets_open_with_their_key_only_and_until_they_expire() {
        let key = cookie::Key::generate();
        let listener = StreamListener {
            address: "127.0.0.1:1".parse().unwrap(),
            url: None,
            key: key.clone(),
            socket: std::sync::Mutex::new(None),
        };
        let ticket = Ticket {
            u: UserId(7),
            s: Some("session".into()),
            l: Some("3-00ff".into()),
            e: now() + 60,
        };
        let text = listener.ticket(&ticket);
        assert!(!text.contains("session"), "the ticket is encrypted: {text}");
        assert_eq!(open_ticket(&key, &text), Some(ticket));
        assert_eq!(open_ticket(&cookie::Key::generate(), &text), None);
        let mut tampered = text.clone().into_bytes();
        tampered[20] ^= 1;
        assert_eq!(open_ticket(&key, &String::from_utf8_lossy(&tampered)), None);
        let expired = listener.ticket(&Ticket {
            u: UserId(7),
            s: None,
            l: None,
            e: now() - 1,
        });
        assert_eq!(open_ticket(&key, &expired), None);
        assert_eq!(open_ticket(&key, "garbage"), None);
    }

    #[test]
    fn every_instance_of_a_site_derives_the_same_key() {
        let figment = |key: &str| rocket::Config::figment().merge(("secret_key", key));
        let one = "hPRYyVRiMyxpw5sBB1XeCMN1kFsDCqKvBi2QJxBVHQk=";
        let other = "aPRYyVRiMyxpw5sBB1XeCMN1kFsDCqKvBi2QJxBVHQk=";
        assert_eq!(
            ticket_key(&figment(one)).master(),
            ticket_key(&figment(one)).master()
        );
        assert_ne!(
            ticket_key(&figment(one)).master(),
            ticket_key(&figment(other)).master()
        );
        // Without a key, each process has its own.
        let none = rocket::Config::figment();
        assert_ne!(ticket_key(&none).master(), ticket_key(&none).master());
    }

    #[test]
    fn heads_are_read_strictly() {
        let head = parse_head(
            b"GET /messages/stream?ticket=a%2Bb%3D&x=1 HTTP/1.1\r\nHost: h\r\n\
              Origin: http://h:8000\r\nLast-Event-ID: 4-00\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.method, "GET");
        assert_eq!(head.ticket.as_deref(), Some("a+b="));
        assert_eq!(head.origin.as_deref(), Some("http://h:8000"));
        assert_eq!(head.last_event_id.as_deref(), Some("4-00"));
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost: h\r\n"), Ok(None));
        assert_eq!(parse_head(b"\x16\x03\x01 tls"), Err(BadHead::Malformed));
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "A: b\r\n".repeat(60));
        assert_eq!(parse_head(many.as_bytes()), Err(BadHead::TooLarge));
    }

    #[test]
    fn host_names_lose_their_port() {
        assert_eq!(
            host_name("example.com:8000").as_deref(),
            Some("example.com")
        );
        assert_eq!(host_name("example.com").as_deref(), Some("example.com"));
        assert_eq!(host_name("[::1]:8000").as_deref(), Some("[::1]"));
        assert_eq!(host_name("127.0.0.1:80").as_deref(), Some("127.0.0.1"));
        assert_eq!(host_name("evil.example/x?"), None);
        assert_eq!(host_name("a@b"), None);
        assert_eq!(host_name("[nonsense]"), None);
        assert_eq!(host_name(""), None);
    }

    #[test]
    fn events_are_written_as_event_stream_text() {
        let mut out = Vec::new();
        LiveEvent {
            name: "count",
            id: "0-0000000000000000".into(),
            data: r#"{"unread":0}"#.into(),
        }
        .write_to(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "id:0-0000000000000000\nevent:count\ndata:{\"unread\":0}\n\n"
        );
    }
}
