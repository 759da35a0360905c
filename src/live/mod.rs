//! Live updates: `GET <api>/stream`, server-sent events of the current user's inbox.
//!
//! The stream follows the store's [change feed](crate::changes), so a write in any process
//! sharing the store (a handler, the request-free [`crate::Store`], the CLI, another app
//! instance) reaches the streams of every instance. Nothing is sent per write beyond what
//! the feed already carries: when the feed says a user's inbox may have changed, each of that
//! user's streams reads the inbox and sends the difference from what its client was told.
//!
//! | event | data | when |
//! |---|---|---|
//! | `message` | the API's message object | a message entered the inbox |
//! | `read` | `{"ids": ["12", …]}` | messages left the inbox (read, here or anywhere; expired; deleted) |
//! | `count` | `{"unread": N}` | after each change, and first thing on a new stream |
//! | `resync` | `{"unread": N}` | the server cannot vouch that the client missed nothing: reload the inbox from the API |
//!
//! Every event carries an `id:` naming the inbox as the client then knows it. A client that
//! reconnects sends it back (`Last-Event-ID`; browsers do this by themselves, a page may pass
//! the id its HTML was rendered with as `?since=`): the stream then replays the messages that
//! arrived meanwhile, exactly, or sends `resync` when messages also left the inbox meanwhile
//! (which ones cannot be told from the id alone). Because each stream compares whole inboxes,
//! a stream that falls behind the feed loses nothing either: it reads the inbox once more.
//! An inbox of more than [`KNOWN_LIMIT`] unread messages is followed by `count` and `resync`
//! only, and more than [`MAX_BURST`] new messages at once (on opening, or after a burst) are
//! one `resync`: a stream never holds more than that many messages' events, even for a
//! client that does not read.
//!
//! A page passes `?session=` ([`page_tag`] of its CSRF token), to the stream and to the API
//! reads its script reloads the list with (`inbox`, `count`): a page of a session that ended
//! (a tab left open across a logout and a new login) gets 401 rather than the new session's
//! inbox.
//!
//! A user holds at most [`MAX_STREAMS_PER_USER`] streams on one instance (beyond: 429 with
//! the API's JSON error). A stream tied to a session ([`crate::Host::stream_session`]) ends
//! when the session does (see [`crate::Host::session_active`]).
//!
//! The stream sends a `retry:` hint, a heartbeat comment every [`HEARTBEAT`], and the headers
//! proxies need (`Cache-Control: private, no-store, no-cache`: it is one user's, and
//! nothing may keep it; `X-Accel-Buffering: no`). It ends when the client
//! goes away (noticed at the next write, the heartbeat at the latest) and when the server
//! shuts down. [`crate::Store::open_streams`] counts the open ones.
//!
//! With `stream_address` configured, the [stream listener](listener) serves the streams
//! instead of Rocket (a few KiB per open stream against Rocket's 36): `GET <api>/stream`
//! checks the request and redirects there with a ticket. Events, limits and ends are the
//! same, from the same code.
//!
//! A message that arrives live is not marked read by arriving: it stays unread until the user
//! marks it read or a page shows it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rocket::futures::future::BoxFuture;
use rocket::http::Header;
use rocket::response::stream::{Event, EventStream};
use rocket::tokio::sync::Notify;
use rocket::{get, Shutdown, State};
use serde_json::json;

use crate::api::{ApiMessage, ApiUser};
use crate::backend::ListQuery;
use crate::changes::{Change, ChangeReceiver};
use crate::error::Result;
use crate::message::{Message, MessageId, UserId};
use crate::ops::Store;

use batch::Batches;

mod batch;
pub mod listener;

/// How often an idle stream sends a comment, so that proxies keep it open and a client that
/// went away is noticed.
pub const HEARTBEAT: Duration = Duration::from_secs(15);
/// How long a browser waits before it reconnects a stream that broke (the `retry:` hint).
pub const RETRY: Duration = Duration::from_secs(2);
/// The most unread messages a stream follows one by one; beyond, it sends `count` and
/// `resync` only.
pub const KNOWN_LIMIT: u32 = 500;
/// The most streams one user may hold open on one instance: a browser's tabs share one
/// stream, so this leaves room for many browsers and devices while a client that opens
/// streams without end gets 429 instead of the server's memory and file descriptors.
pub const MAX_STREAMS_PER_USER: usize = 16;
/// The most messages a stream sends one by one at once (when it opens, or after a burst);
/// beyond, it sends `resync` and the client reloads its list from the API, which pages. So
/// a stream never holds more than this many messages' events, even for a client that does
/// not read.
pub const MAX_BURST: usize = 20;
/// How often an idle stream tied to a session ([`crate::Host::stream_session`]) asks the
/// host whether the session still goes on (it also asks whenever its user's inbox is
/// announced as changed): the longest an expired session's stream stays open.
pub const SESSION_CHECK: Duration = Duration::from_secs(30);

/// How many streams a store serves now ([`crate::Store::open_streams`]).
#[derive(Debug, Default)]
pub(crate) struct OpenStreams(AtomicUsize);

impl OpenStreams {
    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counts a stream as open while it lives.
struct Open(Store);

impl Open {
    fn new(store: Store) -> Open {
        store
            .open_streams_counter()
            .0
            .fetch_add(1, Ordering::Relaxed);
        Open(store)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0
            .open_streams_counter()
            .0
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Wakes the streams a change concerns, and only those: one task per store reads the change
/// feed and signals the streams of the users in each change (every stream for
/// [`Change::All`], which is also what a hub that fell behind the feed gets). A stream that
/// is signalled several times before it reads reads once: it compares whole inboxes.
/// Without it, every change woke every open stream to ask whether it was concerned, which
/// with 10,000 streams took milliseconds per message.
#[derive(Default)]
pub(crate) struct StreamHub {
    state: std::sync::Mutex<HubState>,
}

#[derive(Default)]
struct HubState {
    streams: HashMap<UserId, Vec<Arc<Signal>>>,
    /// The dispatching task runs (it is started with the first stream and ends with the
    /// feed).
    running: bool,
    /// The feed is gone: no change will be reported again.
    closed: bool,
}

/// How the hub wakes one stream.
#[derive(Default)]
struct Signal {
    notify: Notify,
    /// The feed is gone: the stream ends.
    closed: AtomicBool,
}

/// A stream's place in the hub, given up when the stream ends.
struct Registration {
    hub: Arc<StreamHub>,
    user: UserId,
    signal: Arc<Signal>,
}

impl StreamHub {
    fn state(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Signs a stream of `user` up for the changes reported from now on; `None` when the
    /// user holds [`MAX_STREAMS_PER_USER`] already.
    fn register(store: &Store, user: UserId) -> Option<Registration> {
        let hub = Arc::clone(store.stream_hub());
        let signal = Arc::new(Signal::default());
        let start = {
            let mut state = hub.state();
            let streams = state.streams.entry(user).or_default();
            if streams.len() >= MAX_STREAMS_PER_USER {
                return None;
            }
            streams.push(Arc::clone(&signal));
            if state.closed {
                signal.closed.store(true, Ordering::SeqCst);
                signal.notify.notify_one();
            }
            !std::mem::replace(&mut state.running, true)
        };
        if start {
            // Subscribed here, before the stream reads its inbox: no change after that read
            // goes unheard.
            let changes = store.changes().subscribe();
            rocket::tokio::spawn(StreamHub::dispatch(Arc::clone(&hub), changes));
        }
        Some(Registration { hub, user, signal })
    }

    /// Signals the streams each change concerns, until the feed is gone; then ends them.
    async fn dispatch(hub: Arc<StreamHub>, mut changes: ChangeReceiver) {
        while let Some(change) = changes.recv().await {
            let state = hub.state();
            match change {
                Change::All => {
                    for signal in state.streams.values().flatten() {
                        signal.notify.notify_one();
                    }
                }
                Change::Users(users) => {
                    for user in users.iter() {
                        for signal in state.streams.get(user).into_iter().flatten() {
                            signal.notify.notify_one();
                        }
                    }
                }
            }
        }
        let mut state = hub.state();
        state.closed = true;
        for signal in state.streams.values().flatten() {
            signal.closed.store(true, Ordering::SeqCst);
            signal.notify.notify_one();
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut state = self.hub.state();
        if let Some(signals) = state.streams.get_mut(&self.user) {
            signals.retain(|s| !Arc::ptr_eq(s, &self.signal));
            if signals.is_empty() {
                state.streams.remove(&self.user);
            }
        }
    }
}

/// Spreads a message id over 64 bits, so that the XOR of a set of them identifies the set.
fn mix(id: MessageId) -> u64 {
    // splitmix64's finaliser.
    let mut z = (id.0 as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What a client was told of the inbox: the unread ids, and the largest id ever told.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Known {
    ids: BTreeMap<MessageId, ()>,
    /// The largest message id the client was told of (read or not).
    max: i64,
    /// XOR of [`mix`] over `ids`.
    hash: u64,
}

impl Known {
    fn insert(&mut self, id: MessageId) {
        if self.ids.insert(id, ()).is_none() {
            self.hash ^= mix(id);
        }
        self.max = self.max.max(id.0);
    }

    fn remove(&mut self, id: MessageId) {
        if self.ids.remove(&id).is_some() {
            self.hash ^= mix(id);
        }
    }

    /// The event id naming this state: `<largest id>-<set hash>`.
    pub fn event_id(&self) -> String {
        format!("{}-{:016x}", self.max, self.hash)
    }

    /// Reads an event id; `None` when it is not one of ours.
    fn parse(id: &str) -> Option<(i64, u64)> {
        let (max, hash) = id.trim().split_once('-')?;
        Some((max.parse().ok()?, u64::from_str_radix(hash, 16).ok()?))
    }

    /// What a client that was told `id` knows, given the inbox `now`: the messages of `now`
    /// up to the id's largest, if they are exactly the set the id names (nothing left the
    /// inbox since). `None` when that cannot be vouched for.
    fn resume(id: &str, now: &[Message]) -> Option<Known> {
        let (max, hash) = Known::parse(id)?;
        let mut known = Known {
            max,
            ..Known::default()
        };
        for m in now.iter().filter(|m| m.id.0 <= max) {
            known.insert(m.id);
        }
        known.max = max;
        (known.hash == hash).then_some(known)
    }
}

/// The event id naming `unread` (an inbox as a page showed it): what a page passes as the
/// stream's `?since=`. Empty when the inbox is more than a stream follows.
pub(crate) fn state_id(unread: &[Message]) -> String {
    if unread.len() >= KNOWN_LIMIT as usize {
        return String::new();
    }
    let mut known = Known::default();
    for m in unread {
        known.insert(m.id);
    }
    known.event_id()
}

/// One event of a stream, as both servers of streams write it (Rocket's route and the
/// [stream listener](listener)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LiveEvent {
    name: &'static str,
    id: String,
    /// JSON, on one line.
    data: String,
}

impl LiveEvent {
    fn json(name: &'static str, known: &Known, data: &impl serde::Serialize) -> LiveEvent {
        LiveEvent {
            name,
            id: known.event_id(),
            // Serializing these plain values cannot fail.
            data: serde_json::to_string(data).unwrap_or_else(|_| "null".into()),
        }
    }

    fn into_rocket(self) -> Event {
        Event::data(self.data).event(self.name).id(self.id)
    }

    /// The event as `text/event-stream` text, byte for byte as Rocket writes it.
    pub(crate) fn write_to(&self, out: &mut Vec<u8>) {
        for (field, value) in [
            ("id", self.id.as_str()),
            ("event", self.name),
            ("data", &self.data),
        ] {
            out.extend_from_slice(field.as_bytes());
            out.push(b':');
            out.extend_from_slice(value.as_bytes());
            out.push(b'\n');
        }
        out.push(b'\n');
    }
}

/// The inbox as a stream reads it.
struct Inbox {
    messages: Vec<Message>,
    /// More unread messages than [`KNOWN_LIMIT`]: followed by count only.
    truncated: bool,
    unread: u64,
}

/// The asks of streams answered in [batches](batch): a broadcast wakes every stream, and each
/// then checks its session and reads its inbox.
pub(crate) struct StreamAsks {
    inboxes: Arc<Batches<Store, UserId, Vec<Message>>>,
    sessions: Arc<Batches<Store, (UserId, String), bool>>,
}

impl Default for StreamAsks {
    fn default() -> StreamAsks {
        StreamAsks {
            inboxes: Batches::new(read_inboxes),
            sessions: Batches::new(check_sessions),
        }
    }
}

/// Up to [`KNOWN_LIMIT`] messages of each user's inbox: one query for them all
/// ([`crate::MessageBackend::inbox_list_many`]), the one-user query for one.
fn read_inboxes<'a>(
    store: &'a Store,
    users: &'a [UserId],
) -> BoxFuture<'a, Result<Vec<Vec<Message>>>> {
    Box::pin(async move {
        let backend = store.backend();
        match users {
            [user] => Ok(vec![
                backend
                    .inbox_list(*user, ListQuery::first(KNOWN_LIMIT))
                    .await?,
            ]),
            _ => backend.inbox_list_many(users, KNOWN_LIMIT).await,
        }
    })
}

/// Whether each stream's session goes on ([`crate::Host::sessions_active`]).
fn check_sessions<'a>(
    store: &'a Store,
    sessions: &'a [(UserId, String)],
) -> BoxFuture<'a, Result<Vec<bool>>> {
    Box::pin(async move {
        let sessions: Vec<(UserId, &str)> = sessions
            .iter()
            .map(|(user, session)| (*user, session.as_str()))
            .collect();
        Ok(store.host().sessions_active(&sessions).await)
    })
}

/// `user`'s inbox, read with the other streams' reads asked for meanwhile.
async fn read_messages(store: &Store, user: UserId) -> Result<Vec<Message>> {
    match store.stream_asks().inboxes.ask(store, user).await {
        Some(messages) => Ok(messages),
        None => {
            store
                .backend()
                .inbox_list(user, ListQuery::first(KNOWN_LIMIT))
                .await
        }
    }
}

async fn read_inbox(store: &Store, user: UserId) -> Result<Inbox> {
    let messages = read_messages(store, user).await?;
    let truncated = messages.len() >= KNOWN_LIMIT as usize;
    let unread = if truncated {
        store.backend().inbox_count(user).await?
    } else {
        messages.len() as u64
    };
    Ok(Inbox {
        messages,
        truncated,
        unread,
    })
}

/// The events that bring a client from `known` to `inbox`; updates `known`.
fn differences(known: &mut Known, inbox: &Inbox, store: &Store) -> Vec<LiveEvent> {
    if inbox.truncated {
        return resync(known, inbox);
    }
    let new = inbox
        .messages
        .iter()
        .filter(|m| !known.ids.contains_key(&m.id))
        .count();
    if new > MAX_BURST {
        return resync(known, inbox);
    }
    let mut events = Vec::new();
    let current: BTreeMap<MessageId, ()> = inbox.messages.iter().map(|m| (m.id, ())).collect();
    for m in &inbox.messages {
        if !known.ids.contains_key(&m.id) {
            known.insert(m.id);
            events.push(LiveEvent::json(
                "message",
                known,
                &ApiMessage::new(m, store.level_tags()),
            ));
        }
    }
    let gone: Vec<MessageId> = known
        .ids
        .keys()
        .filter(|id| !current.contains_key(id))
        .copied()
        .collect();
    if !gone.is_empty() {
        for id in &gone {
            known.remove(*id);
        }
        let ids: Vec<String> = gone.iter().map(MessageId::to_string).collect();
        events.push(LiveEvent::json("read", known, &json!({ "ids": ids })));
    }
    if !events.is_empty() {
        events.push(count(known, inbox.unread));
    }
    events
}

fn count(known: &Known, unread: u64) -> LiveEvent {
    LiveEvent::json("count", known, &json!({ "unread": unread }))
}

/// Tells the client to reload, and takes `inbox` as what it then knows.
fn resync(known: &mut Known, inbox: &Inbox) -> Vec<LiveEvent> {
    let max = known.max;
    *known = Known::default();
    for m in &inbox.messages {
        known.insert(m.id);
    }
    known.max = known.max.max(max);
    vec![LiveEvent::json(
        "resync",
        known,
        &json!({ "unread": inbox.unread }),
    )]
}

/// The first events of a stream: `count` for a new client, the missed messages (or
/// `resync`) for one that resumes from `last`.
fn opening(known: &mut Known, inbox: &Inbox, last: Option<&str>, store: &Store) -> Vec<LiveEvent> {
    let mut events = Vec::new();
    match last {
        Some(last) => match Known::resume(last, &inbox.messages).filter(|_| !inbox.truncated) {
            Some(resumed) => {
                *known = resumed;
                let missed = differences(known, inbox, store);
                if missed.is_empty() {
                    events.push(count(known, inbox.unread));
                } else {
                    events.extend(missed);
                }
            }
            None => events.extend(resync(known, inbox)),
        },
        None => {
            for m in &inbox.messages {
                known.insert(m.id);
            }
            events.push(count(known, inbox.unread));
        }
    }
    events
}

/// The id the client last saw: `Last-Event-ID` (a reconnect), or `?since=` (a page passing
/// the state its HTML showed).
pub struct LastEventId(Option<String>);

#[rocket::async_trait]
impl<'r> rocket::request::FromRequest<'r> for LastEventId {
    type Error = std::convert::Infallible;

    async fn from_request(
        request: &'r rocket::Request<'_>,
    ) -> rocket::request::Outcome<Self, Self::Error> {
        let header = request
            .headers()
            .get_one("Last-Event-ID")
            .map(str::to_string);
        let query = || {
            request
                .query_value::<&str>("since")
                .and_then(|v| v.ok())
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        rocket::request::Outcome::Success(LastEventId(
            header.filter(|h| !h.is_empty()).or_else(query),
        ))
    }
}

/// The largest piece of a stream written at once. Rocket keeps a buffer of this size for
/// every open response (4 KiB by default); events are a few hundred bytes, and a longer one
/// is simply written in several pieces.
const CHUNK: usize = 512;

/// A server-sent event stream with the header nginx needs not to buffer it, written in
/// pieces of at most 512 bytes (`CHUNK`), so that an idle stream holds a small buffer.
pub struct LiveStream<S> {
    stream: EventStream<S>,
}

impl<'r, S> rocket::response::Responder<'r, 'r> for LiveStream<S>
where
    S: rocket::futures::Stream<Item = Event> + Send + 'r,
{
    fn respond_to(self, request: &'r rocket::Request<'_>) -> rocket::response::Result<'r> {
        let mut response = self.stream.respond_to(request)?;
        response.set_header(Header::new("X-Accel-Buffering", "no"));
        // One user's data, like every API answer: no cache may keep it.
        response.set_header(Header::new("Cache-Control", "private, no-store, no-cache"));
        response.set_max_chunk_size(CHUNK);
        Ok(response)
    }
}

/// What ties a stream to its session (see [`crate::Host::stream_session`]).
pub struct StreamSession(Option<String>);

#[rocket::async_trait]
impl<'r> rocket::request::FromRequest<'r> for StreamSession {
    type Error = std::convert::Infallible;

    async fn from_request(
        request: &'r rocket::Request<'_>,
    ) -> rocket::request::Outcome<Self, Self::Error> {
        let session = match request.rocket().state::<Store>() {
            Some(store) => store.host().stream_session(request).await,
            None => None,
        };
        rocket::request::Outcome::Success(StreamSession(session))
    }
}

/// The tag a page passes as the stream's `?session=`: FNV-1a (32 bits, hex) of the page's
/// CSRF token, which is bound to the session the page was drawn for. It names the session
/// without revealing the token; `stored-messages.js` computes the same.
pub fn page_tag(csrf_token: &str) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in csrf_token.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("{hash:08x}")
}

/// A page's stream, and the reads with which its script reloads the list (`GET <api>/inbox`
/// and `<api>/count`), must be of the session the page was drawn for (`?session=`, see
/// [`page_tag`]): a tab left open after a logout, whose browser has since logged in again
/// (as someone else, or anew), gets 401 instead of the new session's inbox. Without the
/// parameter (a client of its own), any session of the user will do.
pub struct PageSession(bool);

impl PageSession {
    /// 401, with the API's JSON error, for a page of another session.
    pub(crate) fn check(&self) -> crate::api::ApiResult<()> {
        if self.0 {
            return Ok(());
        }
        Err(crate::api::ApiError::new(
            rocket::http::Status::Unauthorized,
            "this page belongs to a session that ended: reload it",
        ))
    }
}

#[rocket::async_trait]
impl<'r> rocket::request::FromRequest<'r> for PageSession {
    type Error = std::convert::Infallible;

    async fn from_request(
        request: &'r rocket::Request<'_>,
    ) -> rocket::request::Outcome<Self, Self::Error> {
        let wanted = request
            .query_value::<&str>("session")
            .and_then(|v| v.ok())
            .filter(|v| !v.is_empty());
        let same = match wanted {
            Some(tag) => page_tag(&crate::csrf::resolve_token(request).await) == tag,
            None => true,
        };
        rocket::request::Outcome::Success(PageSession(same))
    }
}

/// Whether a stream of `user` tied to `session` may go on; asked with the other streams'
/// checks meanwhile.
pub(crate) async fn session_goes_on(store: &Store, user: UserId, session: Option<&str>) -> bool {
    let Some(session) = session else {
        return true;
    };
    let asks = &store.stream_asks().sessions;
    match asks.ask(store, (user, session.to_string())).await {
        Some(active) => active,
        None => store.host().session_active(user, session).await,
    }
}

/// Why a stream could not open.
#[derive(Debug)]
pub(crate) enum Refused {
    /// The user holds [`MAX_STREAMS_PER_USER`] streams on this instance already.
    TooMany,
    /// The store did not answer.
    Store(crate::Error),
}

impl From<Refused> for crate::api::ApiError {
    fn from(refused: Refused) -> crate::api::ApiError {
        match refused {
            Refused::TooMany => crate::api::ApiError::new(
                rocket::http::Status::TooManyRequests,
                format!(
                    "too many live streams: at most {MAX_STREAMS_PER_USER} per user on this server \
                     (the tabs of a browser can share one); a closed stream is let go within {} s",
                    HEARTBEAT.as_secs()
                ),
            ),
            Refused::Store(e) => e.into(),
        }
    }
}

/// One client's stream: what it was told of its user's inbox, and how to tell it more.
/// Both servers of streams use it: Rocket's route and the [stream listener](listener).
pub(crate) struct Follower {
    store: Store,
    user: UserId,
    /// What ties the stream to its session ([`crate::Host::stream_session`]).
    session: Option<String>,
    registration: Registration,
    known: Known,
    checks: rocket::tokio::time::Interval,
    _open: Open,
}

impl Follower {
    /// Opens a stream of `user`'s inbox for a client that last saw the event id `last`; with
    /// its first events (the `retry:` hint is the server's to write).
    pub(crate) async fn open(
        store: Store,
        user: UserId,
        session: Option<String>,
        last: Option<&str>,
    ) -> std::result::Result<(Follower, Vec<LiveEvent>), Refused> {
        // Registered before the inbox is read: a change after the read is not missed.
        let registration = StreamHub::register(&store, user).ok_or(Refused::TooMany)?;
        let inbox = read_inbox(&store, user).await.map_err(Refused::Store)?;
        let mut known = Known::default();
        let first = opening(&mut known, &inbox, last, &store);
        let period = rocket::tokio::time::Instant::now() + SESSION_CHECK;
        let mut checks = rocket::tokio::time::interval_at(period, SESSION_CHECK);
        checks.set_missed_tick_behavior(rocket::tokio::time::MissedTickBehavior::Delay);
        let follower = Follower {
            _open: Open::new(store.clone()),
            store,
            user,
            session,
            registration,
            known,
            checks,
        };
        Ok((follower, first))
    }

    /// The events of the inbox's next change; `None` when the stream ends: its session did,
    /// the change feed is gone, or the store failed (the client then reconnects, and resumes
    /// from its last id once the store answers again).
    pub(crate) async fn next(&mut self) -> Option<Vec<LiveEvent>> {
        loop {
            let woken = rocket::tokio::select! {
                _ = self.registration.signal.notify.notified() => true,
                _ = self.checks.tick(), if self.session.is_some() => false,
            };
            if self.registration.signal.closed.load(Ordering::SeqCst) {
                return None;
            }
            // Ending a user's sessions is announced as a change of that user: checked
            // before anything more is sent.
            if !session_goes_on(&self.store, self.user, self.session.as_deref()).await {
                log::debug!(
                    "stored-messages: a live stream of user {} ends with its session",
                    self.user
                );
                return None;
            }
            if !woken {
                continue;
            }
            match read_inbox(&self.store, self.user).await {
                Ok(inbox) => {
                    let events = differences(&mut self.known, &inbox, &self.store);
                    if !events.is_empty() {
                        return Some(events);
                    }
                }
                Err(e) => {
                    log::warn!(
                        "stored-messages: a live stream of user {} ends: {}",
                        self.user,
                        crate::report(&e)
                    );
                    return None;
                }
            }
        }
    }

    /// [`Follower::next`], owning the follower: a server that waits for other things as well
    /// keeps this future across them instead of dropping a wait that was half done.
    pub(crate) async fn step(mut self) -> (Follower, Option<Vec<LiveEvent>>) {
        let events = self.next().await;
        (self, events)
    }
}

/// Follows a stream for Rocket, until it ends or the server shuts down.
fn follow(
    mut follower: Follower,
    first: Vec<LiveEvent>,
    mut shutdown: Shutdown,
) -> EventStream<impl rocket::futures::Stream<Item = Event>> {
    EventStream! {
        yield Event::retry(RETRY);
        for event in first {
            yield event.into_rocket();
        }
        loop {
            let events = rocket::tokio::select! {
                events = follower.next() => events,
                _ = &mut shutdown => None,
            };
            let Some(events) = events else { break };
            for event in events {
                yield event.into_rocket();
            }
        }
    }
    .heartbeat(HEARTBEAT)
}

/// What `GET <api>/stream` answers: the stream, or with a [stream listener](listener), a
/// redirect to it with a ticket.
pub(crate) enum StreamAnswer<S> {
    Here(LiveStream<S>),
    Elsewhere(String),
}

impl<'r, S> rocket::response::Responder<'r, 'r> for StreamAnswer<S>
where
    S: rocket::futures::Stream<Item = Event> + Send + 'r,
{
    fn respond_to(self, request: &'r rocket::Request<'_>) -> rocket::response::Result<'r> {
        match self {
            StreamAnswer::Here(stream) => stream.respond_to(request),
            StreamAnswer::Elsewhere(url) => rocket::Response::build()
                .status(rocket::http::Status::TemporaryRedirect)
                .raw_header("Location", url)
                // The ticket is short-lived and one user's: no cache may keep it.
                .raw_header("Cache-Control", "private, no-store")
                .ok(),
        }
    }
}

/// `GET <api>/stream`: the current user's inbox, live (see the [module](self)).
#[get("/stream")]
pub(crate) async fn stream(
    user: ApiUser,
    page: PageSession,
    session: StreamSession,
    store: &State<Store>,
    last: LastEventId,
    shutdown: Shutdown,
    listener: listener::Tickets<'_>,
) -> crate::api::ApiResult<StreamAnswer<impl rocket::futures::Stream<Item = Event>>> {
    page.check()?;
    if let Some(url) = listener.redirect(user.0, session.0.as_deref(), last.0.as_deref()) {
        return Ok(StreamAnswer::Elsewhere(url));
    }
    let (follower, first) =
        Follower::open(store.inner().clone(), user.0, session.0, last.0.as_deref()).await?;
    Ok(StreamAnswer::Here(LiveStream {
        stream: follow(follower, first, shutdown),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_name_the_set() {
        let mut a = Known::default();
        a.insert(MessageId(3));
        a.insert(MessageId(7));
        let mut b = Known::default();
        b.insert(MessageId(7));
        b.insert(MessageId(3));
        assert_eq!(a.event_id(), b.event_id());
        b.remove(MessageId(3));
        assert_ne!(a.event_id(), b.event_id());
        assert_eq!(Known::parse(&a.event_id()), Some((7, a.hash)));
        assert_eq!(Known::parse("garbage"), None);
        assert_eq!(Known::parse("5-zz"), None);
    }

    /// FNV-1a's published 32-bit values; stored-messages.js's pageTag gives the same (its
    /// `Math.imul` multiplication wraps as `wrapping_mul` does).
    #[test]
    fn page_tags_are_fnv1a() {
        assert_eq!(page_tag(""), "811c9dc5");
        assert_eq!(page_tag("a"), "e40c292c");
        assert_eq!(page_tag("abc"), "1a47e90b");
    }
}
