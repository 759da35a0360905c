//! The inbox cache: the first unread messages of recently seen users, kept in process memory
//! so that pages and the JSON API read a user's inbox without a query.
//!
//! [`CachedBackend`] wraps any [`MessageBackend`]. It answers `inbox_list` (first pages, no
//! cursor) and `inbox_count` from the cache and passes everything else through. It is kept
//! correct in two ways:
//!
//! - **writes of this process** go through the wrapper, which drops the entries of the users
//!   a write touched once the write returns;
//! - **writes of other processes** (the CLI, other app servers) are reported by the backend
//!   through [`MessageBackend::watch_changes`]: PostgreSQL `LISTEN`/`NOTIFY` sent in the
//!   writing transaction, Redis `PUBLISH` from the writing script, SQLite's `data_version`
//!   polled on a connection of its own (it cannot tell whose write it saw, so on SQLite any
//!   write empties the cache within `inbox_cache_poll_ms`). A backend that cannot report
//!   them (the default for custom backends) is never cached.
//!
//! Fills cannot resurrect stale data: each user hashes to a stripe with a generation
//! counter, an invalidation bumps it, and a fill is kept only when the generation it read
//! before querying is still current. While the change feed is down nothing is cached, and
//! when it comes back the cache starts empty. Entries also expire after
//! [`MAX_ENTRY_AGE`], a bound on staleness should a notification ever be lost.
//!
//! What it deliberately does not cache: archives, pages after a cursor, `inbox_get`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rocket::tokio::sync::watch;

use super::{
    Cleanup, Expiry, ListQuery, MessageBackend, MessageStats, Settings as BackendSettings,
};
use crate::error::Result;
use crate::level::Level;
use crate::message::{Message, MessageId, NewMessage, UserId};
use crate::request::MAX_STREAM_STORED;

/// An entry older than this is read again from the backend.
pub const MAX_ENTRY_AGE: Duration = Duration::from_secs(60);
/// A write to more users than this drops the whole cache rather than one entry per user.
const MANY_USERS: usize = 256;
/// Generation stripes: users hash onto these, so unrelated writes rarely spoil a fill.
const STRIPES: usize = 64;

/// What changed, as a backend's change feed reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The inboxes of these users changed.
    Users(Vec<UserId>),
    /// Anything may have changed.
    All,
}

impl Change {
    /// The form used in PostgreSQL notifications and Redis messages: user ids separated by
    /// commas, or `*`.
    pub fn payload(users: &[i64]) -> String {
        if users.len() > MANY_USERS {
            return "*".to_string();
        }
        let ids: Vec<String> = users.iter().map(i64::to_string).collect();
        ids.join(",")
    }

    /// Reads a payload written by [`Change::payload`] (empty: nobody); anything else counts
    /// as `All`.
    pub fn parse(payload: &str) -> Change {
        if payload.trim().is_empty() {
            return Change::Users(Vec::new());
        }
        let ids: Option<Vec<UserId>> = payload
            .split(',')
            .map(|id| id.trim().parse().ok().map(UserId))
            .collect();
        ids.map_or(Change::All, Change::Users)
    }
}

/// The handle a backend's change feed reports through. Cheap to clone.
#[derive(Clone)]
pub struct ChangeSink {
    cache: Weak<InboxCache>,
    stop: watch::Receiver<()>,
}

impl ChangeSink {
    /// The feed is listening: from now on every change is reported. Clears the cache and
    /// lets it fill.
    pub fn live(&self) {
        if let Some(cache) = self.cache.upgrade() {
            cache.clear();
            cache.live.store(true, Ordering::SeqCst);
            cache.note_change();
        }
    }

    /// The feed lost its connection: changes may be missed, so caching stops until
    /// [`ChangeSink::live`].
    pub fn lost(&self) {
        if let Some(cache) = self.cache.upgrade() {
            cache.live.store(false, Ordering::SeqCst);
            cache.clear();
            cache.note_change();
        }
    }

    /// Something changed elsewhere.
    pub fn changed(&self, change: Change) {
        if let Some(cache) = self.cache.upgrade() {
            match change {
                Change::Users(users) => cache.invalidate_users(&users),
                Change::All => cache.clear(),
            }
            cache.note_change();
        }
    }

    /// Whether the cache is gone, so the feed should end.
    pub fn is_closed(&self) -> bool {
        self.cache.strong_count() == 0
    }

    /// Resolves when the cache is dropped: select on it to end a feed's task.
    pub async fn closed(&self) {
        let mut stop = self.stop.clone();
        while stop.changed().await.is_ok() {}
    }
}

/// Turns the cache off when dropped: held by the change feed's task.
struct FeedEnded(ChangeSink);

impl Drop for FeedEnded {
    fn drop(&mut self) {
        self.0.lost();
    }
}

struct Entry {
    messages: Arc<[Message]>,
    /// The user has no unread messages beyond these.
    complete: bool,
    filled: Instant,
}

/// Entries and their weight: each counts its messages plus one, so empty inboxes are
/// bounded too.
#[derive(Default)]
struct Entries {
    map: HashMap<UserId, Entry>,
    messages: usize,
}

fn weight(entry: &Entry) -> usize {
    entry.messages.len() + 1
}

/// The cache itself; see the module docs.
pub(crate) struct InboxCache {
    entries: Mutex<Entries>,
    generations: [AtomicU64; STRIPES],
    live: AtomicBool,
    max_messages: usize,
    expiry: Expiry,
    /// Counts reports from the change feed; tests wait on it instead of sleeping.
    seen: watch::Sender<u64>,
    /// Dropped with the cache, which ends the feed's task.
    _stop: watch::Sender<()>,
}

impl InboxCache {
    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stripe(user: UserId) -> usize {
        (user.0.unsigned_abs() as usize) % STRIPES
    }

    fn generation(&self, user: UserId) -> u64 {
        self.generations[Self::stripe(user)].load(Ordering::SeqCst)
    }

    fn note_change(&self) {
        self.seen.send_modify(|n| *n += 1);
    }

    fn invalidate_users(&self, users: &[UserId]) {
        if users.len() > MANY_USERS {
            return self.clear();
        }
        for user in users {
            self.generations[Self::stripe(*user)].fetch_add(1, Ordering::SeqCst);
        }
        let mut entries = self.lock();
        for user in users {
            if let Some(entry) = entries.map.remove(user) {
                entries.messages -= weight(&entry);
            }
        }
    }

    fn clear(&self) {
        for generation in &self.generations {
            generation.fetch_add(1, Ordering::SeqCst);
        }
        let mut entries = self.lock();
        entries.map.clear();
        entries.messages = 0;
    }

    fn get(&self, user: UserId) -> Option<(Arc<[Message]>, bool)> {
        if !self.live.load(Ordering::SeqCst) {
            return None;
        }
        let entries = self.lock();
        let entry = entries.map.get(&user)?;
        (entry.filled.elapsed() < MAX_ENTRY_AGE).then(|| (entry.messages.clone(), entry.complete))
    }

    /// Keeps what a fill read, unless the user's stripe changed since `generation`.
    fn put(&self, user: UserId, generation: u64, messages: Vec<Message>, complete: bool) {
        let entry = Entry {
            messages: messages.into(),
            complete,
            filled: Instant::now(),
        };
        let size = weight(&entry);
        if !self.live.load(Ordering::SeqCst) || size > self.max_messages {
            return;
        }
        let mut entries = self.lock();
        // Checked under the lock: an invalidation bumps the generation before it takes the
        // lock to remove entries, so it either sees this entry or spoils this fill.
        if self.generation(user) != generation {
            return;
        }
        if let Some(old) = entries.map.remove(&user) {
            entries.messages -= weight(&old);
        }
        if entries.messages + size > self.max_messages {
            // Aged entries go first, then arbitrary ones (HashMap order is effectively
            // random) until there is room.
            entries
                .map
                .retain(|_, e| e.filled.elapsed() < MAX_ENTRY_AGE);
            entries.messages = entries.map.values().map(weight).sum();
            while entries.messages + size > self.max_messages {
                let Some(victim) = entries.map.keys().next().copied() else {
                    break;
                };
                if let Some(old) = entries.map.remove(&victim) {
                    entries.messages -= weight(&old);
                }
            }
        }
        entries.messages += size;
        entries.map.insert(user, entry);
    }
}

/// A [`MessageBackend`] with an inbox cache in front; see the module docs.
pub struct CachedBackend {
    inner: Arc<dyn MessageBackend>,
    cache: Arc<InboxCache>,
}

impl CachedBackend {
    /// Wraps `inner` with a cache of at most `max_messages` messages, and starts the
    /// backend's change feed in a task of the current Tokio runtime. Until the feed reports
    /// that it listens (never, for a backend without one), every call passes through.
    pub fn new(
        inner: Arc<dyn MessageBackend>,
        settings: &BackendSettings,
        max_messages: usize,
    ) -> CachedBackend {
        let (stop, stop_rx) = watch::channel(());
        let cache = Arc::new(InboxCache {
            entries: Mutex::new(Entries::default()),
            generations: std::array::from_fn(|_| AtomicU64::new(0)),
            live: AtomicBool::new(false),
            max_messages,
            expiry: settings.expiry,
            seen: watch::channel(0).0,
            _stop: stop,
        });
        let sink = ChangeSink {
            cache: Arc::downgrade(&cache),
            stop: stop_rx,
        };
        if max_messages > 0 {
            if let Ok(runtime) = rocket::tokio::runtime::Handle::try_current() {
                let backend = Arc::clone(&inner);
                runtime.spawn(async move {
                    // However the feed ends (the cache is gone, an error, a panic, its
                    // runtime shutting down), the cache stops serving what it cannot check.
                    let _stop = FeedEnded(sink.clone());
                    if let Err(e) = backend.watch_changes(sink).await {
                        log::warn!(
                            "stored-messages: inbox cache off, change feed failed: {}",
                            crate::report(&e)
                        );
                    }
                });
            }
        }
        CachedBackend { inner, cache }
    }

    /// Whether reads are being served from the cache (the change feed is listening).
    pub fn is_live(&self) -> bool {
        self.cache.live.load(Ordering::SeqCst)
    }

    /// Waits until the change feed reports something more than it had when `seen` was read
    /// from [`CachedBackend::changes_seen`]. For tests: an event to wait on, not a sleep.
    pub async fn wait_for_change(&self, seen: u64) {
        let mut rx = self.cache.seen.subscribe();
        let _ = rx.wait_for(|n| *n > seen).await;
    }

    /// How many reports the change feed made so far.
    pub fn changes_seen(&self) -> u64 {
        *self.cache.seen.borrow()
    }

    /// The backend behind the cache.
    pub fn inner(&self) -> &Arc<dyn MessageBackend> {
        &self.inner
    }

    fn cutoff(&self) -> DateTime<Utc> {
        self.cache.expiry.inbox_cutoff(Utc::now())
    }

    /// The user's first unread messages (at most the window) and whether that is all of
    /// them, from the cache or by a fill.
    async fn window(&self, user: UserId) -> Result<(Arc<[Message]>, bool)> {
        if let Some(hit) = self.cache.get(user) {
            return Ok(hit);
        }
        let generation = self.cache.generation(user);
        let window = MAX_STREAM_STORED as usize;
        let mut messages = self
            .inner
            .inbox_list(user, ListQuery::first(MAX_STREAM_STORED + 1))
            .await?;
        let complete = messages.len() <= window;
        messages.truncate(window);
        let shared: Arc<[Message]> = messages.clone().into();
        self.cache.put(user, generation, messages, complete);
        Ok((shared, complete))
    }

    fn touched(&self, users: &[UserId]) {
        self.cache.invalidate_users(users);
    }
}

#[rocket::async_trait]
impl MessageBackend for CachedBackend {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn can_handle(&self, level: Level) -> bool {
        self.inner.can_handle(level)
    }

    async fn create_message(&self, message: &NewMessage) -> Result<Message> {
        self.inner.create_message(message).await
    }

    async fn archive_store(&self, users: &[UserId], message: &Message) -> Result<u64> {
        // The archive is not cached, and an archive-only store leaves inboxes alone.
        self.inner.archive_store(users, message).await
    }

    async fn inbox_store(&self, users: &[UserId], message: &Message) -> Result<u64> {
        let result = self.inner.inbox_store(users, message).await;
        self.touched(users);
        result
    }

    async fn deliver(&self, users: &[UserId], message: &NewMessage) -> Result<Message> {
        let result = self.inner.deliver(users, message).await;
        self.touched(users);
        result
    }

    async fn inbox_list(&self, user: UserId, query: ListQuery) -> Result<Vec<Message>> {
        let limit = query.limit.map(|n| n as usize);
        let cacheable = query.after.is_none()
            && limit.is_some_and(|n| n <= MAX_STREAM_STORED as usize + 1)
            && self.is_live();
        if !cacheable {
            return self.inner.inbox_list(user, query).await;
        }
        let limit = limit.unwrap_or_default();
        let (messages, complete) = self.window(user).await?;
        let cutoff = self.cutoff();
        let fresh: Vec<Message> = messages
            .iter()
            .filter(|m| m.date >= cutoff)
            .take(limit)
            .cloned()
            .collect();
        // A partial window can answer only what it holds.
        if fresh.len() < limit && !complete {
            return self.inner.inbox_list(user, query).await;
        }
        Ok(fresh)
    }

    async fn inbox_count(&self, user: UserId) -> Result<u64> {
        if self.is_live() {
            let (messages, complete) = self.window(user).await?;
            if complete {
                let cutoff = self.cutoff();
                return Ok(messages.iter().filter(|m| m.date >= cutoff).count() as u64);
            }
        }
        self.inner.inbox_count(user).await
    }

    async fn inbox_get(&self, user: UserId, id: MessageId) -> Result<Message> {
        self.inner.inbox_get(user, id).await
    }

    async fn inbox_delete(&self, user: UserId, id: MessageId) -> Result<()> {
        let result = self.inner.inbox_delete(user, id).await;
        self.touched(&[user]);
        result
    }

    async fn inbox_delete_many(&self, user: UserId, ids: &[MessageId]) -> Result<Vec<MessageId>> {
        let result = self.inner.inbox_delete_many(user, ids).await;
        self.touched(&[user]);
        result
    }

    async fn inbox_purge(&self, user: UserId) -> Result<u64> {
        let result = self.inner.inbox_purge(user).await;
        self.touched(&[user]);
        result
    }

    async fn archive_list(&self, user: UserId, query: ListQuery) -> Result<Vec<Message>> {
        self.inner.archive_list(user, query).await
    }

    async fn expired_messages_cleanup(&self, now: DateTime<Utc>) -> Result<Cleanup> {
        let result = self.inner.expired_messages_cleanup(now).await;
        self.cache.clear();
        result
    }

    async fn flush(&self) -> Result<()> {
        let result = self.inner.flush().await;
        self.cache.clear();
        result
    }

    async fn deliver_once(&self, users: &[UserId], message: &Message) -> Result<u64> {
        let result = self.inner.deliver_once(users, message).await;
        self.touched(users);
        result
    }

    async fn message_stats(
        &self,
        limit: u32,
        before: Option<MessageId>,
    ) -> Result<Vec<MessageStats>> {
        self.inner.message_stats(limit, before).await
    }

    async fn message_delete(&self, id: MessageId) -> Result<u64> {
        let result = self.inner.message_delete(id).await;
        self.cache.clear();
        result
    }

    async fn spill_put(&self, key: &str, payload: &str, expires: DateTime<Utc>) -> Result<()> {
        self.inner.spill_put(key, payload, expires).await
    }

    async fn spill_get(&self, key: &str) -> Result<Option<String>> {
        self.inner.spill_get(key).await
    }

    async fn spill_delete(&self, key: &str) -> Result<()> {
        self.inner.spill_delete(key).await
    }

    async fn watch_changes(&self, sink: ChangeSink) -> Result<bool> {
        self.inner.watch_changes(sink).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(max_messages: usize) -> InboxCache {
        InboxCache {
            entries: Mutex::new(Entries::default()),
            generations: std::array::from_fn(|_| AtomicU64::new(0)),
            live: AtomicBool::new(true),
            max_messages,
            expiry: BackendSettings::default().expiry,
            seen: watch::channel(0).0,
            _stop: watch::channel(()).0,
        }
    }

    #[test]
    fn entries_stay_within_the_bound_even_when_empty() {
        let cache = cache(10);
        for user in 0..100 {
            let generation = cache.generation(UserId(user));
            cache.put(UserId(user), generation, Vec::new(), true);
            let entries = cache.lock();
            assert!(
                entries.messages <= 10,
                "{} after user {user}",
                entries.messages
            );
            assert_eq!(entries.messages, entries.map.len());
        }
        assert!(cache.get(UserId(99)).is_some());
    }

    #[test]
    fn a_fill_that_raced_an_invalidation_is_dropped() {
        let cache = cache(10);
        let generation = cache.generation(UserId(1));
        cache.invalidate_users(&[UserId(1)]);
        cache.put(UserId(1), generation, Vec::new(), true);
        assert!(cache.get(UserId(1)).is_none());
        // another stripe is not spoiled
        let generation = cache.generation(UserId(2));
        cache.invalidate_users(&[UserId(3)]);
        cache.put(UserId(2), generation, Vec::new(), true);
        assert!(cache.get(UserId(2)).is_some());
        // nothing is served while the feed is down
        cache.live.store(false, Ordering::SeqCst);
        assert!(cache.get(UserId(2)).is_none());
    }

    #[test]
    fn payloads_round_trip() {
        assert_eq!(Change::payload(&[1, 22, 333]), "1,22,333");
        assert_eq!(
            Change::parse("1,22,333"),
            Change::Users(vec![UserId(1), UserId(22), UserId(333)])
        );
        let many: Vec<i64> = (0..=MANY_USERS as i64).collect();
        assert_eq!(Change::payload(&many), "*");
        assert_eq!(Change::parse("*"), Change::All);
        assert_eq!(Change::parse(""), Change::Users(vec![]));
        assert_eq!(Change::parse("1,x"), Change::All);
    }
}
