//! The inbox cache: the first unread messages of recently seen users, kept in process memory
//! so that pages and the JSON API read a user's inbox without a query.
//!
//! [`CachedBackend`] wraps any [`MessageBackend`]. It answers `inbox_list` (first pages, no
//! cursor) and `inbox_count` from the cache and passes everything else through.
//!
//! # What it guarantees
//!
//! A cached answer is never older than a query would be: a write that has returned in any
//! process (this one, the CLI, another app instance) is seen by every read that starts
//! after it. How:
//!
//! - **writes of this process** go through the wrapper, which drops the entries of the users
//!   a write touched before the write returns;
//! - **writes of other processes** reach the [`ChangeFeed`], which drops their entries from
//!   its own task; and before it answers from an entry, a read waits for
//!   [`ChangeFeed::sync`], which returns only once every change committed before the read
//!   began has been reported. A read that finds no entry queries the backend (and keeps the
//!   answer), so it needs no sync.
//! - Fills cannot resurrect stale data: each user hashes to a stripe with a generation
//!   counter, an invalidation bumps it, and a fill is kept only when the generation it read
//!   before querying is still current.
//! - While the feed is down, or a sync fails, nothing is answered from the cache: reads go
//!   to the backend, and when the feed comes back the cache starts empty. A backend without
//!   a feed (the default for custom backends) is never cached.
//!
//! Entries also expire after [`MAX_ENTRY_AGE`], which bounds memory held for users who left.
//! An entry the JSON API reads keeps its messages' JSON as well, written on the first such
//! read (see `Window::json`).
//!
//! What it deliberately does not cache: archives, pages after a cursor, `inbox_get`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::{
    Cleanup, Expiry, FlashSpill, ListQuery, MessageAdmin, MessageBackend, MessageStats,
    Settings as BackendSettings, WatchChanges,
};
use crate::changes::{Change, ChangeFeed, LISTED_USERS};
use crate::error::Result;
use crate::level::Level;
use crate::message::MAX_STREAM_STORED;
use crate::message::{LevelTags, Message, MessageId, NewMessage, UserId};

/// An entry older than this is read again from the backend.
pub const MAX_ENTRY_AGE: Duration = Duration::from_secs(60);
/// Generation stripes: users hash onto these, so unrelated writes rarely spoil a fill.
const STRIPES: usize = 64;

/// The first unread messages of one inbox, as a fill read them, shared by the entry and
/// every answer picked out of it.
#[derive(Debug)]
pub(crate) struct Window {
    messages: Box<[Message]>,
    /// Each message as the JSON API writes it, kept by the first API read of the entry
    /// (writing a message costs more than copying it, and the API reads an entry many
    /// times). Pages never ask for it, so an entry only they read does not hold it.
    json: OnceLock<WindowJson>,
}

/// The JSON of a window's messages, one after the other, and the tags it was written with.
#[derive(Debug)]
pub(crate) struct WindowJson {
    tags: LevelTags,
    bytes: Box<[u8]>,
    /// Where each message's JSON ends in `bytes`.
    ends: Box<[usize]>,
}

impl Window {
    pub(crate) fn new(messages: Vec<Message>) -> Window {
        Window {
            messages: messages.into(),
            json: OnceLock::new(),
        }
    }

    /// The messages' JSON as `write` writes each with `tags`: written by the first caller,
    /// then kept. `None` when the window already keeps JSON written with other tags (two
    /// stores with different tags sharing one cache): the caller writes its own.
    pub(crate) fn json(
        &self,
        tags: &LevelTags,
        write: impl Fn(&mut Vec<u8>, &Message),
    ) -> Option<&WindowJson> {
        let json = match self.json.get() {
            Some(json) => json,
            None => {
                let mut bytes = Vec::with_capacity(self.messages.len() * 256);
                let mut ends = Vec::with_capacity(self.messages.len());
                for m in self.messages.iter() {
                    write(&mut bytes, m);
                    ends.push(bytes.len());
                }
                // Another request may have set it meanwhile; theirs is kept.
                self.json.get_or_init(|| WindowJson {
                    tags: tags.clone(),
                    bytes: bytes.into(),
                    ends: ends.into(),
                })
            }
        };
        (json.tags == *tags).then_some(json)
    }
}

impl WindowJson {
    /// Message `i`'s JSON.
    pub(crate) fn message(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }
}

struct Entry {
    window: Arc<Window>,
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
    entry.window.messages.len() + 1
}

/// Messages of one inbox as the cache answers them: picked out of a shared entry, not
/// copied (a page of the API is written straight from them), or read from the backend.
#[derive(Debug, Clone)]
pub(crate) enum Listed {
    /// Read from the backend.
    Owned(Vec<Message>),
    /// Picked out of a cache entry: indices into it, in order.
    Shared(Arc<Window>, Vec<usize>),
}

impl Listed {
    /// All of `messages`.
    pub(crate) fn all(messages: Vec<Message>) -> Listed {
        Listed::Owned(messages)
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Listed::Owned(messages) => messages.len(),
            Listed::Shared(_, picked) => picked.len(),
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Message> {
        let (messages, picked): (&[Message], Option<&[usize]>) = match self {
            Listed::Owned(messages) => (messages, None),
            Listed::Shared(window, picked) => (&window.messages, Some(picked)),
        };
        (0..self.len()).map(move |k| &messages[picked.map_or(k, |picked| picked[k])])
    }

    pub(crate) fn last(&self) -> Option<&Message> {
        match self {
            Listed::Owned(messages) => messages.last(),
            Listed::Shared(window, picked) => picked.last().map(|&i| &window.messages[i]),
        }
    }

    /// Keeps the first `n`.
    pub(crate) fn truncate(&mut self, n: usize) {
        match self {
            Listed::Owned(messages) => messages.truncate(n),
            Listed::Shared(_, picked) => picked.truncate(n),
        }
    }

    /// The messages, copied only when they are the cache's.
    pub(crate) fn into_vec(self) -> Vec<Message> {
        match self {
            Listed::Owned(messages) => messages,
            Listed::Shared(window, picked) => picked
                .into_iter()
                .map(|i| window.messages[i].clone())
                .collect(),
        }
    }
}

/// The cache itself; see the module docs.
pub(crate) struct InboxCache {
    entries: Mutex<Entries>,
    generations: [AtomicU64; STRIPES],
    max_messages: usize,
    expiry: Expiry,
}

impl InboxCache {
    fn new(max_messages: usize, expiry: Expiry) -> InboxCache {
        InboxCache {
            entries: Mutex::new(Entries::default()),
            generations: std::array::from_fn(|_| AtomicU64::new(0)),
            max_messages,
            expiry,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stripe(user: UserId) -> usize {
        (user.0.unsigned_abs() as usize) % STRIPES
    }

    fn generation(&self, user: UserId) -> u64 {
        self.generations[Self::stripe(user)].load(Ordering::SeqCst)
    }

    fn apply(&self, change: &Change) {
        match change {
            Change::Users(users) => self.invalidate_users(users),
            Change::All => self.clear(),
        }
    }

    fn invalidate_users(&self, users: &[UserId]) {
        if users.len() > LISTED_USERS {
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

    /// The user's entry, unless it aged out. Whether it is still current is the caller's
    /// business (see [`CachedBackend::window`]).
    fn get(&self, user: UserId) -> Option<(Arc<Window>, bool)> {
        let entries = self.lock();
        let entry = entries.map.get(&user)?;
        (entry.filled.elapsed() < MAX_ENTRY_AGE).then(|| (entry.window.clone(), entry.complete))
    }

    /// Keeps what a fill read, unless the user's stripe changed since `generation`.
    fn put(&self, user: UserId, generation: u64, window: Arc<Window>, complete: bool) {
        let entry = Entry {
            window,
            complete,
            filled: Instant::now(),
        };
        let size = weight(&entry);
        if size > self.max_messages {
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
    feed: ChangeFeed,
}

impl CachedBackend {
    /// Wraps `inner` with a cache of at most `max_messages` messages, kept current by `feed`
    /// (the change feed of `inner`), which it starts. Until the feed is live (never, for a
    /// backend without one), every call passes through.
    pub fn new(
        inner: Arc<dyn MessageBackend>,
        feed: ChangeFeed,
        settings: &BackendSettings,
        max_messages: usize,
    ) -> CachedBackend {
        let cache = Arc::new(InboxCache::new(max_messages, settings.expiry));
        let weak = Arc::downgrade(&cache);
        feed.add_hook(Box::new(move |change| {
            if let Some(cache) = weak.upgrade() {
                cache.apply(change);
            }
        }));
        feed.start();
        CachedBackend { inner, cache, feed }
    }

    /// Whether reads may be served from the cache (the change feed is live).
    pub fn is_live(&self) -> bool {
        self.feed.is_live()
    }

    /// The change feed that keeps the cache current.
    pub fn feed(&self) -> &ChangeFeed {
        &self.feed
    }

    /// The backend behind the cache.
    pub fn inner(&self) -> &Arc<dyn MessageBackend> {
        &self.inner
    }

    fn cutoff(&self) -> DateTime<Utc> {
        self.cache.expiry.inbox_cutoff(Utc::now())
    }

    /// The user's first unread messages (at most the window) and whether that is all of
    /// them: from an entry once a sync vouches for it, or by a fill. `None` when the cache
    /// cannot vouch for anything (the feed is down): read the backend.
    async fn window(&self, user: UserId, since: Instant) -> Result<Option<(Arc<Window>, bool)>> {
        if !self.feed.is_live() {
            return Ok(None);
        }
        if self.cache.get(user).is_some() {
            // The entry may predate a write that returned before `since`, in another
            // process: once the sync returns, such a write has dropped it.
            if !self.feed.sync_since(since).await {
                return Ok(None);
            }
            if let Some(hit) = self.cache.get(user) {
                return Ok(Some(hit));
            }
        }
        let generation = self.cache.generation(user);
        let window = MAX_STREAM_STORED as usize;
        let mut messages = self
            .inner
            .inbox_list(user, ListQuery::first(MAX_STREAM_STORED + 1))
            .await?;
        let complete = messages.len() <= window;
        messages.truncate(window);
        let window = Arc::new(Window::new(messages));
        // Kept only while the feed watches: a change it did not see could spoil the entry.
        if self.feed.is_live() {
            self.cache.put(user, generation, window.clone(), complete);
        }
        Ok(Some((window, complete)))
    }

    /// [`MessageBackend::inbox_list`] for a read that must see every write that returned
    /// before `since` (and no more: a sync that began after `since` will do; see
    /// [`ChangeFeed::sync_since`]).
    ///
    /// # Errors
    ///
    /// As [`MessageBackend::inbox_list`].
    pub async fn inbox_list_since(
        &self,
        user: UserId,
        query: ListQuery,
        since: Instant,
    ) -> Result<Vec<Message>> {
        Ok(self
            .inbox_listed_since(user, query, since)
            .await?
            .into_vec())
    }

    /// [`CachedBackend::inbox_list_since`] without copying the messages out of the entry.
    pub(crate) async fn inbox_listed_since(
        &self,
        user: UserId,
        query: ListQuery,
        since: Instant,
    ) -> Result<Listed> {
        let limit = query.limit.map(|n| n as usize);
        let cacheable =
            query.after.is_none() && limit.is_some_and(|n| n <= MAX_STREAM_STORED as usize + 1);
        if !cacheable {
            return Ok(Listed::all(self.inner.inbox_list(user, query).await?));
        }
        let limit = limit.unwrap_or_default();
        let Some((window, complete)) = self.window(user, since).await? else {
            return Ok(Listed::all(self.inner.inbox_list(user, query).await?));
        };
        let cutoff = self.cutoff();
        let picked: Vec<usize> = window
            .messages
            .iter()
            .enumerate()
            .filter(|(_, m)| m.date >= cutoff)
            .map(|(i, _)| i)
            .take(limit)
            .collect();
        // A partial window can answer only what it holds.
        if picked.len() < limit && !complete {
            return Ok(Listed::all(self.inner.inbox_list(user, query).await?));
        }
        Ok(Listed::Shared(window, picked))
    }

    /// [`MessageBackend::inbox_count`] as fresh as [`CachedBackend::inbox_list_since`].
    ///
    /// # Errors
    ///
    /// As [`MessageBackend::inbox_count`].
    pub async fn inbox_count_since(&self, user: UserId, since: Instant) -> Result<u64> {
        if let Some((window, true)) = self.window(user, since).await? {
            let cutoff = self.cutoff();
            return Ok(window.messages.iter().filter(|m| m.date >= cutoff).count() as u64);
        }
        self.inner.inbox_count(user).await
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
        self.inbox_list_since(user, query, Instant::now()).await
    }

    async fn inbox_list_many(&self, users: &[UserId], limit: u32) -> Result<Vec<Vec<Message>>> {
        // Reads the store itself: always as fresh as the store.
        self.inner.inbox_list_many(users, limit).await
    }

    async fn inbox_count(&self, user: UserId) -> Result<u64> {
        self.inbox_count_since(user, Instant::now()).await
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

    async fn try_lease(&self, name: &str, ttl: std::time::Duration) -> Result<bool> {
        self.inner.try_lease(name, ttl).await
    }

    fn flash_spill(&self) -> Option<&dyn FlashSpill> {
        self.inner.flash_spill()
    }

    fn change_feed(&self) -> Option<&dyn WatchChanges> {
        self.inner.change_feed()
    }

    /// The inner backend's, with the cache dropped after a deletion.
    fn admin(&self) -> Option<&dyn MessageAdmin> {
        self.inner.admin().map(|_| self as &dyn MessageAdmin)
    }
}

#[rocket::async_trait]
impl MessageAdmin for CachedBackend {
    async fn message_stats(
        &self,
        limit: u32,
        before: Option<MessageId>,
    ) -> Result<Vec<MessageStats>> {
        match self.inner.admin() {
            Some(admin) => admin.message_stats(limit, before).await,
            None => Err(crate::Error::Unsupported("listing messages")),
        }
    }

    async fn message_delete(&self, id: MessageId) -> Result<u64> {
        let result = match self.inner.admin() {
            Some(admin) => admin.message_delete(id).await,
            None => Err(crate::Error::Unsupported("deleting messages")),
        };
        self.cache.clear();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(max_messages: usize) -> InboxCache {
        InboxCache::new(max_messages, BackendSettings::default().expiry)
    }

    fn empty() -> Arc<Window> {
        Arc::new(Window::new(Vec::new()))
    }

    #[test]
    fn entries_stay_within_the_bound_even_when_empty() {
        let cache = cache(10);
        for user in 0..100 {
            let generation = cache.generation(UserId(user));
            cache.put(UserId(user), generation, empty(), true);
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
        cache.put(UserId(1), generation, empty(), true);
        assert!(cache.get(UserId(1)).is_none());
        // another stripe is not spoiled
        let generation = cache.generation(UserId(2));
        cache.invalidate_users(&[UserId(3)]);
        cache.put(UserId(2), generation, empty(), true);
        assert!(cache.get(UserId(2)).is_some());
        // a change for everyone spoils every fill
        let generation = cache.generation(UserId(4));
        cache.apply(&Change::All);
        cache.put(UserId(4), generation, empty(), true);
        assert!(cache.get(UserId(2)).is_none() && cache.get(UserId(4)).is_none());
    }
}
