//! The SQL backend: SQLite (the embedded default) and PostgreSQL, chosen at run time from the
//! database url.
//!
//! # Data model
//!
//! A message is stored **once** in `sm_messages`, however many users receive it. Who has it
//! is kept in two forms:
//!
//! - **rows**: one `sm_deliveries` row per user. The row *is* the user's archive entry, and
//!   its `in_inbox` flag says whether it is still unread. The inbox is a partial index
//!   (`where in_inbox`) on `(user_id, date_us, message_id)`, so listing it reads only unread
//!   entries, however large the archive; the archive is the primary key
//!   `(user_id, date_us, message_id)`, so newest-first pages are index scans.
//! - **runs**: a delivery to at least `audience_min_run` (256) *consecutive* user ids, which
//!   is what a broadcast to everyone usually is, is one `sm_audiences` row per run (cut at
//!   buckets of 65,536 ids). A broadcast to a million users is then a few rows, not a
//!   million: per-user rows cost a heap tuple and two user-keyed B-tree entries each, about
//!   2.7 s per million on PostgreSQL. A covered user without a row has the message unread
//!   (until it expires) and archived; reading it writes that user's row (a read marker), and
//!   from then on the row decides, as it does for a message stored to the user again.
//!
//! Every read is the union of both forms, each side limited to one page: the user's rows
//! through their index, and the runs of the user's bucket in date order (index
//! `sm_audiences_by_date`, which holds each run's bounds), skipping runs that do not cover
//! the user. So a read costs what it returns, plus the runs of other users' broadcasts in
//! the same bucket and date range, which with broadcasts to everyone are none. The audience is still
//! exactly the users the host named at send time: a run holds only ids that were in the
//! list. Marking read flips `in_inbox` or adds a read marker; nothing is copied between
//! tables, so no message can be lost between an inbox and an archive.
//!
//! # Dialects
//!
//! Queries are runtime-checked (`query`/`query_as`), so the build needs no database. Dates
//! are stored as integer microseconds since the Unix epoch (`date_us`) in both dialects: the
//! same comparisons and orderings then hold everywhere. Both drivers accept `$n`
//! placeholders. The dialect differences (how an array of ids is passed, the change feed,
//! the one-statement forms PostgreSQL allows) live in `sqlite.rs` and `postgres.rs`, each
//! compiled with its Cargo feature (`sqlite`, `postgres`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::query::Query;
#[cfg(feature = "postgres")]
use sqlx::PgPool;
#[cfg(feature = "sqlite")]
use sqlx::SqlitePool;
use sqlx::{Database, Encode, Pool, Type};

use super::{
    unique_users, BackendError, Change, Cleanup, FeedSink, FlashSpill, ListQuery, MessageAdmin,
    MessageBackend, MessageStats, Settings, WatchChanges,
};
use crate::error::{Error, Result};
use crate::level::Level;
use crate::message::{Message, MessageId, NewMessage, UserId};
use crate::secret_url::SecretUrl;

/// How long a query waits for a pooled connection (and SQLite for a lock) before failing.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection pool for one of the two SQL dialects.
///
/// Held as an enum of concrete pools because sqlx's `Any` driver has no chrono support and
/// hides dialect differences this crate needs to see.
#[derive(Debug, Clone)]
pub enum SqlPool {
    /// An embedded SQLite database file (Cargo feature `sqlite`).
    #[cfg(feature = "sqlite")]
    Sqlite(SqlitePool),
    /// A PostgreSQL server (Cargo feature `postgres`).
    #[cfg(feature = "postgres")]
    Postgres(PgPool),
}

#[cfg(feature = "postgres")]
mod postgres;
#[macro_use]
mod reads;
#[cfg(feature = "sqlite")]
mod sqlite;

pub use self::reads::{Lease, Reuse, SqlReads};

#[cfg(feature = "postgres")]
pub use self::postgres::CHANGES_CHANNEL;

/// What both dialects' pools are built with.
struct PoolSettings {
    max: u32,
    min: u32,
    idle: Option<Duration>,
    timeout: Duration,
}

/// Runs `$body` with `$pool` bound to the concrete pool of either dialect. The body is
/// compiled twice, once per driver, so generic sqlx code works unchanged in both.
macro_rules! with_pool {
    ($sql_pool:expr, $pool:ident => $body:expr) => {
        match $sql_pool {
            #[cfg(feature = "sqlite")]
            $crate::backend::sql::SqlPool::Sqlite($pool) => $body,
            #[cfg(feature = "postgres")]
            $crate::backend::sql::SqlPool::Postgres($pool) => $body,
        }
    };
}

impl SqlPool {
    /// Connects to `sqlite://…` or `postgres://…` (also `postgresql://`). A SQLite file is
    /// created when the url says `mode=rwc`; it runs in WAL mode with a busy timeout so
    /// readers never wait for writers.
    ///
    /// Pooled connections are not pinged before each use (sqlx's `test_before_acquire`):
    /// that ping doubled the round trips of every request. A connection that died (the
    /// server restarted) fails its next query, which answers 503, and is then replaced.
    ///
    /// # Errors
    ///
    /// [`BackendError::UnsupportedUrl`] for other schemes, [`BackendError::Sql`] when the
    /// database cannot be reached.
    pub async fn connect(url: &SecretUrl) -> Result<SqlPool, BackendError> {
        let config = rocket_db_pools::Config {
            url: url.expose().to_string(),
            min_connections: None,
            max_connections: 8,
            connect_timeout: ACQUIRE_TIMEOUT.as_secs(),
            idle_timeout: None,
            extensions: None,
        };
        SqlPool::connect_with(&config).await
    }

    /// Connects as Rocket's `[default.databases.stored_messages]` says: `url`,
    /// `max_connections`, `min_connections`, `connect_timeout` (seconds, also the wait for a
    /// pooled connection and SQLite's busy timeout) and `idle_timeout`, read with
    /// rocket_db_pools' own [`rocket_db_pools::Config`] (see [`crate::config::database_config`]).
    ///
    /// # Errors
    ///
    /// As [`SqlPool::connect`].
    pub async fn connect_with(config: &rocket_db_pools::Config) -> Result<SqlPool, BackendError> {
        let raw = config.url.as_str();
        let max = u32::try_from(config.max_connections.max(1)).unwrap_or(u32::MAX);
        let settings = PoolSettings {
            max,
            min: config.min_connections.unwrap_or(0).min(max),
            idle: config.idle_timeout.map(Duration::from_secs),
            timeout: Duration::from_secs(config.connect_timeout.max(1)),
        };
        if raw.starts_with("sqlite:") {
            #[cfg(feature = "sqlite")]
            return Ok(SqlPool::Sqlite(sqlite::connect(raw, &settings).await?));
            #[cfg(not(feature = "sqlite"))]
            return Err(BackendError::NotCompiled {
                what: "SQLite",
                feature: "sqlite",
            });
        }
        if raw.starts_with("postgres:") || raw.starts_with("postgresql:") {
            #[cfg(feature = "postgres")]
            return Ok(SqlPool::Postgres(postgres::connect(raw, &settings).await?));
            #[cfg(not(feature = "postgres"))]
            return Err(BackendError::NotCompiled {
                what: "PostgreSQL",
                feature: "postgres",
            });
        }
        let _ = settings;
        Err(BackendError::UnsupportedUrl(SecretUrl::new(raw).redacted()))
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn dialect(&self) -> &'static str {
        match self {
            #[cfg(feature = "sqlite")]
            SqlPool::Sqlite(_) => "sqlite",
            #[cfg(feature = "postgres")]
            SqlPool::Postgres(_) => "postgres",
        }
    }

    /// Applies `migrations/sqlite` or `migrations/postgres`, whichever fits.
    ///
    /// The library and the reference app keep separate migration folders in one database, so
    /// each migrator ignores versions it does not know (the other's).
    ///
    /// # Errors
    ///
    /// [`BackendError::Migrate`] when a migration fails or an applied one was changed.
    pub async fn migrate(&self) -> Result<(), BackendError> {
        run_migrations(
            self,
            sqlx::migrate!("migrations/sqlite"),
            sqlx::migrate!("migrations/postgres"),
        )
        .await
    }

    /// Closes every connection.
    pub async fn close(&self) {
        with_pool!(self, pool => pool.close().await)
    }
}

/// Applies whichever of two migration sets fits the dialect of `pool`, ignoring versions
/// applied by another migration set on the same database.
pub async fn run_migrations(
    pool: &SqlPool,
    mut sqlite: Migrator,
    mut postgres: Migrator,
) -> Result<(), BackendError> {
    match pool {
        #[cfg(feature = "sqlite")]
        SqlPool::Sqlite(pool) => {
            // Unlike PostgreSQL's (an advisory lock), SQLite's migrator takes no lock: two
            // processes starting together on a fresh file both apply a migration, and the
            // second fails ("table … already exists") once the first committed it. Each
            // migration is one transaction with its bookkeeping row, so running the migrator
            // again skips what the other process applied.
            sqlite.set_ignore_missing(true);
            let mut attempt = 0;
            loop {
                match sqlite.run(pool).await {
                    Ok(()) => break,
                    Err(e) if attempt < 20 => {
                        attempt += 1;
                        log::debug!("stored-messages: migrating again after: {e}");
                        let wait = 50 + rand::random::<u64>() % 100;
                        rocket::tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        #[cfg(feature = "postgres")]
        SqlPool::Postgres(pool) => postgres.set_ignore_missing(true).run(pool).await?,
    }
    // Only the compiled dialects' migrators are used.
    let _ = (&mut sqlite, &mut postgres);
    Ok(())
}

/// How each dialect receives an array of integers in one parameter: SQLite as a JSON array
/// read with `json_each`, PostgreSQL as an `int8[]` read with `unnest`.
pub(crate) trait IdArray: Database {
    /// What is bound.
    type Param: for<'q> Encode<'q, Self> + Type<Self> + Send;
    /// The bound value for `ids`.
    fn param(ids: &[i64]) -> Self::Param;
    /// A `select` of one column, `id`, with a row per element of the array in `$n`.
    const ROWS: &'static str;
    /// How the inbox queries name `sm_deliveries` (aliased `d`). SQLite's planner, without statistics,
    /// prefers the primary key (all of a user's archive) to the partial inbox index, so it is
    /// told which index to use; PostgreSQL picks the partial index by itself.
    const INBOX_TABLE: &'static str;
    /// The one statement that announces a change to every process's change feed, inside
    /// the writing transaction: a row of SQLite's `sm_changes` log per payload, a PostgreSQL
    /// notification per payload (sent when the transaction commits).
    fn announce<'q>(payloads: Vec<String>) -> Query<'q, Self, <Self as Database>::Arguments<'q>>;
}

/// `IdArray::announce` for the dialect of `pool`.
fn announce_query<'q, DB: IdArray>(
    _pool: &Pool<DB>,
    payloads: Vec<String>,
) -> Query<'q, DB, <DB as Database>::Arguments<'q>> {
    DB::announce(payloads)
}

/// Inside a transaction of `$pool` (`$tx`), announces `$payloads` (see [`Change::payloads`])
/// to every process's change feed, in one statement.
macro_rules! announce {
    ($pool:expr, $tx:expr, $payload:expr) => {
        announce_query($pool, $payload)
            .execute(&mut *$tx)
            .await
            .map_err(sql_error)?;
    };
}

/// `IdArray::ROWS` for the dialect of `pool`, reading parameter `$n`.
fn id_rows<DB: IdArray>(_pool: &Pool<DB>, n: u8) -> String {
    DB::ROWS.replace("{n}", &n.to_string())
}

/// `IdArray::INBOX_TABLE` for the dialect of `pool`.
fn inbox_table<DB: IdArray>(_pool: &Pool<DB>) -> &'static str {
    DB::INBOX_TABLE
}

/// `IdArray::param` for the dialect of `pool`.
fn id_param<DB: IdArray>(_pool: &Pool<DB>, ids: &[i64]) -> DB::Param {
    DB::param(ids)
}

/// One message as both dialects return it.
#[derive(sqlx::FromRow)]
struct MessageRow {
    id: i64,
    level: i32,
    message: String,
    extra_tags: String,
    url: Option<String>,
    date_us: i64,
}

impl From<MessageRow> for Message {
    fn from(row: MessageRow) -> Message {
        Message {
            id: MessageId(row.id),
            level: Level(row.level),
            message: row.message,
            extra_tags: row.extra_tags,
            url: row.url,
            date: from_micros(row.date_us),
        }
    }
}

/// A message with its counts, as `message_stats` reads it.
#[derive(sqlx::FromRow)]
struct StatsRow {
    #[sqlx(flatten)]
    message: MessageRow,
    recipients: i64,
    unread: i64,
}

pub use super::{from_micros, micros};

/// The columns of a message, with `m` aliasing `sm_messages`.
const MESSAGE_COLUMNS: &str = "m.id, m.level, m.message, m.extra_tags, m.url, m.date_us";

/// Users per bucket of `sm_audiences`, as a shift: a run never crosses a bucket boundary.
const BUCKET_BITS: u32 = 16;

/// The bucket of `sm_audiences` that holds the runs covering `user`.
fn bucket(user: UserId) -> i64 {
    user.0 >> BUCKET_BITS
}

/// The condition "run `a` covers the user in parameter `$user`", with the user's bucket in
/// parameter `$bucket` (so the primary key `(bucket, first_user, …)` finds the runs).
fn covered(user: u8, bucket: u8) -> String {
    format!("a.bucket = ${bucket} and a.first_user <= ${user} and a.last_user >= ${user}")
}

/// The condition "the user in `$1` has no row for run `a`'s message": a row, when there is
/// one, is the user's state for that message and takes precedence over the run.
const NO_ROW: &str = "not exists (select 1 from sm_deliveries r where r.user_id = $1 \
                      and r.date_us = a.date_us and r.message_id = a.message_id)";

/// Joins a row `d` to a run `a` of its message that covers its user.
const ROW_IN_RUN: &str = "d.message_id = a.message_id \
                          and d.user_id >= a.first_user and d.user_id <= a.last_user";

/// An SQL expression: how many users the runs `a` matching `filter` cover without having a
/// row of their own (a row is the user's state, counted with the rows). Cleanup, stats and
/// delete count a run's users this way.
fn covered_without_row(filter: &str) -> String {
    format!(
        "(coalesce((select cast(sum(a.last_user - a.first_user + 1) as bigint) \
         from sm_audiences a where {filter}), 0) \
         - (select count(*) from sm_audiences a join sm_deliveries d on {ROW_IN_RUN} \
         where {filter}))"
    )
}

/// A run of consecutive user ids within one bucket, stored once in `sm_audiences`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    bucket: i64,
    first: i64,
    last: i64,
}

/// Splits sorted, distinct user ids into runs of at least `min_run` consecutive ids (cut at
/// bucket boundaries), and the ids left over, which get a row each.
fn split_runs(users: &[i64], min_run: usize) -> (Vec<Run>, Vec<i64>) {
    let mut runs = Vec::new();
    let mut singles = Vec::new();
    let mut start = 0;
    while start < users.len() {
        let mut end = start + 1;
        while end < users.len() && users[end - 1].checked_add(1) == Some(users[end]) {
            end += 1;
        }
        if end - start >= min_run.max(1) {
            let (mut first, last) = (users[start], users[end - 1]);
            while first <= last {
                let bucket = first >> BUCKET_BITS;
                let bucket_last = ((bucket + 1) << BUCKET_BITS).wrapping_sub(1);
                let run_last = last.min(bucket_last);
                runs.push(Run {
                    bucket,
                    first,
                    last: run_last,
                });
                match run_last.checked_add(1) {
                    Some(next) => first = next,
                    None => break,
                }
            }
        } else {
            singles.extend_from_slice(&users[start..end]);
        }
        start = end;
    }
    (runs, singles)
}

/// How `deliver_once` changes the runs of one message: the stretches no run covered yet
/// (`fresh`), and the runs it replaces (`remove`) by the merged ones it stores (`insert`).
#[derive(Debug, Default, PartialEq, Eq)]
struct RunPlan {
    fresh: Vec<Run>,
    remove: Vec<Run>,
    insert: Vec<Run>,
}

/// Plans adding the runs `wanted` (sorted, disjoint, each within its bucket) to a message
/// whose runs are `existing` (each with its `expired` flag; disjoint, as every message's
/// runs are). What an existing run covers is left alone; each fresh stretch is merged with
/// the unexpired runs it touches (ids next to each other), so runs never overlap and a
/// bucket keeps few runs per message. An expired run is never extended: its users are
/// already counted out of the inboxes.
fn plan_runs(wanted: &[Run], existing: &[(Run, bool)]) -> RunPlan {
    let mut existing: Vec<(Run, bool)> = existing.to_vec();
    existing.sort_unstable_by_key(|(run, _)| (run.bucket, run.first));
    let mut plan = RunPlan::default();
    for want in wanted {
        let mut next = Some(want.first);
        for (old, _) in existing.iter().filter(|(old, _)| {
            old.bucket == want.bucket && old.last >= want.first && old.first <= want.last
        }) {
            let Some(start) = next else { break };
            if old.first > start {
                plan.fresh.push(Run {
                    bucket: want.bucket,
                    first: start,
                    last: old.first - 1,
                });
            }
            next = old.last.checked_add(1).filter(|n| *n <= want.last);
        }
        if let Some(start) = next.filter(|n| *n <= want.last) {
            plan.fresh.push(Run {
                bucket: want.bucket,
                first: start,
                last: want.last,
            });
        }
    }
    // Merge per bucket: the fresh stretches with the unexpired runs next to them.
    let mut pieces: Vec<(Run, bool)> = plan.fresh.iter().map(|run| (*run, true)).collect();
    pieces.extend(
        existing
            .iter()
            .filter(|(old, expired)| !expired && plan.fresh.iter().any(|f| f.bucket == old.bucket))
            .map(|(old, _)| (*old, false)),
    );
    pieces.sort_unstable_by_key(|(run, _)| (run.bucket, run.first));
    let mut group: Option<(Run, Vec<Run>, bool)> = None;
    let close = |group: Option<(Run, Vec<Run>, bool)>, plan: &mut RunPlan| {
        if let Some((merged, olds, has_fresh)) = group {
            if has_fresh {
                plan.remove.extend(olds);
                plan.insert.push(merged);
            }
        }
    };
    for (piece, is_fresh) in pieces {
        group = match group.take() {
            Some((mut merged, mut olds, has_fresh))
                if merged.bucket == piece.bucket
                    && merged.last.checked_add(1) == Some(piece.first) =>
            {
                merged.last = piece.last;
                if !is_fresh {
                    olds.push(piece);
                }
                Some((merged, olds, has_fresh || is_fresh))
            }
            previous => {
                close(previous, &mut plan);
                let olds = if is_fresh { Vec::new() } else { vec![piece] };
                Some((piece, olds, is_fresh))
            }
        };
    }
    close(group, &mut plan);
    plan
}

/// Stored messages in SQLite or PostgreSQL.
#[derive(Debug, Clone)]
pub struct SqlBackend {
    pool: SqlPool,
    /// The inbox and archive reads, on connections reused without sqlx's ping.
    reads: std::sync::Arc<SqlReads>,
    settings: Settings,
}

impl SqlBackend {
    /// A backend over an already migrated pool.
    pub fn new(pool: SqlPool, settings: Settings) -> SqlBackend {
        let reads = std::sync::Arc::new(SqlReads::new(&pool));
        SqlBackend {
            pool,
            reads,
            settings,
        }
    }

    /// Connects to `url`, applies the migrations and returns the backend.
    ///
    /// # Errors
    ///
    /// See [`SqlPool::connect`] and [`SqlPool::migrate`].
    pub async fn connect(url: &SecretUrl, settings: Settings) -> Result<SqlBackend, BackendError> {
        let pool = SqlPool::connect(url).await?;
        pool.migrate().await?;
        Ok(SqlBackend::new(pool, settings))
    }

    /// The pool, for queries of the host's own.
    pub fn pool(&self) -> &SqlPool {
        &self.pool
    }

    fn check_level(&self, level: Level) -> Result<()> {
        if self.can_handle(level) {
            Ok(())
        } else {
            Err(Error::MessageTypeNotSupported(level))
        }
    }

    /// Inserts a delivery of `message` for each of `users` (unread when `in_inbox`), with
    /// `on_conflict` deciding what happens to users who have it already; returns how many
    /// rows were inserted or changed. One statement, so one atomic step.
    async fn insert_deliveries(
        &self,
        users: &[UserId],
        message: &Message,
        in_inbox: bool,
        on_conflict: &str,
    ) -> Result<u64> {
        let ids = unique_users(users);
        if ids.is_empty() {
            return Ok(0);
        }
        let done = with_pool!(&self.pool, pool => {
            // A user covered by one of the message's runs already has it, unread, unless a
            // row of theirs says otherwise: such users are skipped; rows decide for the rest.
            // (Having a `where`, the select also keeps SQLite from reading `on conflict` as
            // a join constraint.)
            let sql = format!(
                "insert into sm_deliveries (user_id, date_us, message_id, in_inbox) \
                 select u.id, $2, $3, $4 from ({}) as u \
                 where not exists (select 1 from sm_audiences a where a.message_id = $3 \
                 and a.first_user <= u.id and a.last_user >= u.id) \
                 or exists (select 1 from sm_deliveries r where r.user_id = u.id \
                 and r.date_us = $2 and r.message_id = $3) {on_conflict}",
                id_rows(pool, 1)
            );
            let mut tx = pool.begin().await.map_err(sql_error)?;
            let done = sqlx::query(&sql)
                .bind(id_param(pool, &ids))
                .bind(micros(message.date))
                .bind(message.id.0)
                .bind(in_inbox)
                .execute(&mut *tx)
                .await
                .map_err(sql_error)?
                .rows_affected();
            if in_inbox {
                announce!(pool, tx, Change::payloads(&ids));
            }
            tx.commit().await.map_err(sql_error)?;
            done
        });
        if in_inbox {
            self.settle().await;
        }
        Ok(done)
    }

    fn inbox_cutoff(&self) -> i64 {
        micros(self.settings.expiry.inbox_cutoff(Utc::now()))
    }

    /// Ends a write that announced a change: on PostgreSQL, it waits
    /// [`crate::changes::COMMIT_WAIT`] before it returns, so that every process's reads
    /// can trust their recent syncs (see [`crate::changes`]). SQLite's readers need no round
    /// trip to catch up, so its writers do not wait.
    async fn settle(&self) {
        #[cfg(feature = "postgres")]
        if matches!(self.pool, SqlPool::Postgres(_)) {
            crate::changes::commit_wait().await;
        }
    }
}

/// Lower bound for "after" in ascending listings when there is no cursor.
const START_ASC: (i64, i64) = (i64::MIN, i64::MIN);
/// Upper bound for "after" in descending listings when there is no cursor.
const START_DESC: (i64, i64) = (i64::MAX, i64::MAX);

fn cursor_bounds(query: &ListQuery, start: (i64, i64)) -> (i64, i64, i64) {
    let (date, id) = query.after.map_or(start, |c| (micros(c.date), c.id.0));
    let limit = query.limit.map_or(i64::MAX, i64::from);
    (date, id, limit)
}

/// The id an `insert … returning id` gave back.
///
/// NOTE: `returning` rows are read with `fetch_all`, never `fetch_one`/`fetch_optional`:
/// SQLite commits an autocommit statement only once it has been stepped to completion, and
/// sqlx stops stepping after the first row, so a short-lived process could exit with the
/// insert uncommitted.
fn returned_id(ids: Vec<i64>) -> Result<i64> {
    ids.first()
        .copied()
        .ok_or_else(|| sql_error(sqlx::Error::RowNotFound))
}

fn sql_error(e: sqlx::Error) -> Error {
    Error::Backend(BackendError::Sql(e))
}

#[rocket::async_trait]
impl MessageBackend for SqlBackend {
    fn name(&self) -> &'static str {
        self.pool.dialect()
    }

    fn can_handle(&self, level: Level) -> bool {
        self.settings.store_levels.contains(&level)
    }

    async fn create_message(&self, message: &NewMessage) -> Result<Message> {
        self.check_level(message.level())?;
        let sql = "insert into sm_messages (level, message, extra_tags, url, date_us) \
                   values ($1, $2, $3, $4, $5) returning id";
        let ids: Vec<i64> = with_pool!(&self.pool, pool => sqlx::query_scalar(sql)
            .bind(message.level().0)
            .bind(message.message())
            .bind(message.extra_tags())
            .bind(message.url())
            .bind(micros(message.date()))
            .fetch_all(pool)
            .await
            .map_err(sql_error)?);
        let id = returned_id(ids)?;
        Ok(message.clone().into_message(MessageId(id)))
    }

    async fn archive_store(&self, users: &[UserId], message: &Message) -> Result<u64> {
        self.insert_deliveries(users, message, false, "on conflict do nothing")
            .await
    }

    async fn inbox_store(&self, users: &[UserId], message: &Message) -> Result<u64> {
        // A user who has it unread is left alone (and not counted); one who read it gets it
        // back in the inbox.
        let on_conflict = "on conflict (user_id, date_us, message_id) \
                           do update set in_inbox = true, read_us = null \
                           where not sm_deliveries.in_inbox";
        self.insert_deliveries(users, message, true, on_conflict)
            .await
    }

    async fn deliver(&self, users: &[UserId], message: &NewMessage) -> Result<Message> {
        self.check_level(message.level())?;
        let users = unique_users(users);
        let (runs, singles) = split_runs(&users, self.settings.audience_min_run);
        let id = match &self.pool {
            #[cfg(feature = "postgres")]
            SqlPool::Postgres(pool) => {
                postgres::deliver(pool, message, &users, &singles, &runs).await?
            }
            #[cfg(feature = "sqlite")]
            SqlPool::Sqlite(pool) => {
                sqlite::deliver(pool, message, &users, &singles, &runs).await?
            }
        };
        self.settle().await;
        Ok(message.clone().into_message(MessageId(id)))
    }

    async fn inbox_list(&self, user: UserId, query: ListQuery) -> Result<Vec<Message>> {
        let (date, id, limit) = cursor_bounds(&query, START_ASC);
        let cutoff = self.inbox_cutoff();
        let rows: Vec<MessageRow> = with_read!(&*self.reads, sql_error, pool, conn => {
            // Unread rows through the partial index sm_deliveries_inbox, and the runs that
            // cover the user (in the user's bucket) without a row of theirs: each side reads
            // at most one page.
            let sql = format!(
                "select * from (select {MESSAGE_COLUMNS} from {} \
                 join sm_messages m on m.id = d.message_id \
                 where d.user_id = $1 and d.in_inbox and d.date_us >= $2 \
                 and (d.date_us, d.message_id) > ($3, $4) \
                 order by d.date_us, d.message_id limit $5) as own \
                 union all \
                 select * from (select {MESSAGE_COLUMNS} from sm_audiences a \
                 join sm_messages m on m.id = a.message_id \
                 where {} and a.date_us >= $2 \
                 and (a.date_us, a.message_id) > ($3, $4) and {} \
                 order by a.date_us, a.message_id limit $5) as runs \
                 order by date_us, id limit $5",
                inbox_table(pool),
                covered(1, 6),
                NO_ROW,
            );
            sqlx::query_as(&sql)
                .bind(user.0)
                .bind(cutoff)
                .bind(date)
                .bind(id)
                .bind(limit)
                .bind(bucket(user))
                .fetch_all(conn)
                .await
                .map_err(sql_error)?
        });
        Ok(rows.into_iter().map(Message::from).collect())
    }

    async fn inbox_list_many(&self, users: &[UserId], limit: u32) -> Result<Vec<Vec<Message>>> {
        #[cfg(feature = "postgres")]
        #[allow(irrefutable_let_patterns)]
        if let SqlPool::Postgres(pool) = &self.pool {
            return postgres::inbox_list_many(pool, users, limit, self.inbox_cutoff()).await;
        }
        // SQLite answers in-process: one query per user costs no round trip.
        let mut lists = Vec::with_capacity(users.len());
        for user in users {
            lists.push(self.inbox_list(*user, ListQuery::first(limit)).await?);
        }
        Ok(lists)
    }

    async fn inbox_count(&self, user: UserId) -> Result<u64> {
        let cutoff = self.inbox_cutoff();
        let count: i64 = with_read!(&*self.reads, sql_error, pool, conn => {
            let sql = format!(
                "select (select count(*) from {} \
                 where d.user_id = $1 and d.in_inbox and d.date_us >= $2) \
                 + (select count(*) from sm_audiences a \
                 where {} and a.date_us >= $2 and {})",
                inbox_table(pool),
                covered(1, 3),
                NO_ROW,
            );
            sqlx::query_scalar(&sql)
                .bind(user.0)
                .bind(cutoff)
                .bind(bucket(user))
                .fetch_one(conn)
                .await
                .map_err(sql_error)?
        });
        Ok(count.max(0) as u64)
    }

    async fn inbox_get(&self, user: UserId, id: MessageId) -> Result<Message> {
        // The message's date completes the delivery's key, so the row is a primary key
        // lookup; without a row, a run of the message may cover the user.
        let sql = format!(
            "select {MESSAGE_COLUMNS} from sm_messages m \
             left join sm_deliveries d on d.user_id = $1 and d.date_us = m.date_us \
             and d.message_id = m.id \
             where m.id = $2 and m.date_us >= $3 and (d.in_inbox or (d.user_id is null \
             and exists (select 1 from sm_audiences a where a.message_id = m.id \
             and a.bucket = $4 and a.first_user <= $1 and a.last_user >= $1)))"
        );
        let cutoff = self.inbox_cutoff();
        let row: Option<MessageRow> = with_read!(&*self.reads, sql_error, _pool, conn => sqlx::query_as(&sql)
            .bind(user.0)
            .bind(id.0)
            .bind(cutoff)
            .bind(bucket(user))
            .fetch_optional(conn)
            .await
            .map_err(sql_error)?);
        row.map(Message::from).ok_or(Error::MessageDoesNotExist(id))
    }

    async fn inbox_delete_many(&self, user: UserId, ids: &[MessageId]) -> Result<Vec<MessageId>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let raw: Vec<i64> = ids.iter().map(|id| id.0).collect();
        let cutoff = self.inbox_cutoff();
        let now = micros(Utc::now());
        let deleted: Vec<i64> = with_pool!(&self.pool, pool => {
            let sql = format!(
                "update sm_deliveries set in_inbox = false, read_us = $3 \
                 where user_id = $1 and in_inbox and date_us >= $4 \
                 and (date_us, message_id) in \
                 (select m.date_us, m.id from sm_messages m where m.id in ({})) \
                 returning message_id",
                id_rows(pool, 2)
            );
            // Covered by a run without a row: a read marker row records the read.
            let markers = format!(
                "insert into sm_deliveries (user_id, date_us, message_id, in_inbox, read_us) \
                 select $1, a.date_us, a.message_id, false, $3 from sm_audiences a \
                 where a.message_id in ({}) and {} and a.date_us >= $4 \
                 on conflict do nothing returning message_id",
                id_rows(pool, 2),
                covered(1, 5),
            );
            let mut tx = pool.begin().await.map_err(sql_error)?;
            let mut deleted: Vec<i64> = sqlx::query_scalar(&sql)
                .bind(user.0)
                .bind(id_param(pool, &raw))
                .bind(now)
                .bind(cutoff)
                .fetch_all(&mut *tx)
                .await
                .map_err(sql_error)?;
            let marked: Vec<i64> = sqlx::query_scalar(&markers)
                .bind(user.0)
                .bind(id_param(pool, &raw))
                .bind(now)
                .bind(cutoff)
                .bind(bucket(user))
                .fetch_all(&mut *tx)
                .await
                .map_err(sql_error)?;
            deleted.extend(marked);
            if !deleted.is_empty() {
                announce!(pool, tx, vec![Change::payload(&[user.0])]);
            }
            tx.commit().await.map_err(sql_error)?;
            deleted
        });
        if !deleted.is_empty() {
            self.settle().await;
        }
        Ok(deleted.into_iter().map(MessageId).collect())
    }

    async fn inbox_purge(&self, user: UserId) -> Result<u64> {
        // One transaction: a delivery committed while it runs is either marked read (and
        // counted) or not seen at all, so it stays unread.
        let sql = "update sm_deliveries set in_inbox = false, read_us = $3 \
                   where user_id = $1 and in_inbox and date_us >= $2";
        let markers = format!(
            "insert into sm_deliveries (user_id, date_us, message_id, in_inbox, read_us) \
             select $1, a.date_us, a.message_id, false, $3 from sm_audiences a \
             where {} and a.date_us >= $2 on conflict do nothing",
            covered(1, 4),
        );
        let cutoff = self.inbox_cutoff();
        let now = micros(Utc::now());
        #[cfg(feature = "postgres")]
        #[allow(irrefutable_let_patterns)]
        if let SqlPool::Postgres(pool) = &self.pool {
            // PostgreSQL does it in one statement (one round trip instead of five): the two
            // data-modifying CTEs share one snapshot, and the notification goes at commit.
            let sql = format!(
                "with own as ({sql} returning 1), marked as ({markers} returning 1) \
                 select (select count(*) from own) + (select count(*) from marked), \
                 pg_notify({}, $6)::text",
                postgres::channel_sql(5)
            );
            let (done, _): (i64, Option<String>) = sqlx::query_as(&sql)
                .bind(user.0)
                .bind(cutoff)
                .bind(now)
                .bind(bucket(user))
                .bind(CHANGES_CHANNEL)
                .bind(Change::payload(&[user.0]))
                .fetch_one(pool)
                .await
                .map_err(sql_error)?;
            self.settle().await;
            return Ok(done.max(0) as u64);
        }
        let done = with_pool!(&self.pool, pool => {
            let mut tx = pool.begin().await.map_err(sql_error)?;
            let mut done = sqlx::query(sql)
                .bind(user.0)
                .bind(cutoff)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(sql_error)?
                .rows_affected();
            done += sqlx::query(&markers)
                .bind(user.0)
                .bind(cutoff)
                .bind(now)
                .bind(bucket(user))
                .execute(&mut *tx)
                .await
                .map_err(sql_error)?
                .rows_affected();
            if done > 0 {
                announce!(pool, tx, vec![Change::payload(&[user.0])]);
            }
            tx.commit().await.map_err(sql_error)?;
            done
        });
        Ok(done)
    }

    async fn archive_list(&self, user: UserId, query: ListQuery) -> Result<Vec<Message>> {
        let (date, id, limit) = cursor_bounds(&query, START_DESC);
        // The user's rows through the primary key, read backwards, and the runs covering
        // the user without a row of theirs: each side reads at most one page.
        let sql = format!(
            "select * from (select {MESSAGE_COLUMNS} from sm_deliveries d \
             join sm_messages m on m.id = d.message_id \
             where d.user_id = $1 and (d.date_us, d.message_id) < ($2, $3) \
             order by d.date_us desc, d.message_id desc limit $4) as own \
             union all \
             select * from (select {MESSAGE_COLUMNS} from sm_audiences a \
             join sm_messages m on m.id = a.message_id \
             where {} and (a.date_us, a.message_id) < ($2, $3) and {} \
             order by a.date_us desc, a.message_id desc limit $4) as runs \
             order by date_us desc, id desc limit $4",
            covered(1, 5),
            NO_ROW,
        );
        let rows: Vec<MessageRow> = with_read!(&*self.reads, sql_error, _pool, conn => sqlx::query_as(&sql)
            .bind(user.0)
            .bind(date)
            .bind(id)
            .bind(limit)
            .bind(bucket(user))
            .fetch_all(conn)
            .await
            .map_err(sql_error)?);
        Ok(rows.into_iter().map(Message::from).collect())
    }

    async fn expired_messages_cleanup(&self, now: DateTime<Utc>) -> Result<Cleanup> {
        let inbox_cutoff = micros(self.settings.expiry.inbox_cutoff(now));
        let message_cutoff = micros(self.settings.expiry.message_cutoff(now));
        let cleanup = with_pool!(&self.pool, pool => {
            let mut tx = pool.begin().await.map_err(sql_error)?;
            // Both statements go through sm_messages_date and sm_deliveries_message: they
            // touch only the expired messages, not every unread entry.
            let inbox_entries = sqlx::query(
                "update sm_deliveries set in_inbox = false where in_inbox and message_id in \
                 (select id from sm_messages where date_us < $1 and date_us >= $2)",
            )
            .bind(inbox_cutoff)
            .bind(message_cutoff)
            .execute(&mut *tx)
            .await
            .map_err(sql_error)?
            .rows_affected();
            // Runs leave the inbox as a whole: their covered users without a row are counted
            // once, and the run is flagged so the next cleanup does not count them again.
            let covered_without_row: i64 = sqlx::query_scalar(&format!(
                "select {}",
                covered_without_row("not a.expired and a.date_us < $1 and a.date_us >= $2")
            ))
            .bind(inbox_cutoff)
            .bind(message_cutoff)
            .fetch_one(&mut *tx)
            .await
            .map_err(sql_error)?;
            sqlx::query(
                "update sm_audiences set expired = true \
                 where not expired and date_us < $1 and date_us >= $2",
            )
            .bind(inbox_cutoff)
            .bind(message_cutoff)
            .execute(&mut *tx)
            .await
            .map_err(sql_error)?;
            let inbox_entries = inbox_entries + covered_without_row.max(0) as u64;
            sqlx::query("delete from sm_audiences where date_us < $1")
                .bind(message_cutoff)
                .execute(&mut *tx)
                .await
                .map_err(sql_error)?;
            sqlx::query(
                "delete from sm_deliveries where message_id in \
                 (select id from sm_messages where date_us < $1)",
            )
            .bind(message_cutoff)
            .execute(&mut *tx)
            .await
            .map_err(sql_error)?;
            sqlx::query("delete from sm_flash_spill where expires_us < $1")
                .bind(micros(now))
                .execute(&mut *tx)
                .await
                .map_err(sql_error)?;
            let messages = sqlx::query("delete from sm_messages where date_us < $1")
                .bind(message_cutoff)
                .execute(&mut *tx)
                .await
                .map_err(sql_error)?
                .rows_affected();
            announce!(pool, tx, Change::All.to_payloads());
            tx.commit().await.map_err(sql_error)?;
            Cleanup { inbox_entries, messages }
        });
        self.settle().await;
        Ok(cleanup)
    }

    async fn flush(&self) -> Result<()> {
        with_pool!(&self.pool, pool => {
            let mut tx = pool.begin().await.map_err(sql_error)?;
            sqlx::query("delete from sm_deliveries").execute(&mut *tx).await.map_err(sql_error)?;
            sqlx::query("delete from sm_audiences").execute(&mut *tx).await.map_err(sql_error)?;
            sqlx::query("delete from sm_messages").execute(&mut *tx).await.map_err(sql_error)?;
            sqlx::query("delete from sm_flash_spill").execute(&mut *tx).await.map_err(sql_error)?;
            announce!(pool, tx, Change::All.to_payloads());
            tx.commit().await.map_err(sql_error)?;
        });
        self.settle().await;
        Ok(())
    }

    async fn deliver_once(&self, users: &[UserId], message: &Message) -> Result<u64> {
        let ids = unique_users(users);
        let (runs, singles) = split_runs(&ids, self.settings.audience_min_run);
        if runs.is_empty() {
            return self
                .insert_deliveries(users, message, true, "on conflict do nothing")
                .await;
        }
        // Long stretches of consecutive users become runs, as `deliver` stores them: a
        // background broadcast to everyone then costs a few rows per chunk, not one per
        // user. The runs of one message never overlap, so only what no run of the message
        // covers yet is added, and a run that touches an existing one is merged with it
        // (a bucket keeps one run per message, as after `deliver`).
        let (low, high) = (runs[0].bucket, runs[runs.len() - 1].bucket);
        // Users outside every run get a row, unless a run of the message (or a row) has
        // them already.
        let singles_sql = "insert into sm_deliveries (user_id, date_us, message_id, in_inbox) \
             select u.id, $2, $3, true from ({rows}) as u \
             where not exists (select 1 from sm_audiences a where a.message_id = $3 \
             and a.first_user <= u.id and a.last_user >= u.id) \
             on conflict do nothing";
        let added = with_pool!(&self.pool, pool => {
            let mut tx = pool.begin().await.map_err(sql_error)?;
            // A write first: it serializes deliveries of this message (PostgreSQL locks the
            // row, SQLite takes its write lock for the whole transaction), so two chunks
            // never plan from the same old runs.
            let found = sqlx::query("update sm_messages set level = level where id = $1")
                .bind(message.id.0)
                .execute(&mut *tx)
                .await
                .map_err(sql_error)?
                .rows_affected();
            if found == 0 {
                return Err(Error::MessageDoesNotExist(message.id));
            }
            let existing: Vec<(i64, i64, i64, bool)> = sqlx::query_as(
                "select bucket, first_user, last_user, expired from sm_audiences \
                 where message_id = $1 and bucket >= $2 and bucket <= $3",
            )
            .bind(message.id.0)
            .bind(low)
            .bind(high)
            .fetch_all(&mut *tx)
            .await
            .map_err(sql_error)?;
            let existing: Vec<(Run, bool)> = existing
                .into_iter()
                .map(|(bucket, first, last, expired)| (Run { bucket, first, last }, expired))
                .collect();
            let plan = plan_runs(&runs, &existing);
            let mut added: i64 = 0;
            for fresh in &plan.fresh {
                // A user inside the new stretch who has a row already has the message (a
                // row decides over a run): not counted.
                let rows: i64 = sqlx::query_scalar(
                    "select count(*) from sm_deliveries \
                     where message_id = $1 and user_id >= $2 and user_id <= $3",
                )
                .bind(message.id.0)
                .bind(fresh.first)
                .bind(fresh.last)
                .fetch_one(&mut *tx)
                .await
                .map_err(sql_error)?;
                added += fresh.last - fresh.first + 1 - rows;
            }
            for old in &plan.remove {
                sqlx::query(
                    "delete from sm_audiences where bucket = $1 and first_user = $2 \
                     and message_id = $3",
                )
                .bind(old.bucket)
                .bind(old.first)
                .bind(message.id.0)
                .execute(&mut *tx)
                .await
                .map_err(sql_error)?;
            }
            for run in &plan.insert {
                sqlx::query(
                    "insert into sm_audiences (message_id, bucket, first_user, last_user, date_us) \
                     values ($1, $2, $3, $4, $5)",
                )
                .bind(message.id.0)
                .bind(run.bucket)
                .bind(run.first)
                .bind(run.last)
                .bind(micros(message.date))
                .execute(&mut *tx)
                .await
                .map_err(sql_error)?;
            }
            if !singles.is_empty() {
                let sql = singles_sql.replace("{rows}", &id_rows(pool, 1));
                let done = sqlx::query(&sql)
                    .bind(id_param(pool, &singles))
                    .bind(micros(message.date))
                    .bind(message.id.0)
                    .execute(&mut *tx)
                    .await
                    .map_err(sql_error)?
                    .rows_affected();
                added += i64::try_from(done).unwrap_or(i64::MAX);
            }
            if added > 0 {
                announce!(pool, tx, Change::payloads(&ids));
            }
            tx.commit().await.map_err(sql_error)?;
            added
        });
        if added > 0 {
            self.settle().await;
        }
        Ok(added.max(0) as u64)
    }

    async fn try_lease(&self, name: &str, ttl: std::time::Duration) -> Result<bool> {
        let now = micros(Utc::now());
        let until = now.saturating_add(i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX));
        // One statement: of two processes racing for an expired lease, the second finds
        // it renewed and updates (so returns) nothing.
        let sql = "insert into sm_leases (name, until_us) values ($1, $2) \
                   on conflict (name) do update set until_us = excluded.until_us \
                   where sm_leases.until_us <= $3 returning name";
        let taken: Vec<String> = with_pool!(&self.pool, pool => sqlx::query_scalar(sql)
            .bind(name)
            .bind(until)
            .bind(now)
            .fetch_all(pool)
            .await
            .map_err(sql_error)?);
        Ok(!taken.is_empty())
    }

    fn flash_spill(&self) -> Option<&dyn FlashSpill> {
        Some(self)
    }

    fn change_feed(&self) -> Option<&dyn WatchChanges> {
        Some(self)
    }

    fn admin(&self) -> Option<&dyn MessageAdmin> {
        Some(self)
    }
}

#[rocket::async_trait]
impl MessageAdmin for SqlBackend {
    async fn message_stats(
        &self,
        limit: u32,
        before: Option<MessageId>,
    ) -> Result<Vec<MessageStats>> {
        // Rows, plus the users runs cover without a row (a row is its user's state, counted
        // once); an expired run has nobody unread.
        let sql = format!(
            "select {MESSAGE_COLUMNS}, \
             (select count(*) from sm_deliveries d where d.message_id = m.id) \
             + {} as recipients, \
             (select count(*) from sm_deliveries d where d.message_id = m.id and d.in_inbox) \
             + {} as unread \
             from sm_messages m where m.id < $1 order by m.id desc limit $2",
            covered_without_row("a.message_id = m.id"),
            covered_without_row("a.message_id = m.id and not a.expired"),
        );
        let before = before.map_or(i64::MAX, |id| id.0);
        let rows: Vec<StatsRow> = with_pool!(&self.pool, pool => sqlx::query_as(&sql)
            .bind(before)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await
            .map_err(sql_error)?);
        Ok(rows
            .into_iter()
            .map(|r| MessageStats {
                recipients: r.recipients.max(0) as u64,
                unread: r.unread.max(0) as u64,
                message: r.message.into(),
            })
            .collect())
    }
    async fn message_delete(&self, id: MessageId) -> Result<u64> {
        let (deliveries, messages) = with_pool!(&self.pool, pool => {
            let mut tx = pool.begin().await.map_err(sql_error)?;
            // A write first: SQLite then holds the write lock for the whole transaction (a
            // read first could not upgrade once another connection has committed).
            let messages = sqlx::query("delete from sm_messages where id = $1")
                .bind(id.0)
                .execute(&mut *tx)
                .await
                .map_err(sql_error)?
                .rows_affected();
            // The users a run covers without a row of theirs, counted before the run goes.
            let covered_without_row: i64 = sqlx::query_scalar(&format!(
                "select {}",
                covered_without_row("a.message_id = $1")
            ))
            .bind(id.0)
            .fetch_one(&mut *tx)
            .await
            .map_err(sql_error)?;
            sqlx::query("delete from sm_audiences where message_id = $1")
                .bind(id.0)
                .execute(&mut *tx)
                .await
                .map_err(sql_error)?;
            let deliveries = sqlx::query("delete from sm_deliveries where message_id = $1")
                .bind(id.0)
                .execute(&mut *tx)
                .await
                .map_err(sql_error)?
                .rows_affected()
                + covered_without_row.max(0) as u64;
            if deliveries > 0 {
                announce!(pool, tx, Change::All.to_payloads());
            }
            tx.commit().await.map_err(sql_error)?;
            (deliveries, messages)
        });
        if deliveries > 0 {
            self.settle().await;
        }
        if messages == 0 {
            return Err(Error::MessageDoesNotExist(id));
        }
        Ok(deliveries)
    }
}

#[rocket::async_trait]
impl FlashSpill for SqlBackend {
    async fn spill_put(&self, key: &str, payload: &str, expires: DateTime<Utc>) -> Result<()> {
        let sql = "insert into sm_flash_spill (key, payload, expires_us) values ($1, $2, $3) \
                   on conflict (key) do update set payload = excluded.payload, \
                   expires_us = excluded.expires_us";
        with_pool!(&self.pool, pool => sqlx::query(sql)
            .bind(key)
            .bind(payload)
            .bind(micros(expires))
            .execute(pool)
            .await
            .map_err(sql_error)?
            .rows_affected());
        Ok(())
    }
    async fn spill_get(&self, key: &str) -> Result<Option<String>> {
        let sql = "select payload from sm_flash_spill where key = $1 and expires_us > $2";
        let now = micros(Utc::now());
        Ok(with_pool!(&self.pool, pool => sqlx::query_scalar(sql)
            .bind(key)
            .bind(now)
            .fetch_optional(pool)
            .await
            .map_err(sql_error)?))
    }
    async fn spill_delete(&self, key: &str) -> Result<()> {
        with_pool!(&self.pool, pool => sqlx::query("delete from sm_flash_spill where key = $1")
            .bind(key)
            .execute(pool)
            .await
            .map_err(sql_error)?
            .rows_affected());
        Ok(())
    }
}

#[rocket::async_trait]
impl WatchChanges for SqlBackend {
    async fn watch_changes(&self, sink: FeedSink) -> Result<()> {
        match &self.pool {
            #[cfg(feature = "postgres")]
            SqlPool::Postgres(pool) => postgres::watch(pool, &sink).await,
            #[cfg(feature = "sqlite")]
            SqlPool::Sqlite(pool) => sqlite::watch(pool, &sink, self.settings.change_poll).await,
        }
        Ok(())
    }

    async fn announce(&self, change: &Change) -> Result<()> {
        let payloads = change.to_payloads();
        with_pool!(&self.pool, pool => {
            announce_query(pool, payloads)
                .execute(pool)
                .await
                .map_err(sql_error)?;
        });
        self.settle().await;
        Ok(())
    }
}

/// How long a change feed waits before connecting again after losing its connection.
const FEED_RETRY: Duration = Duration::from_secs(1);

/// Waits `delay`, or less if the feed goes away; `false` when it did.
async fn pause(sink: &FeedSink, delay: Duration) -> bool {
    rocket::tokio::select! {
        _ = sink.closed() => false,
        _ = rocket::tokio::time::sleep(delay) => true,
    }
}

/// Connects a change feed with `connect`, trying again every [`FEED_RETRY`] (the feed stays
/// down meanwhile). `None` when the pool was closed or the feed went away.
async fn connect_feed<T, F, Fut>(
    sink: &FeedSink,
    pool_closed: impl Fn() -> bool,
    mut connect: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    loop {
        if pool_closed() {
            sink.lost();
            return None;
        }
        rocket::tokio::select! {
            _ = sink.closed() => return None,
            connected = connect() => match connected {
                Ok(feed) => return Some(feed),
                Err(e) => {
                    log::warn!("stored-messages: change feed down, cannot connect: {e}");
                    sink.lost();
                    if !pause(sink, FEED_RETRY).await {
                        return None;
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bucket: i64, first: i64, last: i64) -> Run {
        Run {
            bucket,
            first,
            last,
        }
    }

    #[test]
    fn runs_are_long_stretches_of_consecutive_ids_cut_at_buckets() {
        let (runs, singles) = split_runs(&[1, 2, 3, 5, 7, 8], 2);
        assert_eq!(runs, [run(0, 1, 3), run(0, 7, 8)]);
        assert_eq!(singles, [5]);
        let (runs, singles) = split_runs(&[1, 2, 3, 5, 7, 8], 256);
        assert!(runs.is_empty());
        assert_eq!(singles, [1, 2, 3, 5, 7, 8]);
        let everyone: Vec<i64> = (1..=200_000).collect();
        let (runs, singles) = split_runs(&everyone, 256);
        assert!(singles.is_empty());
        assert_eq!(
            runs,
            [
                run(0, 1, 65_535),
                run(1, 65_536, 131_071),
                run(2, 131_072, 196_607),
                run(3, 196_608, 200_000)
            ]
        );
        let (runs, _) = split_runs(&[-2, -1, 0, 1], 2);
        assert_eq!(runs, [run(-1, -2, -1), run(0, 0, 1)]);
        let (runs, _) = split_runs(&[i64::MAX - 1, i64::MAX], 2);
        assert_eq!(runs, [run(i64::MAX >> 16, i64::MAX - 1, i64::MAX)]);
        assert_eq!(bucket(UserId(-1)), -1);
    }

    #[test]
    fn planned_runs_add_only_what_is_not_covered_and_merge_with_neighbours() {
        // nothing yet: the wanted runs as they are
        let plan = plan_runs(&[run(0, 1, 100)], &[]);
        assert_eq!(plan.fresh, [run(0, 1, 100)]);
        assert!(plan.remove.is_empty());
        assert_eq!(plan.insert, [run(0, 1, 100)]);
        // the next chunk touches the first: one run for both
        let plan = plan_runs(&[run(0, 101, 200)], &[(run(0, 1, 100), false)]);
        assert_eq!(plan.fresh, [run(0, 101, 200)]);
        assert_eq!(plan.remove, [run(0, 1, 100)]);
        assert_eq!(plan.insert, [run(0, 1, 200)]);
        // a repeated chunk: nothing to do
        let plan = plan_runs(&[run(0, 101, 200)], &[(run(0, 1, 200), false)]);
        assert_eq!(plan, RunPlan::default());
        // overlapping both ends and a hole in the middle
        let existing = [(run(0, 10, 20), false), (run(0, 30, 40), false)];
        let plan = plan_runs(&[run(0, 15, 50)], &existing);
        assert_eq!(plan.fresh, [run(0, 21, 29), run(0, 41, 50)]);
        assert_eq!(plan.remove, [run(0, 10, 20), run(0, 30, 40)]);
        assert_eq!(plan.insert, [run(0, 10, 50)]);
        // a gap that stays a gap: two runs
        let plan = plan_runs(&[run(0, 50, 60)], &[(run(0, 10, 20), false)]);
        assert!(plan.remove.is_empty());
        assert_eq!(plan.insert, [run(0, 50, 60)]);
        // an expired run is skipped over but never extended
        let plan = plan_runs(&[run(0, 1, 30)], &[(run(0, 11, 20), true)]);
        assert_eq!(plan.fresh, [run(0, 1, 10), run(0, 21, 30)]);
        assert!(plan.remove.is_empty());
        assert_eq!(plan.insert, [run(0, 1, 10), run(0, 21, 30)]);
        // runs of other buckets are not touched
        let existing = [(run(1, 65_536, 70_000), false), (run(0, 1, 9), false)];
        let plan = plan_runs(&[run(0, 10, 65_535)], &existing);
        assert_eq!(plan.remove, [run(0, 1, 9)]);
        assert_eq!(plan.insert, [run(0, 1, 65_535)]);
        // the end of the id space
        let plan = plan_runs(
            &[run(i64::MAX >> 16, i64::MAX - 5, i64::MAX)],
            &[(run(i64::MAX >> 16, i64::MAX - 2, i64::MAX), false)],
        );
        assert_eq!(
            plan.fresh,
            [run(i64::MAX >> 16, i64::MAX - 5, i64::MAX - 3)]
        );
        assert_eq!(plan.insert, [run(i64::MAX >> 16, i64::MAX - 5, i64::MAX)]);
    }
}
