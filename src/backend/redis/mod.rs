//! The Redis backend: stored messages in one Redis server (6.0 or newer), laid out like
//! django-stored-messages' Redis backend, with the indexes that make every read cheap.
//!
//! This module owns the key layout and the scripts. It does not manage Redis itself:
//! persistence, memory limits and eviction are the server's configuration (see the
//! trade-offs below); an eviction policy other than `noeviction` would silently drop
//! messages.
//!
//! # Key layout
//!
//! Every key starts with `redis_key_prefix` (written `P` here; empty by default):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P messages:last_id` | string | the last message id given out (`INCR`) |
//! | `P message:<id>` | hash | `level`, `message`, `extra_tags`, `url` (absent when none), `date_us`, `member`, and the counters `recipients` and `unread` (for administration) |
//! | `P messages:by_date` | sorted set | one member per message, for cleanup |
//! | `P user:<id>:notifications` | sorted set | the user's inbox (unread messages) |
//! | `P user:<id>:archive` | sorted set | every message the user received |
//! | `P flash:<key>` | string | flash messages that did not fit their cookie (expires by itself) |
//!
//! Every script that changes inboxes also publishes, on the channel `P changes`, the ids of
//! the users whose inbox changed (comma separated, or `*` for many or unknown); the inbox
//! caches of every process subscribe to it (see [`super::cache`]). Once Redis has answered
//! such a write, the backend waits [`crate::changes::COMMIT_WAIT`] before it returns, so
//! that reads may trust a recent sync (see [`crate::changes`]).
//!
//! A message is stored **once**, in its hash, however many users receive it; the sorted sets
//! hold only its *member*. Every member has score 0, so Redis orders a set by the member's
//! bytes, and a member is written so that byte order is (date, id) order:
//! `<date>:<id>`, both zero-padded to 19 digits, for example
//! `0001700000000000000:0000000000000000042` for message 42 sent at 1 700 000 000 s after
//! the epoch. Dates are microseconds since 1970 (`date_us`); dates before 1970 are written
//! as `-` followed by `date_us + 2^63` zero-padded, which sorts before every later date and
//! in order among themselves, so no date is out of range (such members are just not
//! human-readable; the hash's `date_us` always is).
//!
//! Because order is in the member, every listing is a `ZRANGEBYLEX` over an exact range:
//! a page cursor `(date, id)` is the exclusive bound `(<member>`, and the inbox expiry is
//! the inclusive bound `[<cutoff date>:0000000000000000000`. Reads cost `O(log n + page)`,
//! never a scan of a user's list. The hash keeps the message's `member`, so
//! `inbox_get` and `inbox_delete` go from an id to its entry in `O(log n)`.
//! Ids come from `INCR`, so two messages with the same text at the same instant are still
//! two messages.
//!
//! # Atomicity
//!
//! Every change that touches more than one key is a Lua script (`deliver`, `archive_store`,
//! `inbox_store`, `deliver_once`, `inbox_delete_many`, `inbox_purge`) or a `MULTI`/`EXEC`
//! pipeline (`create_message`, each step of cleanup). `inbox_purge` reads and removes the
//! inbox range in one script, so a message stored meanwhile is either removed and counted or
//! not touched; the scripts also keep each message's `recipients` and `unread` counters
//! (the admin message browser reads them). `message_delete` is the exception: it walks the
//! user keys with `SCAN`, like cleanup, and can be repeated. `WATCH` is never used: the backend talks through one multiplexed connection
//! ([`ConnectionManager`], which reconnects by itself after Redis restarts), and a `WATCH`
//! would be shared by every concurrent caller on it. Reads that need a set and the hashes
//! (`inbox_list`, `archive_list`, `inbox_get`) are scripts too, so a page and its messages
//! come from one moment, in one round trip. Scripts are sent with `EVALSHA`; they are
//! loaded again after a restart empties Redis' script cache.
//!
//! The scripts never compare strings in Lua (Redis' Lua compares with the server's locale);
//! range checks are left to `ZLEXCOUNT`, which compares bytes.
//!
//! # Cleanup and flush
//!
//! `expired_messages_cleanup` walks the user keys with `SCAN … MATCH P user:* TYPE zset`, a
//! thousand keys at a time, and in one transaction per batch removes inbox entries older than
//! `inbox_expire_days` (counting those not older than `message_expire_days`, as the SQL
//! backend does) and archive entries older than `message_expire_days`. It then takes the
//! expired messages from `messages:by_date` and deletes their hashes. Each batch is atomic,
//! the whole sweep is not: it never blocks Redis for long, and a sweep cut short is finished
//! by the next one, since every step is idempotent. `flush` walks `P*` with `SCAN` and
//! unlinks only the keys of the layout above, so an empty prefix never deletes another
//! application's keys; it keeps `messages:last_id`, so ids are never given out twice.
//! `KEYS` is never used.
//!
//! # Trade-offs
//!
//! - A broadcast writes two set entries per recipient: measured on Redis 7, about 64 bytes
//!   per recipient while a user's sets are small, and about 350 bytes for a user's first
//!   message, which creates both keys. It is one script, and Redis serves nothing else
//!   while it runs: about half a second per 100,000 recipients (measured with a release
//!   build, on a busy 2-core machine).
//! - Scripts build user and message keys from the prefix, so this backend needs a single
//!   Redis server (or a primary with replicas), not Redis Cluster.
//! - Durability is Redis' own: use AOF persistence (`appendonly yes`) if losing the last
//!   second of messages on a crash matters.

mod feed;
mod scripts;

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, Value};
use chrono::{DateTime, Utc};

use self::feed::watch;
use self::scripts::scripts;
use super::{from_micros, micros};
use super::{
    unique_users, BackendError, Cleanup, FeedSink, FlashSpill, ListQuery, MessageAdmin,
    MessageBackend, MessageStats, Settings, WatchChanges,
};
use crate::changes::commit_wait;
use crate::error::{Error, Result};
use crate::level::Level;
use crate::message::{Message, MessageId, NewMessage, UserId};
use crate::secret_url::SecretUrl;

/// The counter `INCR`ed for each new message id (after the prefix).
pub const LAST_ID_KEY: &str = "messages:last_id";
/// The sorted set of every message by date (after the prefix).
pub const BY_DATE_KEY: &str = "messages:by_date";
/// Start of a message hash key, followed by the id (after the prefix).
pub const MESSAGE_KEY: &str = "message:";
/// Start of a user's keys, followed by the user id and a suffix (after the prefix).
pub const USER_KEY: &str = "user:";
/// End of a user's inbox key, as in django-stored-messages.
pub const INBOX_SUFFIX: &str = ":notifications";
/// End of a user's archive key, as in django-stored-messages.
pub const ARCHIVE_SUFFIX: &str = ":archive";
/// Start of a flash spill key, followed by the random spill key (after the prefix); the
/// value expires by itself (`SET … PX`).
pub const SPILL_KEY: &str = "flash:";

/// How long connecting may take at startup, retries included, before it fails.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a long command (a broadcast's script, a batch of cleanup or of an admin's
/// deletion) may wait for its answer, at least: a broadcast to a million users is one script
/// that runs for seconds. The other commands wait [`Settings::command_timeout`].
const LONG_TIMEOUT: Duration = Duration::from_secs(30);
/// Deliveries to more users than this get [`LONG_TIMEOUT`]: the script for 10,000
/// recipients runs for about 50 ms, for a million about 7 s (`bench/run.sh`, W3).
const LONG_AUDIENCE: usize = 10_000;
/// Extra connection attempts after a failure, waiting up to 0.2 s, then 0.4 s, 0.8 s.
/// Each later command that finds the connection broken starts a new round.
const CONNECT_RETRIES: usize = 3;
/// Keys asked for per `SCAN` call, and messages removed per cleanup transaction.
const BATCH: usize = 1000;
/// Width of the zero-padded numbers in a member: `i64::MAX` has 19 digits.
const DIGITS: usize = 19;
/// The oldest server this backend works with: cleanup needs `SCAN … TYPE`.
const MIN_VERSION: (u32, u32) = (6, 0);

/// Stored messages in Redis.
///
/// Cheap to clone: clones share one multiplexed connection.
#[derive(Clone)]
pub struct RedisBackend {
    link: Arc<Link>,
    /// For the change feed's own connection; `None` when built from a bare connection.
    client: Option<Client>,
    keys: Keys,
    settings: Settings,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("key_prefix", &self.keys.prefix)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// A backend over an existing connection, with every key under `key_prefix`.
    pub fn new(
        connection: ConnectionManager,
        key_prefix: &str,
        settings: Settings,
    ) -> RedisBackend {
        RedisBackend {
            link: Link::new(connection, None),
            client: None,
            keys: Keys::new(key_prefix),
            settings,
        }
    }

    /// Connects to `url` (`redis://`, `rediss://` or `redis+unix://`) and checks the server
    /// answers and is recent enough. Gives up after a few seconds, so a missing server stops
    /// startup quickly; once connected, the connection is re-established by itself whenever
    /// it breaks.
    ///
    /// # Errors
    ///
    /// [`BackendError::RedisConnect`], naming the url without its password, when the url is
    /// invalid or the server cannot be reached, refuses the credentials, does not answer, or
    /// is older than Redis 6.0.
    pub async fn connect(
        url: &SecretUrl,
        key_prefix: &str,
        settings: Settings,
    ) -> Result<RedisBackend, BackendError> {
        let failed = |source| BackendError::RedisConnect {
            url: url.redacted(),
            source,
        };
        let client = Client::open(url.expose()).map_err(failed)?;
        let connecting = async {
            let config = ConnectionManagerConfig::new()
                .set_exponent_base(2.0)
                .set_min_delay(Duration::from_millis(100))
                .set_number_of_retries(CONNECT_RETRIES)
                // A backstop for the host's own commands (`connection()`); the backend's
                // commands have limits of their own (see `Link`).
                .set_response_timeout(Some(LONG_TIMEOUT))
                .set_connection_timeout(Some(CONNECT_TIMEOUT));
            let mut connection =
                ConnectionManager::new_with_config(client.clone(), config.clone()).await?;
            let info: String = ::redis::cmd("INFO")
                .arg("server")
                .query_async(&mut connection)
                .await?;
            match server_version(&info) {
                Some(version) if version < MIN_VERSION => Err(RedisError::from((
                    ErrorKind::Client,
                    "redis 6.0 or newer is needed",
                    format!("the server runs {}.{}", version.0, version.1),
                ))),
                _ => Ok((connection, config)),
            }
        };
        let (connection, config) = rocket::tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .unwrap_or_else(|_| {
                Err(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
                )))
            })
            .map_err(failed)?;
        let mut backend = RedisBackend::new(connection, key_prefix, settings);
        backend.link = Link::new(backend.connection(), Some((client.clone(), config)));
        backend.client = Some(client);
        Ok(backend)
    }

    /// Tells every process's change feed that anything may have changed. A failure is an
    /// error of the write that called it: other processes could not be told, so the write
    /// does not count as done (it can be repeated).
    async fn announce_all(&self) -> Result<()> {
        let mut connection = self.command();
        ::redis::cmd("PUBLISH")
            .arg(self.keys.changes())
            .arg("*")
            .query_async::<()>(&mut connection)
            .await
            .map_err(redis_error)?;
        commit_wait().await;
        Ok(())
    }

    /// The connection, for commands of the host's own.
    pub fn connection(&self) -> ConnectionManager {
        self.link.get().1
    }

    /// The way to Redis for one of the backend's commands, waiting at most the configured
    /// [`Settings::command_timeout`] for each answer.
    fn command(&self) -> Command<'_> {
        self.link.command(self.settings.command_timeout, false)
    }

    /// As [`RedisBackend::command`], for a command that only reads: it is sent once more when
    /// its connection turns out to have been dropped (a restarted server, a proxy that closed
    /// it), so a request does not fail for a connection that broke while nobody used it.
    /// Writes are not: one may have been applied before its connection broke.
    fn read_command(&self) -> Command<'_> {
        self.link.command(self.settings.command_timeout, true)
    }

    /// As [`RedisBackend::command`], for a command that can run for seconds (see
    /// [`LONG_TIMEOUT`]).
    fn long_command(&self) -> Command<'_> {
        self.link
            .command(self.settings.command_timeout.max(LONG_TIMEOUT), false)
    }

    /// The command of a delivery to `recipients` users: a long one for a broadcast, an
    /// ordinary one for a message to a few (the script then takes well under a second).
    fn delivery_command(&self, recipients: usize) -> Command<'_> {
        if recipients > LONG_AUDIENCE {
            self.long_command()
        } else {
            self.command()
        }
    }

    /// The prefix of every key.
    pub fn key_prefix(&self) -> &str {
        &self.keys.prefix
    }

    fn check_level(&self, level: Level) -> Result<()> {
        if self.can_handle(level) {
            Ok(())
        } else {
            Err(Error::MessageTypeNotSupported(level))
        }
    }

    /// The smallest member an unread entry may have: older ones have expired.
    fn inbox_floor(&self) -> String {
        let cutoff = self.settings.expiry.inbox_cutoff(Utc::now());
        member(micros(cutoff), 0)
    }

    /// A new message id, never given out before (even after `flush`).
    async fn next_id(&self) -> Result<i64> {
        let mut connection = self.command();
        ::redis::cmd("INCR")
            .arg(self.keys.last_id())
            .query_async(&mut connection)
            .await
            .map_err(redis_error)
    }

    /// Runs the store script for `archive_store` (`mode` "archive"), `inbox_store`
    /// ("inbox") or `deliver_once` ("once"). A message that is not stored (never created, or removed by cleanup) gives
    /// [`Error::MessageDoesNotExist`] rather than set entries pointing nowhere.
    async fn store(&self, mode: &str, users: &[UserId], message: &Message) -> Result<u64> {
        let users = unique_users(users);
        if users.is_empty() {
            return Ok(0);
        }
        let mut invocation = scripts().store.key(self.keys.message(message.id));
        invocation.arg(&self.keys.prefix).arg(mode).arg(&users);
        let mut connection = self.delivery_command(users.len());
        let gained: i64 = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(redis_error)?;
        if mode != "archive" {
            commit_wait().await;
        }
        u64::try_from(gained).map_err(|_| Error::MessageDoesNotExist(message.id))
    }

    /// Runs the list script over one sorted set and decodes the messages.
    async fn list(
        &self,
        key: String,
        command: &str,
        from: &str,
        to: &str,
        query: ListQuery,
    ) -> Result<Vec<Message>> {
        let limit = query.limit.map_or(-1, i64::from);
        let mut connection = self.read_command();
        let flat: Vec<Option<String>> = scripts()
            .list
            .key(key)
            .arg(&self.keys.prefix)
            .arg(command)
            .arg(from)
            .arg(to)
            .arg(limit)
            .invoke_async(&mut connection)
            .await
            .map_err(redis_error)?;
        flat.chunks(6)
            .map(|row| {
                let id = parse_field::<i64>(row[0].as_deref(), "id")?;
                decode(MessageId(id), &row[1..])
            })
            .collect()
    }

    /// Walks the keys matching `pattern` (and of Redis type `kind`, if given) with `SCAN`.
    /// For each batch, `each` may build a pipeline, which runs before the next `SCAN`; the
    /// sum of the pipelines' (unignored) answers is returned.
    async fn scan<F>(&self, pattern: &str, kind: Option<&str>, mut each: F) -> Result<u64>
    where
        F: FnMut(&[Vec<u8>]) -> Option<::redis::Pipeline>,
    {
        let mut total = 0;
        let mut connection = self.long_command();
        let mut cursor: u64 = 0;
        loop {
            let mut scan = ::redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(BATCH);
            if let Some(kind) = kind {
                scan.arg("TYPE").arg(kind);
            }
            let (next, keys): (u64, Vec<Vec<u8>>) = scan
                .query_async(&mut connection)
                .await
                .map_err(redis_error)?;
            if !keys.is_empty() {
                if let Some(pipe) = each(&keys) {
                    let answers: Vec<u64> = pipe
                        .query_async(&mut connection)
                        .await
                        .map_err(redis_error)?;
                    total += answers.iter().sum::<u64>();
                }
            }
            if next == 0 {
                return Ok(total);
            }
            cursor = next;
        }
    }
}

#[rocket::async_trait]
impl MessageBackend for RedisBackend {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn can_handle(&self, level: Level) -> bool {
        self.settings.store_levels.contains(&level)
    }

    async fn create_message(&self, message: &NewMessage) -> Result<Message> {
        self.check_level(message.level())?;
        let id = self.next_id().await?;
        let member = member(micros(message.date()), id);
        let mut pipe = ::redis::pipe();
        pipe.atomic()
            .cmd("HSET")
            .arg(self.keys.message(MessageId(id)))
            .arg(hash_fields(message, &member))
            .ignore()
            .cmd("ZADD")
            .arg(self.keys.by_date())
            .arg(0)
            .arg(&member)
            .ignore();
        let mut connection = self.command();
        pipe.query_async::<()>(&mut connection)
            .await
            .map_err(redis_error)?;
        Ok(message.clone().into_message(MessageId(id)))
    }

    async fn archive_store(&self, users: &[UserId], message: &Message) -> Result<u64> {
        self.store("archive", users, message).await
    }

    async fn inbox_store(&self, users: &[UserId], message: &Message) -> Result<u64> {
        self.store("inbox", users, message).await
    }

    async fn deliver_once(&self, users: &[UserId], message: &Message) -> Result<u64> {
        self.store("once", users, message).await
    }

    async fn deliver(&self, users: &[UserId], message: &NewMessage) -> Result<Message> {
        self.check_level(message.level())?;
        let users = unique_users(users);
        // The id is taken first: if the script then fails, an id is skipped and nothing else
        // is written.
        let id = MessageId(self.next_id().await?);
        let member = member(micros(message.date()), id.0);
        let fields = hash_fields(message, &member);
        let mut invocation = scripts().deliver.key(self.keys.message(id));
        invocation
            .key(self.keys.by_date())
            .arg(&self.keys.prefix)
            .arg(&member)
            .arg(fields.len())
            .arg(&fields)
            .arg(&users);
        let mut connection = self.delivery_command(users.len());
        invocation
            .invoke_async::<()>(&mut connection)
            .await
            .map_err(redis_error)?;
        commit_wait().await;
        Ok(message.clone().into_message(id))
    }

    async fn inbox_list(&self, user: UserId, query: ListQuery) -> Result<Vec<Message>> {
        // The later of two lower bounds: the expiry cutoff (inclusive) and the cursor
        // (exclusive). Members compare as bytes, exactly as Redis orders them.
        let floor = self.inbox_floor();
        let from = match query.after.map(|c| member(micros(c.date), c.id.0)) {
            Some(after) if after >= floor => format!("({after}"),
            _ => format!("[{floor}"),
        };
        self.list(self.keys.inbox(user), "ZRANGEBYLEX", &from, "+", query)
            .await
    }

    async fn inbox_count(&self, user: UserId) -> Result<u64> {
        let mut connection = self.read_command();
        ::redis::cmd("ZLEXCOUNT")
            .arg(self.keys.inbox(user))
            .arg(format!("[{}", self.inbox_floor()))
            .arg("+")
            .query_async(&mut connection)
            .await
            .map_err(redis_error)
    }

    async fn inbox_get(&self, user: UserId, id: MessageId) -> Result<Message> {
        let mut connection = self.read_command();
        let fields: Option<Vec<Option<String>>> = scripts()
            .get
            .key(self.keys.message(id))
            .key(self.keys.inbox(user))
            .arg(format!("[{}", self.inbox_floor()))
            .invoke_async(&mut connection)
            .await
            .map_err(redis_error)?;
        match fields {
            Some(fields) => decode(id, &fields),
            None => Err(Error::MessageDoesNotExist(id)),
        }
    }

    async fn inbox_delete_many(&self, user: UserId, ids: &[MessageId]) -> Result<Vec<MessageId>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let raw: Vec<i64> = ids.iter().map(|id| id.0).collect();
        let mut connection = self.command();
        let removed: Vec<i64> = scripts()
            .delete
            .key(self.keys.inbox(user))
            .arg(&self.keys.prefix)
            .arg(format!("[{}", self.inbox_floor()))
            .arg(&raw)
            .invoke_async(&mut connection)
            .await
            .map_err(redis_error)?;
        if !removed.is_empty() {
            commit_wait().await;
        }
        Ok(removed.into_iter().map(MessageId).collect())
    }

    async fn inbox_purge(&self, user: UserId) -> Result<u64> {
        // One script, so one atomic step: a message stored meanwhile is either in the range
        // (removed and counted) or not yet there (left unread). Expired entries stay for
        // cleanup, as in the SQL backend.
        let floor = format!("[{}", self.inbox_floor());
        let mut connection = self.command();
        let taken: u64 = scripts()
            .take
            .key(self.keys.inbox(user))
            .arg(&self.keys.prefix)
            .arg(&floor)
            .arg("+")
            .arg(&floor)
            .arg("+")
            .invoke_async(&mut connection)
            .await
            .map_err(redis_error)?;
        commit_wait().await;
        Ok(taken)
    }

    async fn archive_list(&self, user: UserId, query: ListQuery) -> Result<Vec<Message>> {
        let to = match query.after {
            Some(cursor) => format!("({}", member(micros(cursor.date), cursor.id.0)),
            None => "+".to_string(),
        };
        self.list(self.keys.archive(user), "ZREVRANGEBYLEX", &to, "-", query)
            .await
    }

    async fn expired_messages_cleanup(&self, now: DateTime<Utc>) -> Result<Cleanup> {
        let expiry = self.settings.expiry;
        let inbox_cutoff = member(micros(expiry.inbox_cutoff(now)), 0);
        let message_cutoff = member(micros(expiry.message_cutoff(now)), 0);

        // 1. Every user key, one transaction per batch. Inbox entries between the two
        //    cutoffs are what cleanup reports as expired inbox entries; older ones go with
        //    their message, as in the SQL backend.
        let pattern = format!("{}{USER_KEY}*", glob_escape(&self.keys.prefix));
        let inbox_entries = self
            .scan(&pattern, Some("zset"), |keys| {
                let mut pipe = ::redis::pipe();
                pipe.atomic();
                let mut any = false;
                for key in keys {
                    match self.keys.kind(key) {
                        Some(KeyKind::Inbox) => {
                            // Sent as EVAL: a pipeline cannot reload a script the server
                            // forgot, and cleanup is rare enough for the extra bytes.
                            pipe.cmd("EVAL")
                                .arg(scripts::TAKE)
                                .arg(1)
                                .arg(key)
                                .arg(&self.keys.prefix)
                                .arg("-")
                                .arg(format!("({inbox_cutoff}"))
                                .arg(format!("[{message_cutoff}"))
                                .arg(format!("({inbox_cutoff}"));
                        }
                        Some(KeyKind::Archive) => {
                            pipe.cmd("ZREMRANGEBYLEX")
                                .arg(key)
                                .arg("-")
                                .arg(format!("({message_cutoff}"))
                                .ignore();
                        }
                        _ => continue,
                    }
                    any = true;
                }
                any.then_some(pipe)
            })
            .await?;

        // 2. The expired messages themselves, oldest first, from the date index. Members are
        //    removed from the index whatever they look like, so the loop always advances.
        let index = self.keys.by_date();
        let mut connection = self.long_command();
        let mut messages = 0;
        loop {
            let expired: Vec<String> = ::redis::cmd("ZRANGEBYLEX")
                .arg(&index)
                .arg("-")
                .arg(format!("({message_cutoff}"))
                .arg("LIMIT")
                .arg(0)
                .arg(BATCH)
                .query_async(&mut connection)
                .await
                .map_err(redis_error)?;
            if expired.is_empty() {
                break;
            }
            let mut pipe = ::redis::pipe();
            pipe.atomic();
            for entry in &expired {
                if let Some(id) = member_id(entry) {
                    pipe.cmd("UNLINK").arg(self.keys.message(id)).ignore();
                }
                pipe.cmd("ZREM").arg(&index).arg(entry);
            }
            let removed: Vec<u64> = pipe
                .query_async(&mut connection)
                .await
                .map_err(redis_error)?;
            messages += removed.iter().sum::<u64>();
        }
        self.announce_all().await?;
        Ok(Cleanup {
            inbox_entries,
            messages,
        })
    }

    async fn flush(&self) -> Result<()> {
        let pattern = format!("{}*", glob_escape(&self.keys.prefix));
        self.scan(&pattern, None, |keys| {
            let owned: Vec<&Vec<u8>> = keys
                .iter()
                .filter(|key| {
                    matches!(
                        self.keys.kind(key),
                        Some(
                            KeyKind::Inbox
                                | KeyKind::Archive
                                | KeyKind::Message
                                | KeyKind::Index
                                | KeyKind::Spill
                        )
                    )
                })
                .collect();
            if owned.is_empty() {
                return None;
            }
            let mut pipe = ::redis::pipe();
            pipe.cmd("UNLINK").arg(owned).ignore();
            Some(pipe)
        })
        .await?;
        self.announce_all().await
    }

    async fn try_lease(&self, name: &str, ttl: std::time::Duration) -> Result<bool> {
        let mut connection = self.command();
        let taken: Option<String> = ::redis::cmd("SET")
            .arg(format!("{}lease:{name}", self.keys.prefix))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1))
            .query_async(&mut connection)
            .await
            .map_err(redis_error)?;
        Ok(taken.is_some())
    }

    fn flash_spill(&self) -> Option<&dyn FlashSpill> {
        Some(self)
    }

    /// A backend made over a connection of the caller's has no client to subscribe with,
    /// so no feed.
    fn change_feed(&self) -> Option<&dyn WatchChanges> {
        self.client.as_ref().map(|_| self as &dyn WatchChanges)
    }

    fn admin(&self) -> Option<&dyn MessageAdmin> {
        Some(self)
    }
}

#[rocket::async_trait]
impl MessageAdmin for RedisBackend {
    /// Walks ids downwards from `before` (or the last id given out), reading each message's
    /// hash with its `recipients` and `unread` counters (kept by the scripts), skipping ids
    /// whose message is gone; looks at most 10,000 ids per call.
    async fn message_stats(
        &self,
        limit: u32,
        before: Option<MessageId>,
    ) -> Result<Vec<MessageStats>> {
        let mut connection = self.read_command();
        let last: Option<i64> = ::redis::cmd("GET")
            .arg(self.keys.last_id())
            .query_async(&mut connection)
            .await
            .map_err(redis_error)?;
        let last = last.unwrap_or(0);
        let mut next = before.map_or(last, |b| (b.0 - 1).min(last));
        let batch = i64::from(limit.max(25)) * 2;
        let mut looked = 0;
        let mut stats = Vec::new();
        while stats.len() < limit as usize && next >= 1 && looked < 10_000 {
            let ids: Vec<i64> = (next.saturating_sub(batch - 1).max(1)..=next)
                .rev()
                .collect();
            let mut pipe = ::redis::pipe();
            for id in &ids {
                pipe.cmd("HMGET")
                    .arg(self.keys.message(MessageId(*id)))
                    .arg(&[
                        "level",
                        "message",
                        "extra_tags",
                        "url",
                        "date_us",
                        "recipients",
                        "unread",
                    ]);
            }
            let rows: Vec<Vec<Option<String>>> = pipe
                .query_async(&mut connection)
                .await
                .map_err(redis_error)?;
            for (id, row) in ids.iter().zip(rows) {
                if row[0].is_none() || stats.len() >= limit as usize {
                    continue;
                }
                let count = |i: usize| {
                    row[i]
                        .as_deref()
                        .and_then(|v| v.parse::<i64>().ok())
                        .unwrap_or(0)
                        .max(0) as u64
                };
                stats.push(MessageStats {
                    message: decode(MessageId(*id), &row[..5])?,
                    recipients: count(5),
                    unread: count(6),
                });
            }
            looked += ids.len();
            next -= batch;
        }
        Ok(stats)
    }
    /// Removes the message's member from every user's sets (a `SCAN` over the user keys,
    /// as cleanup does: not one atomic step, but repeatable), then its hash and index entry.
    async fn message_delete(&self, id: MessageId) -> Result<u64> {
        let mut connection = self.long_command();
        let member: Option<String> = ::redis::cmd("HGET")
            .arg(self.keys.message(id))
            .arg("member")
            .query_async(&mut connection)
            .await
            .map_err(redis_error)?;
        let Some(member) = member else {
            return Err(Error::MessageDoesNotExist(id));
        };
        let pattern = format!("{}{USER_KEY}*", glob_escape(&self.keys.prefix));
        let archived = self
            .scan(&pattern, Some("zset"), |keys| {
                let mut pipe = ::redis::pipe();
                let mut any = false;
                for key in keys {
                    match self.keys.kind(key) {
                        Some(KeyKind::Archive) => {
                            pipe.cmd("ZREM").arg(key).arg(&member);
                        }
                        Some(KeyKind::Inbox) => {
                            pipe.cmd("ZREM").arg(key).arg(&member).ignore();
                        }
                        _ => continue,
                    }
                    any = true;
                }
                any.then_some(pipe)
            })
            .await?;
        let mut pipe = ::redis::pipe();
        pipe.atomic()
            .cmd("UNLINK")
            .arg(self.keys.message(id))
            .ignore()
            .cmd("ZREM")
            .arg(self.keys.by_date())
            .arg(&member)
            .ignore();
        pipe.cmd("PUBLISH")
            .arg(self.keys.changes())
            .arg("*")
            .ignore();
        pipe.query_async::<()>(&mut connection)
            .await
            .map_err(redis_error)?;
        commit_wait().await;
        Ok(archived)
    }
}

#[rocket::async_trait]
impl FlashSpill for RedisBackend {
    async fn spill_put(&self, key: &str, payload: &str, expires: DateTime<Utc>) -> Result<()> {
        let millis = (expires - Utc::now()).num_milliseconds().max(1);
        let mut connection = self.command();
        ::redis::cmd("SET")
            .arg(self.spill_key(key))
            .arg(payload)
            .arg("PX")
            .arg(millis)
            .query_async::<()>(&mut connection)
            .await
            .map_err(redis_error)
    }
    async fn spill_get(&self, key: &str) -> Result<Option<String>> {
        let mut connection = self.read_command();
        ::redis::cmd("GET")
            .arg(self.spill_key(key))
            .query_async(&mut connection)
            .await
            .map_err(redis_error)
    }
    async fn spill_delete(&self, key: &str) -> Result<()> {
        let mut connection = self.command();
        ::redis::cmd("UNLINK")
            .arg(self.spill_key(key))
            .query_async::<()>(&mut connection)
            .await
            .map_err(redis_error)
    }
}

#[rocket::async_trait]
impl WatchChanges for RedisBackend {
    async fn watch_changes(&self, sink: FeedSink) -> Result<()> {
        let Some(client) = &self.client else {
            return Ok(());
        };
        watch(client, &self.keys.changes(), &sink).await;
        Ok(())
    }

    async fn announce(&self, change: &crate::changes::Change) -> Result<()> {
        // One round trip for every payload.
        let mut pipe = ::redis::pipe();
        for payload in change.to_payloads() {
            pipe.cmd("PUBLISH")
                .arg(self.keys.changes())
                .arg(payload)
                .ignore();
        }
        let mut connection = self.command();
        pipe.query_async::<()>(&mut connection)
            .await
            .map_err(redis_error)?;
        commit_wait().await;
        Ok(())
    }
}

impl RedisBackend {
    fn spill_key(&self, key: &str) -> String {
        format!("{}{SPILL_KEY}{key}", self.keys.prefix)
    }
}

/// The backend's connection to Redis, replaced when a command finds it silent.
///
/// A connection can stop answering without closing: a network path that drops packets, a
/// server paused or failed over behind an address that stays open. The connection manager
/// reconnects when a connection breaks, not when it only goes quiet, so every command of
/// the backend waits a limited time for its answer ([`Command`]); one that waited in vain
/// fails as unavailable (503), and the connection it used is replaced by a new one, opened
/// by the next command. Commands already waiting on the old one end by their own limits.
struct Link {
    /// The connection now, and how many times it was replaced.
    current: RwLock<(u64, ConnectionManager)>,
    /// What opens a replacement; `None` for a backend over a connection of the caller's,
    /// whose commands time out the same way but which is never replaced.
    reopen: Option<(Client, ConnectionManagerConfig)>,
}

impl Link {
    fn new(
        connection: ConnectionManager,
        reopen: Option<(Client, ConnectionManagerConfig)>,
    ) -> Arc<Link> {
        Arc::new(Link {
            current: RwLock::new((0, connection)),
            reopen,
        })
    }

    fn get(&self) -> (u64, ConnectionManager) {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn command(&self, limit: Duration, read_only: bool) -> Command<'_> {
        let (generation, connection) = self.get();
        Command {
            link: self,
            generation,
            connection,
            limit,
            read_only,
        }
    }

    /// Replaces connection number `generation` with a new one, unless another command
    /// replaced it already.
    fn replace(&self, generation: u64, limit: Duration) {
        let Some((client, config)) = &self.reopen else {
            return;
        };
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.0 != generation {
            return;
        }
        match ConnectionManager::new_lazy_with_config(client.clone(), config.clone()) {
            Ok(connection) => {
                *current = (generation + 1, connection);
                log::warn!(
                    "stored-messages: redis gave no answer within {limit:?}; the backend \
                     opens a new connection"
                );
            }
            Err(e) => log::error!(
                "stored-messages: redis gave no answer within {limit:?}, and a new \
                 connection could not be made: {e}"
            ),
        }
    }
}

/// One command's way to Redis: the link's connection, waiting at most `limit` for each
/// answer (see [`Link`]).
struct Command<'a> {
    link: &'a Link,
    generation: u64,
    connection: ConnectionManager,
    limit: Duration,
    /// The command only reads: sent once more if its connection was found dropped.
    read_only: bool,
}

impl Command<'_> {
    /// The answer, or a timeout error after replacing the silent connection.
    fn settle<T>(
        &self,
        answer: std::result::Result<::redis::RedisResult<T>, rocket::tokio::time::error::Elapsed>,
    ) -> ::redis::RedisResult<T> {
        answer.unwrap_or_else(|_| {
            self.link.replace(self.generation, self.limit);
            Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {:?}", self.limit),
            )))
        })
    }
}

impl ConnectionLike for Command<'_> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let limit = self.limit;
            let answer =
                rocket::tokio::time::timeout(limit, self.connection.req_packed_command(cmd)).await;
            match self.settle(answer) {
                // The connection manager reconnects when it sees the drop: the command
                // goes again on the new connection.
                Err(e) if self.read_only && e.is_connection_dropped() => {
                    let answer = rocket::tokio::time::timeout(
                        limit,
                        self.connection.req_packed_command(cmd),
                    )
                    .await;
                    self.settle(answer)
                }
                answer => answer,
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let limit = self.limit;
            let answer = rocket::tokio::time::timeout(
                limit,
                self.connection.req_packed_commands(pipeline, offset, count),
            )
            .await;
            self.settle(answer)
        })
    }

    fn get_db(&self) -> i64 {
        self.connection.get_db()
    }
}

fn redis_error(e: RedisError) -> Error {
    Error::Backend(BackendError::Redis(e))
}

/// An error for stored data that does not have the expected shape.
fn corrupt(what: &str, value: Option<&str>) -> Error {
    redis_error(RedisError::from((
        ErrorKind::UnexpectedReturnType,
        "malformed stored message",
        format!("{what} is {value:?}"),
    )))
}

fn parse_field<T: std::str::FromStr>(value: Option<&str>, what: &str) -> Result<T> {
    value
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| corrupt(what, value))
}

/// A message from the hash fields `level, message, extra_tags, url, date_us`, in that order.
fn decode(id: MessageId, fields: &[Option<String>]) -> Result<Message> {
    let [level, message, extra_tags, url, date_us] = fields else {
        return Err(corrupt("field count", Some(&fields.len().to_string())));
    };
    Ok(Message {
        id,
        level: Level(parse_field(level.as_deref(), "level")?),
        message: message.clone().ok_or_else(|| corrupt("message", None))?,
        extra_tags: extra_tags.clone().unwrap_or_default(),
        url: url.clone(),
        date: from_micros(parse_field(date_us.as_deref(), "date_us")?),
    })
}

/// The field/value pairs of a message hash.
fn hash_fields(message: &NewMessage, member: &str) -> Vec<String> {
    let mut fields = vec![
        "level".to_string(),
        message.level().0.to_string(),
        "message".to_string(),
        message.message().to_string(),
        "extra_tags".to_string(),
        message.extra_tags().to_string(),
        "date_us".to_string(),
        micros(message.date()).to_string(),
        "member".to_string(),
        member.to_string(),
    ];
    if let Some(url) = message.url() {
        fields.push("url".to_string());
        fields.push(url.to_string());
    }
    fields
}

/// The sorted-set member of a message: `<date>:<id>`, whose byte order is (date, id) order.
///
/// Dates from 1970 on are `date_us` zero-padded to 19 digits; earlier ones are `-` and
/// `date_us + 2^63` zero-padded, which sorts before any digit and in date order. Ids below 1
/// (which no message has) are written as 0, the smallest id of a date: `member(d, 0)` is the
/// bound just before every message of date `d`.
fn member(date_us: i64, id: i64) -> String {
    let id = id.max(0);
    if date_us >= 0 {
        format!("{date_us:0DIGITS$}:{id:0DIGITS$}")
    } else {
        // Cannot overflow: for a negative date the result is in 0..2^63.
        let shifted = date_us - i64::MIN;
        format!("-{shifted:0DIGITS$}:{id:0DIGITS$}")
    }
}

/// The message id in a member.
fn member_id(member: &str) -> Option<MessageId> {
    let (_, id) = member.rsplit_once(':')?;
    id.parse().ok().map(MessageId)
}

/// Major and minor version from the answer to `INFO server`.
fn server_version(info: &str) -> Option<(u32, u32)> {
    let version = info
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))?;
    let mut parts = version.trim().split('.').map(|n| n.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// `text` with Redis glob characters escaped, for `SCAN … MATCH`.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// Names of the keys under one prefix.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
}

/// What a key under the prefix is, per the layout in the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Counter,
    Index,
    Message,
    Inbox,
    Archive,
    Spill,
}

impl Keys {
    fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    /// The channel scripts publish changed inboxes on.
    fn changes(&self) -> String {
        format!("{}changes", self.prefix)
    }

    fn last_id(&self) -> String {
        format!("{}{LAST_ID_KEY}", self.prefix)
    }

    fn by_date(&self) -> String {
        format!("{}{BY_DATE_KEY}", self.prefix)
    }

    fn message(&self, id: MessageId) -> String {
        format!("{}{MESSAGE_KEY}{}", self.prefix, id.0)
    }

    fn inbox(&self, user: UserId) -> String {
        format!("{}{USER_KEY}{}{INBOX_SUFFIX}", self.prefix, user.0)
    }

    fn archive(&self, user: UserId) -> String {
        format!("{}{USER_KEY}{}{ARCHIVE_SUFFIX}", self.prefix, user.0)
    }

    /// Which of this backend's keys `key` is, or `None` for anything else (including keys
    /// that merely look alike, such as `user:007:archive`).
    fn kind(&self, key: &[u8]) -> Option<KeyKind> {
        let rest = key.strip_prefix(self.prefix.as_bytes())?;
        let rest = std::str::from_utf8(rest).ok()?;
        let is_id = |s: &str| s.parse::<i64>().is_ok_and(|n| n.to_string() == s);
        if rest == LAST_ID_KEY {
            Some(KeyKind::Counter)
        } else if rest == BY_DATE_KEY {
            Some(KeyKind::Index)
        } else if let Some(key) = rest.strip_prefix(SPILL_KEY) {
            super::is_spill_key(key).then_some(KeyKind::Spill)
        } else if let Some(id) = rest.strip_prefix(MESSAGE_KEY) {
            is_id(id).then_some(KeyKind::Message)
        } else if let Some(user) = rest.strip_prefix(USER_KEY) {
            if let Some(id) = user.strip_suffix(INBOX_SUFFIX) {
                is_id(id).then_some(KeyKind::Inbox)
            } else if let Some(id) = user.strip_suffix(ARCHIVE_SUFFIX) {
                is_id(id).then_some(KeyKind::Archive)
            } else {
                None
            }
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_named_as_documented() {
        let keys = Keys::new("app:");
        assert_eq!(keys.last_id(), "app:messages:last_id");
        assert_eq!(keys.by_date(), "app:messages:by_date");
        assert_eq!(keys.message(MessageId(42)), "app:message:42");
        assert_eq!(keys.inbox(UserId(7)), "app:user:7:notifications");
        assert_eq!(keys.archive(UserId(7)), "app:user:7:archive");
        assert_eq!(Keys::new("").inbox(UserId(-3)), "user:-3:notifications");
    }

    #[test]
    fn key_kinds_recognise_only_the_layout() {
        let keys = Keys::new("app:");
        let kind = |k: &str| keys.kind(k.as_bytes());
        assert_eq!(kind("app:messages:last_id"), Some(KeyKind::Counter));
        assert_eq!(kind("app:messages:by_date"), Some(KeyKind::Index));
        assert_eq!(kind("app:message:42"), Some(KeyKind::Message));
        assert_eq!(kind("app:user:7:notifications"), Some(KeyKind::Inbox));
        assert_eq!(kind("app:user:-7:archive"), Some(KeyKind::Archive));
        for other in [
            "other:user:7:archive",
            "app:user:007:archive",
            "app:user:x:archive",
            "app:user:7:settings",
            "app:message:42:extra",
            "app:session:1",
            "app:",
        ] {
            assert_eq!(kind(other), None, "{other}");
        }
        assert_eq!(Keys::new("").kind(b"\xff\xfe"), None);
    }

    #[test]
    fn members_sort_by_date_then_id_for_every_date() {
        let dates = [
            i64::MIN,
            i64::MIN + 1,
            -86_400_000_000,
            -1,
            0,
            1,
            1_700_000_000_000_000,
            1_700_000_000_000_001,
            i64::MAX,
        ];
        let ids = [0, 1, 9, 10, 11, 99, 100, i64::MAX];
        let mut pairs: Vec<(i64, i64)> = dates
            .iter()
            .flat_map(|&d| ids.iter().map(move |&i| (d, i)))
            .collect();
        pairs.reverse();
        let mut by_member = pairs.clone();
        by_member.sort_by_key(|&(d, i)| member(d, i));
        pairs.sort();
        assert_eq!(by_member, pairs);
    }

    #[test]
    fn members_are_readable_from_1970_on() {
        assert_eq!(
            member(1_700_000_000_000_000, 42),
            "0001700000000000000:0000000000000000042"
        );
        assert_eq!(member(-1, 1), "-9223372036854775807:0000000000000000001");
        assert_eq!(member(5, -4), member(5, 0));
        assert_eq!(
            member_id("0001700000000000000:0000000000000000042"),
            Some(MessageId(42))
        );
        assert_eq!(member_id("garbage"), None);
    }

    #[test]
    fn server_versions_are_read_from_info() {
        let info = "# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n";
        assert_eq!(server_version(info), Some((7, 0)));
        assert!(server_version("redis_version:5.0.7\r\n").unwrap() < MIN_VERSION);
        assert_eq!(server_version("# Server\r\n"), None);
    }

    #[test]
    fn glob_characters_in_the_prefix_are_escaped() {
        assert_eq!(glob_escape("plain:"), "plain:");
        assert_eq!(glob_escape(r"a*b?[c]\"), r"a\*b\?\[c\]\\");
    }

    #[test]
    fn decode_reads_fields_and_rejects_damaged_ones() {
        let fields = |level: &str, date: &str| {
            vec![
                Some(level.to_string()),
                Some("hi".to_string()),
                Some("a b".to_string()),
                None,
                Some(date.to_string()),
            ]
        };
        let m = decode(MessageId(3), &fields("21", "1700000000000000")).unwrap();
        assert_eq!(m.level, Level::STORED_INFO);
        assert_eq!(m.extra_tags, "a b");
        assert_eq!(m.url, None);
        assert_eq!(micros(m.date), 1_700_000_000_000_000);
        assert!(decode(MessageId(3), &fields("x", "1")).is_err());
        assert!(decode(MessageId(3), &fields("21", "")).is_err());
        assert!(decode(MessageId(3), &fields("21", "1")[..4]).is_err());
    }
}
