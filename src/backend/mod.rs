//! Storage of stored messages: the [`MessageBackend`] trait and its implementations.
//!
//! The trait keeps the operation names of django-stored-messages (`inbox_store`,
//! `archive_list`, …) so the port stays traceable, and adds bulk forms (`deliver`,
//! `inbox_delete_many`) where they make things fast. Each method's doc comment is its
//! contract; the conformance suite in `app/tests/it/backend.rs` checks exactly those sentences
//! against every implementation.
//!
//! Backends do not emit events and do not know users by name: [`crate::Store`] wraps a
//! backend, resolves audiences through the host and emits [`crate::Event`]s after each
//! successful write, so a custom backend gets both for free.

use chrono::{DateTime, Utc};

use crate::error::Result;
use crate::level::Level;
use crate::message::{Message, MessageId, NewMessage, UserId};

pub mod cache;
pub(crate) mod error;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub mod sql;

pub use self::cache::CachedBackend;
pub use self::error::BackendError;
#[cfg(feature = "redis")]
pub use self::redis::RedisBackend;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use self::sql::{SqlBackend, SqlPool, SqlReads};
pub use crate::changes::{Change, FeedSink, Wanted};

/// Microseconds since the Unix epoch: how the SQL tables store dates (a host that joins
/// them, or keeps tables of its own beside them, can use the same form).
pub fn micros(date: DateTime<Utc>) -> i64 {
    date.timestamp_micros()
}

/// The date of a stored microsecond count (see [`micros`]); out-of-range values give the
/// earliest representable date rather than a panic.
pub fn from_micros(us: i64) -> DateTime<Utc> {
    use chrono::TimeZone as _;
    Utc.timestamp_micros(us)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// The name the backends use internally.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
pub(crate) use self::unique_ids as unique_users;

/// Where a page of a listing starts: just after this message, in the listing's own order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Date of the last message already seen.
    pub date: DateTime<Utc>,
    /// Id of the last message already seen (ties on `date` are ordered by id).
    pub id: MessageId,
}

impl Cursor {
    /// The cursor that continues after `message`.
    pub fn after(message: &Message) -> Cursor {
        Cursor {
            date: message.date,
            id: message.id,
        }
    }
}

/// Which part of a listing to return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ListQuery {
    /// At most this many messages; `None` for all.
    pub limit: Option<u32>,
    /// Start after this message (exclusive); `None` for the start of the listing.
    pub after: Option<Cursor>,
}

impl ListQuery {
    /// Everything, from the start.
    pub const ALL: ListQuery = ListQuery {
        limit: None,
        after: None,
    };

    /// The first `limit` messages.
    pub fn first(limit: u32) -> ListQuery {
        ListQuery {
            limit: Some(limit),
            after: None,
        }
    }
}

/// What [`MessageBackend::expired_messages_cleanup`] removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Cleanup {
    /// Inbox entries removed because they were older than `inbox_expire_days` (the messages
    /// stay in the archive).
    pub inbox_entries: u64,
    /// Messages removed everywhere because they were older than `message_expire_days`.
    pub messages: u64,
}

/// Expiry settings a backend applies when reading and cleaning up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    /// Inbox entries of messages older than this many days are never returned.
    pub inbox_days: u32,
    /// Messages older than this many days are removed by cleanup.
    pub message_days: u32,
}

impl Expiry {
    /// Messages dated before this instant are out of the inbox.
    pub fn inbox_cutoff(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        now - chrono::Duration::days(i64::from(self.inbox_days))
    }

    /// Messages dated before this instant are removed by cleanup.
    pub fn message_cutoff(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        now - chrono::Duration::days(i64::from(self.message_days))
    }
}

/// How many `inbox_list` calls the default `inbox_list_many` has in flight at once.
pub const MANY_AT_ONCE: usize = 16;

/// Persistent storage of stored messages, per user: an **inbox** of unread messages and an
/// **archive** of every message the user received.
///
/// Contracts shared by every method:
/// - listings are in date order (ties broken by id): the inbox oldest first, the archive
///   newest first;
/// - inbox entries of messages older than `inbox_expire_days` are never returned or counted;
/// - an id that is unknown, or that belongs to another user, behaves exactly like an id that
///   is not in this user's inbox: [`crate::Error::MessageDoesNotExist`] where the method says
///   so, never someone else's message;
/// - every method is atomic: it changes everything it describes or nothing.
///
/// The trait holds django-stored-messages' operations and their bulk forms. What only some
/// backends can do is an optional capability, a trait of its own that a backend hands out
/// from a method returning `None` by default: [`FlashSpill`] (server-side storage for flash
/// messages), [`WatchChanges`] (a change feed across processes, which the inbox cache and
/// live updates need) and [`MessageAdmin`] (listing and deleting any message). A custom
/// backend implements the operations and opts into what it can do.
///
/// Implementations: `SqlBackend` (SQLite, PostgreSQL) and `RedisBackend`, each with its
/// Cargo feature (`sqlite`, `postgres`, `redis`), both with every capability. A host can
/// plug in its own; the crate docs show a complete one.
#[rocket::async_trait]
pub trait MessageBackend: Send + Sync + 'static {
    /// A short name for logs: `"sqlite"`, `"postgres"`, `"redis"`, ….
    fn name(&self) -> &'static str;

    /// Whether this backend stores messages of `level` (it is one of the store levels).
    fn can_handle(&self, level: Level) -> bool;

    /// Persists a message with no recipients yet and returns it with its new, unique id.
    ///
    /// # Errors
    ///
    /// [`crate::Error::MessageTypeNotSupported`] when `can_handle` refuses its level.
    async fn create_message(&self, message: &NewMessage) -> Result<Message>;

    /// Adds `message` (created by `create_message`) to the archive of each user. A user who
    /// already has it is skipped. Returns how many archives gained it.
    async fn archive_store(&self, users: &[UserId], message: &Message) -> Result<u64>;

    /// Adds `message` to the inbox of each user, archiving it too where it was not yet: a
    /// message in an inbox is always in the archive. A user who already has it unread is
    /// skipped, and only that user; a user who already read it gets it back unread.
    /// Returns how many inboxes gained it.
    async fn inbox_store(&self, users: &[UserId], message: &Message) -> Result<u64>;

    /// The bulk form of `create_message` + `archive_store` + `inbox_store`: creates the
    /// message and puts it in the archive and inbox of every user, all in one atomic step
    /// that costs no round trip per user. Duplicate user ids count once.
    ///
    /// # Errors
    ///
    /// [`crate::Error::MessageTypeNotSupported`] when `can_handle` refuses its level; nothing
    /// is written then.
    async fn deliver(&self, users: &[UserId], message: &NewMessage) -> Result<Message>;

    /// The user's unread messages, oldest first, from `query.after`, at most `query.limit`.
    /// Costs in proportion to the unread messages returned, not to the archive.
    async fn inbox_list(&self, user: UserId, query: ListQuery) -> Result<Vec<Message>>;

    /// The unread messages of each of `users` (in that order), oldest first, at most `limit`
    /// each: what `inbox_list` answers for each user. Live streams read this way when many
    /// of them must read at once (a broadcast wakes every stream).
    ///
    /// The default asks `inbox_list` for each user, [`MANY_AT_ONCE`] at a time; a backend
    /// that can answer many users in one query should.
    async fn inbox_list_many(&self, users: &[UserId], limit: u32) -> Result<Vec<Vec<Message>>> {
        use rocket::futures::{StreamExt, TryStreamExt};
        let users: Vec<UserId> = users.to_vec();
        rocket::futures::stream::iter(users)
            .map(|user| self.inbox_list(user, ListQuery::first(limit)))
            .buffered(MANY_AT_ONCE)
            .try_collect()
            .await
    }

    /// How many unread messages the user has.
    async fn inbox_count(&self, user: UserId) -> Result<u64>;

    /// One message of the user's inbox.
    ///
    /// # Errors
    ///
    /// [`crate::Error::MessageDoesNotExist`] when it is not in this user's inbox (read,
    /// expired, unknown or someone else's).
    async fn inbox_get(&self, user: UserId, id: MessageId) -> Result<Message>;

    /// Removes one message from the user's inbox (it stays in the archive): marks it read.
    ///
    /// # Errors
    ///
    /// [`crate::Error::MessageDoesNotExist`] when it is not in this user's inbox.
    ///
    /// The default is `inbox_delete_many` with one id.
    async fn inbox_delete(&self, user: UserId, id: MessageId) -> Result<()> {
        if self.inbox_delete_many(user, &[id]).await?.is_empty() {
            Err(crate::Error::MessageDoesNotExist(id))
        } else {
            Ok(())
        }
    }

    /// Removes these messages from the user's inbox in one step and returns the ids that were
    /// there (ids not in the inbox are ignored).
    async fn inbox_delete_many(&self, user: UserId, ids: &[MessageId]) -> Result<Vec<MessageId>>;

    /// Empties the user's inbox (the archive keeps everything) and returns how many entries
    /// it removed. A message stored while this runs is either counted and removed, or left
    /// in the inbox: never lost without being counted.
    async fn inbox_purge(&self, user: UserId) -> Result<u64>;

    /// The user's archive, newest first, from `query.after`, at most `query.limit`.
    async fn archive_list(&self, user: UserId, query: ListQuery) -> Result<Vec<Message>>;

    /// Removes inbox entries of messages older than `inbox_expire_days` (they stay archived)
    /// and every message older than `message_expire_days` from every inbox and archive.
    async fn expired_messages_cleanup(&self, now: DateTime<Utc>) -> Result<Cleanup>;

    /// Removes every message of every user. For tests and resets.
    async fn flush(&self) -> Result<()>;

    /// Adds an existing `message` to the inbox and archive of each user who does not have it
    /// at all yet; users who have it, read or unread, are skipped. Returns how many gained
    /// it. Repeating it is harmless, which is what makes an interrupted broadcast resumable
    /// without delivering twice.
    async fn deliver_once(&self, users: &[UserId], message: &Message) -> Result<u64>;

    /// Takes the store-wide lease `name` for `ttl` when nobody holds it (or its holder's time
    /// ran out): `true` when this call took it. Of several processes sharing the store, the
    /// one that gets `true` does a periodic task this time (the fairing's cleanup). The
    /// default, for a backend with no place shared between processes, always answers `true`.
    async fn try_lease(&self, name: &str, ttl: std::time::Duration) -> Result<bool> {
        let _ = (name, ttl);
        Ok(true)
    }

    /// Flash messages that did not fit their cookie, kept by this backend (see
    /// [`FlashSpill`]). `None`, the default, keeps them in the app's process memory (lost on
    /// restart, and not shared between app instances).
    fn flash_spill(&self) -> Option<&dyn FlashSpill> {
        None
    }

    /// The backend's change feed (see [`WatchChanges`]). `None`, the default, means no
    /// feed: then nothing of this backend is cached, and live subscribers hear only the
    /// writes of their own process.
    fn change_feed(&self) -> Option<&dyn WatchChanges> {
        None
    }

    /// Listing and deleting any message, for administration (see [`MessageAdmin`]).
    /// `None`, the default: the admin's message browser says it is not supported.
    fn admin(&self) -> Option<&dyn MessageAdmin> {
        None
    }
}

/// Optional capability of a [`MessageBackend`]: storage for flash messages that did not fit
/// their cookie ([`MessageBackend::flash_spill`]). Keys are [`is_spill_key`] strings.
#[rocket::async_trait]
pub trait FlashSpill: Send + Sync {
    /// Keeps `payload` under `key` until `expires`, replacing what was there.
    async fn spill_put(&self, key: &str, payload: &str, expires: DateTime<Utc>) -> Result<()>;

    /// The payload stored under `key`, unless it expired or was deleted.
    async fn spill_get(&self, key: &str) -> Result<Option<String>>;

    /// Forgets `key`; unknown keys are not an error.
    async fn spill_delete(&self, key: &str) -> Result<()>;
}

/// Whether `key` has the form of a spill key: 24 URL-safe base64 characters (144 random
/// bits). Anything else is refused before it reaches storage, so a forged cookie cannot
/// name other keys.
pub fn is_spill_key(key: &str) -> bool {
    key.len() == 24
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Optional capability of a [`MessageBackend`]: a change feed ([`MessageBackend::change_feed`]),
/// which tells every process which inboxes changed. See [`crate::changes`].
#[rocket::async_trait]
pub trait WatchChanges: Send + Sync {
    /// Runs the change feed until [`FeedSink::closed`] resolves: calls [`FeedSink::live`]
    /// once it listens, [`FeedSink::changed`] for each change to inboxes committed by any
    /// process (this one included), and [`FeedSink::lost`] whenever it may have missed some
    /// (then it connects again, and calls `live` again). Meanwhile it answers
    /// [`FeedSink::wanted`]: for [`Wanted::Sync`] it calls [`FeedSink::synced`] once every
    /// change committed before the sync began has been reported (for example by sending a
    /// marker down the same ordered channel as the changes and waiting for it), or
    /// [`FeedSink::sync_failed`]; for [`Wanted::Reconnect`] it drops its connection and
    /// starts over.
    ///
    /// A backend whose every write that changes inboxes (and every [`WatchChanges::announce`])
    /// waits [`crate::changes::COMMIT_WAIT`] once the store acknowledged it, in every
    /// process, may call [`FeedSink::writers_wait`]: reads then trust a recent sync instead of
    /// waiting for one. A backend that does not wait must not call it.
    ///
    /// # Errors
    ///
    /// When the feed cannot start at all; it then stays down.
    async fn watch_changes(&self, sink: FeedSink) -> Result<()>;

    /// Reports `change` on every process's feed, as if a write of the backend had made it:
    /// for state a host keeps beside the store (its sessions, say) that caches built on the
    /// feed must drop. The change is out once this returns: a [`crate::ChangeFeed::sync`]
    /// that begins afterwards, in any process, returns only after its hooks saw it. A
    /// backend that declared [`FeedSink::writers_wait`] waits here as its writes do.
    ///
    /// # Errors
    ///
    /// When the store cannot be reached (other processes were then not told), or
    /// [`crate::Error::Unsupported`] for a feed that cannot carry a host's changes (the
    /// default).
    async fn announce(&self, change: &Change) -> Result<()> {
        let _ = change;
        Err(crate::Error::Unsupported("announcing changes"))
    }
}

/// Optional capability of a [`MessageBackend`]: administration of every message
/// ([`MessageBackend::admin`]).
#[rocket::async_trait]
pub trait MessageAdmin: Send + Sync {
    /// The newest messages (by id, newest first, ids below `before` when given) with how
    /// many users received each and how many still have it unread.
    async fn message_stats(
        &self,
        limit: u32,
        before: Option<MessageId>,
    ) -> Result<Vec<MessageStats>>;

    /// Removes a message from every inbox and archive; returns how many deliveries it had.
    ///
    /// # Errors
    ///
    /// [`crate::Error::MessageDoesNotExist`] for an unknown id.
    async fn message_delete(&self, id: MessageId) -> Result<u64>;
}

/// A message with its audience, for administration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MessageStats {
    /// The message.
    pub message: Message,
    /// How many users received it (its archive entries).
    pub recipients: u64,
    /// How many of them have it unread.
    pub unread: u64,
}

/// What every backend needs to know from the configuration (built by
/// [`Settings::from_config`], in [`crate::config`], so backends never read the
/// configuration themselves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The levels it stores (`can_handle`).
    pub store_levels: Vec<Level>,
    /// Expiry of inbox entries and messages.
    pub expiry: Expiry,
    /// How often a backend that must poll for other processes' writes (SQLite) does so.
    pub change_poll: std::time::Duration,
    /// The SQL backend stores a delivery to at least this many consecutive user ids once,
    /// as a run.
    pub audience_min_run: usize,
    /// How long one command of the Redis backend may wait for its answer before it fails
    /// as unavailable and its connection is replaced (long scripts get at least 30 s).
    pub command_timeout: std::time::Duration,
}

/// Sorts and deduplicates user ids: each recipient counts once, and sorted ids make bulk
/// inserts walk the user indexes in order.
pub fn unique_ids(users: &[UserId]) -> Vec<i64> {
    let mut ids: Vec<i64> = users.iter().map(|u| u.0).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}
