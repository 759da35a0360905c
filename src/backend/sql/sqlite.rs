//! SQLite's part of the SQL backend: connecting (WAL mode), how ids are passed (a JSON
//! array), the transaction form of writes, and the change feed over the `sm_changes` log.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sqlx::query::Query;
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, SqlitePool};

use super::{connect_feed, micros, returned_id, sql_error, IdArray, PoolSettings, Run};
use crate::backend::{Change, FeedSink, Wanted};
use crate::error::Result;
use crate::message::NewMessage;

/// A pool for a `sqlite://` url: WAL mode, with a busy timeout so readers never wait for
/// writers.
pub(super) async fn connect(
    raw: &str,
    settings: &PoolSettings,
) -> std::result::Result<SqlitePool, sqlx::Error> {
    let options = SqliteConnectOptions::from_str(raw)?
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(settings.timeout)
        .foreign_keys(true);
    let pool = || {
        SqlitePoolOptions::new()
            .max_connections(settings.max)
            .min_connections(settings.min)
            .idle_timeout(settings.idle)
            .acquire_timeout(settings.timeout)
            .test_before_acquire(false)
            .connect_with(options.clone())
    };
    // Several processes opening a fresh file at once: switching it to WAL needs a moment
    // alone with it, and SQLite answers "database is locked" at once instead of waiting
    // (its busy handler does not cover that step). Try again a few times, briefly.
    let mut attempt = 0;
    loop {
        match pool().await {
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("5") && attempt < 20 => {
                attempt += 1;
                log::debug!("stored-messages: opening the SQLite database again after: {e}");
                let wait = 20 + rand::random::<u64>() % 80;
                rocket::tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            result => return result,
        }
    }
}

impl IdArray for Sqlite {
    type Param = String;

    fn param(ids: &[i64]) -> String {
        let mut json = String::with_capacity(ids.len() * 8 + 2);
        json.push('[');
        for (i, id) in ids.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push_str(&id.to_string());
        }
        json.push(']');
        json
    }

    const ROWS: &'static str = "select value as id from json_each(${n})";
    const INBOX_TABLE: &'static str = "sm_deliveries as d indexed by sm_deliveries_inbox";

    fn announce<'q>(payloads: Vec<String>) -> Query<'q, Sqlite, SqliteArguments<'q>> {
        // A JSON array of strings, one row each, in order.
        let payloads = serde_json::to_string(&payloads).unwrap_or_else(|_| "[\"*\"]".into());
        sqlx::query("insert into sm_changes (users, date_us) select value, $2 from json_each($1)")
            .bind(payloads)
            .bind(micros(Utc::now()))
    }
}

/// `deliver` of the SQL backend on SQLite: SQLite has no data-modifying CTEs: two statements in one transaction.
pub(super) async fn deliver(
    pool: &SqlitePool,
    message: &NewMessage,
    users: &[i64],
    singles: &[i64],
    runs: &[Run],
) -> Result<i64> {
    let mut tx = pool.begin().await.map_err(sql_error)?;
    let ids: Vec<i64> = sqlx::query_scalar(
        "insert into sm_messages (level, message, extra_tags, url, date_us) \
             values ($1, $2, $3, $4, $5) returning id",
    )
    .bind(message.level().0)
    .bind(message.message())
    .bind(message.extra_tags())
    .bind(message.url())
    .bind(micros(message.date()))
    .fetch_all(&mut *tx)
    .await
    .map_err(sql_error)?;
    let id = returned_id(ids)?;
    if !singles.is_empty() {
        // The ids are unique, so a plain insert cannot conflict.
        sqlx::query(
            "insert into sm_deliveries (user_id, date_us, message_id, in_inbox) \
                 select value, $2, $3, true from json_each($1)",
        )
        .bind(Sqlite::param(singles))
        .bind(micros(message.date()))
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(sql_error)?;
    }
    if !runs.is_empty() {
        let flat: Vec<i64> = runs
            .iter()
            .flat_map(|r| [r.bucket, r.first, r.last])
            .collect();
        sqlx::query(
            "insert into sm_audiences (message_id, bucket, first_user, last_user, date_us) \
                 select $2, b.value, f.value, l.value, $3 from json_each($1) as b \
                 join json_each($1) as f on f.key = b.key + 1 \
                 join json_each($1) as l on l.key = b.key + 2 \
                 where b.key % 3 = 0",
        )
        .bind(Sqlite::param(&flat))
        .bind(id)
        .bind(micros(message.date()))
        .execute(&mut *tx)
        .await
        .map_err(sql_error)?;
    }
    if !users.is_empty() {
        Sqlite::announce(Change::payloads(users))
            .execute(&mut *tx)
            .await
            .map_err(sql_error)?;
    }
    tx.commit().await.map_err(sql_error)?;
    Ok(id)
}

/// How often SQLite's change feed prunes `sm_changes`, and how old a row must be to go.
const LOG_PRUNE_EVERY: Duration = Duration::from_secs(60);
const LOG_KEEP_US: i64 = 10 * 60 * 1_000_000;
/// Rows of `sm_changes` read at a time.
const LOG_PAGE: i64 = 1000;

/// SQLite's change feed: SQLite cannot notify other processes, so writes leave a row in
/// `sm_changes` (see its migration) and the feed reads the rows after the last one it saw,
/// on a connection of its own: every `poll`, and at once for a sync, which therefore needs
/// no marker (the read itself is the barrier: it sees every commit that came before it).
pub(super) async fn watch(pool: &SqlitePool, sink: &FeedSink, poll: Duration) {
    use sqlx::{ConnectOptions, Connection};
    let options = pool.connect_options();
    loop {
        let connected = || async {
            let mut connection = options.connect().await?;
            let last: i64 = sqlx::query_scalar("select coalesce(max(seq), 0) from sm_changes")
                .fetch_one(&mut connection)
                .await?;
            Ok((connection, last))
        };
        let Some((mut connection, mut last)) =
            connect_feed(sink, || pool.is_closed(), connected).await
        else {
            return;
        };
        // Opened while the feed's connection holds the database open, so SQLite keeps
        // this file (it removes it only when the last connection closes).
        let header = WalHeader::open(options.get_filename()).map(Arc::new);
        if let Some(header) = &header {
            let header = Arc::clone(header);
            sink.set_quick_check(move || header.unchanged());
        }
        sink.live();
        let mut ticker = rocket::tokio::time::interval(poll);
        ticker.set_missed_tick_behavior(rocket::tokio::time::MissedTickBehavior::Delay);
        let mut pruned = std::time::Instant::now();
        loop {
            let sync = rocket::tokio::select! {
                _ = sink.closed() => {
                    let _ = connection.close().await;
                    return;
                }
                _ = ticker.tick() => None,
                wanted = sink.wanted() => match wanted {
                    Wanted::Sync(n) => Some(n),
                    Wanted::Reconnect => {
                        sink.lost();
                        break;
                    }
                },
            };
            // Read before the log: whatever commits after this moment either shows in the
            // log read below or changes the header again.
            let seen = header.as_deref().and_then(WalHeader::read);
            if let Err(e) = read_change_log(&mut connection, &mut last, sink).await {
                log::warn!("stored-messages: change feed down, reading sm_changes failed: {e}");
                sink.lost();
                break;
            }
            if let Some(header) = &header {
                header.record(seen);
            }
            if let Some(n) = sync {
                sink.synced(n);
            }
            if pruned.elapsed() >= LOG_PRUNE_EVERY {
                pruned = std::time::Instant::now();
                let cutoff = micros(Utc::now()) - LOG_KEEP_US;
                // Every process prunes; the newest row stays, for the gap check below.
                if let Err(e) = sqlx::query(
                    "delete from sm_changes where date_us < $1 \
                     and seq < (select max(seq) from sm_changes)",
                )
                .bind(cutoff)
                .execute(&mut connection)
                .await
                {
                    log::debug!("stored-messages: pruning sm_changes failed: {e}");
                }
            }
        }
    }
}

/// SQLite's quick check for a sync: the WAL-index header, the first 96 bytes of the
/// database's `-shm` file (two copies of the header described in
/// <https://www.sqlite.org/walformat.html>), changes with every commit: it holds the last
/// frame of the log and a counter bumped by each transaction. If it is byte for byte what it
/// was before the feed's last complete read of `sm_changes`, nothing was committed since,
/// so everything committed before now has been reported, and a sync needs no query (which
/// on SQLite means a hop to sqlx's worker thread and back). Any doubt (no `-shm` file, a
/// read error, a file that was removed, a header caught mid-write) just means a full sync.
struct WalHeader {
    file: std::fs::File,
    seen: std::sync::Mutex<Option<[u8; 96]>>,
}

impl WalHeader {
    fn open(database: &std::path::Path) -> Option<WalHeader> {
        // SQLite keeps the `-shm` file beside the database's real path, links resolved:
        // a leftover file beside a link would never change.
        let mut path = std::fs::canonicalize(database).ok()?.into_os_string();
        path.push("-shm");
        let file = std::fs::File::open(path).ok()?;
        Some(WalHeader {
            file,
            seen: std::sync::Mutex::new(None),
        })
    }

    /// The header now: one `pread`, as every request that reads the store asks for it.
    #[cfg(unix)]
    fn read(&self) -> Option<[u8; 96]> {
        use std::os::unix::fs::FileExt;
        let mut header = [0u8; 96];
        self.file.read_exact_at(&mut header, 0).ok()?;
        Some(header)
    }

    #[cfg(not(unix))]
    fn read(&self) -> Option<[u8; 96]> {
        None
    }

    /// Keeps `header`, read before the feed's read of `sm_changes` that has just completed,
    /// for [`WalHeader::unchanged`]. A file that was removed no longer changes, so it is
    /// never trusted. Checking that here, once per read of the log, is enough: SQLite removes
    /// the `-shm` file only when the last connection to the database closes, and the feed's
    /// own connection stays open for as long as this header is used (a new connection opens
    /// a new one).
    fn record(&self, header: Option<[u8; 96]>) {
        let removed = {
            #[cfg(unix)]
            {
                use std::os::unix::fs::MetadataExt;
                self.file.metadata().map_or(true, |m| m.nlink() == 0)
            }
            #[cfg(not(unix))]
            {
                true
            }
        };
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = header.filter(|_| !removed);
    }

    fn unchanged(&self) -> bool {
        let seen = *self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.is_some() && self.read() == seen
    }
}

/// Reports every row of `sm_changes` after `last`, and moves `last` on. Rows pruned before
/// this feed read them (it was paused for minutes) are reported as [`Change::All`].
async fn read_change_log(
    connection: &mut sqlx::SqliteConnection,
    last: &mut i64,
    sink: &FeedSink,
) -> Result<(), sqlx::Error> {
    loop {
        let rows: Vec<(i64, String, i64)> = sqlx::query_as(
            "select seq, users, (select min(seq) from sm_changes) from sm_changes \
             where seq > $1 order by seq limit $2",
        )
        .bind(*last)
        .bind(LOG_PAGE)
        .fetch_all(&mut *connection)
        .await?;
        let Some((_, _, oldest)) = rows.first() else {
            return Ok(());
        };
        if *oldest > *last + 1 {
            sink.changed(Change::All);
        }
        for (seq, users, _) in &rows {
            sink.changed(Change::parse(users));
            *last = *seq;
        }
        if (rows.len() as i64) < LOG_PAGE {
            return Ok(());
        }
    }
}
