//! PostgreSQL's part of the SQL backend: connecting, how ids are passed (`int8[]`), the
//! one-statement forms of writes, and the change feed over `LISTEN`/`NOTIFY`.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions};
use sqlx::query::Query;
use sqlx::{PgPool, Postgres};

use super::{
    connect_feed, micros, returned_id, sql_error, IdArray, MessageRow, PoolSettings, Run,
    ACQUIRE_TIMEOUT, BUCKET_BITS, MESSAGE_COLUMNS,
};
use crate::backend::{Change, FeedSink, Wanted};
use crate::changes::SYNC_TIMEOUT;
use crate::error::Result;
use crate::message::{Message, NewMessage, UserId};

/// A pool for a `postgres://` url.
pub(super) async fn connect(
    raw: &str,
    settings: &PoolSettings,
) -> std::result::Result<PgPool, sqlx::Error> {
    let options = PgConnectOptions::from_str(raw)?;
    PgPoolOptions::new()
        .max_connections(settings.max)
        .min_connections(settings.min)
        .idle_timeout(settings.idle)
        .acquire_timeout(settings.timeout)
        .test_before_acquire(false)
        .connect_with(options)
        .await
}

impl IdArray for Postgres {
    type Param = Vec<i64>;

    fn param(ids: &[i64]) -> Vec<i64> {
        ids.to_vec()
    }

    const ROWS: &'static str = "select unnest(${n}::int8[]) as id";
    const INBOX_TABLE: &'static str = "sm_deliveries as d";

    fn announce<'q>(payloads: Vec<String>) -> Query<'q, Postgres, PgArguments> {
        static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let sql = SQL.get_or_init(|| {
            format!(
                "select pg_notify({}, p) from unnest($2::text[]) as p",
                channel_sql(1)
            )
        });
        sqlx::query(sql).bind(CHANGES_CHANNEL).bind(payloads)
    }
}

/// The start of the PostgreSQL channel on which writes announce changed inboxes (see
/// [`Change`]). The channel is this followed by the schema that holds `sm_deliveries` as the
/// connection resolves it (cut to 63 bytes, PostgreSQL's limit): writers and listeners agree
/// whatever their roles and search paths, as long as they use the same tables, and stores in
/// separate schemas of one database, such as the tests', do not hear each other.
///
/// NOTE: `LISTEN` needs a session of its own: behind a pooler in transaction mode (such as
/// PgBouncer's), point the app at PostgreSQL directly, or the feed hears nothing and syncs
/// vouch for nothing.
pub const CHANGES_CHANNEL: &str = "stored_messages_changes:";

/// The changes channel, as SQL, with [`CHANGES_CHANNEL`] in parameter `$n`.
pub(super) fn channel_sql(n: u8) -> String {
    format!(
        "left(${n} || (select relnamespace::regnamespace::text from pg_class \
         where oid = 'sm_deliveries'::regclass), 63)"
    )
}

/// `deliver` of the SQL backend on PostgreSQL: One statement, one round trip: a data-modifying CTE is atomic by itself.
pub(super) async fn deliver(
    pool: &PgPool,
    message: &NewMessage,
    users: &[i64],
    singles: &[i64],
    runs: &[Run],
) -> Result<i64> {
    let sql = format!(
        "with m as (insert into sm_messages (level, message, extra_tags, url, date_us) \
             values ($1, $2, $3, $4, $5) returning id), \
             d as (insert into sm_deliveries (user_id, date_us, message_id, in_inbox) \
             select u, $5, m.id, true from m cross join unnest($6::int8[]) as u), \
             a as (insert into sm_audiences (message_id, bucket, first_user, last_user, date_us) \
             select m.id, r.b, r.f, r.l, $5 from m \
             cross join unnest($9::int8[], $10::int8[], $11::int8[]) as r(b, f, l)) \
             select id, (select string_agg(pg_notify({}, p)::text, '') \
             from unnest($8::text[]) as p) from m",
        channel_sql(7)
    );
    let ids: Vec<i64> = sqlx::query_scalar(&sql)
        .bind(message.level().0)
        .bind(message.message())
        .bind(message.extra_tags())
        .bind(message.url())
        .bind(micros(message.date()))
        .bind(singles)
        .bind(CHANGES_CHANNEL)
        .bind(Change::payloads(users))
        .bind(runs.iter().map(|r| r.bucket).collect::<Vec<_>>())
        .bind(runs.iter().map(|r| r.first).collect::<Vec<_>>())
        .bind(runs.iter().map(|r| r.last).collect::<Vec<_>>())
        .fetch_all(pool)
        .await
        .map_err(sql_error)?;
    returned_id(ids)
}

/// A message of one of several inboxes, as `inbox_list_many` reads them.
#[derive(sqlx::FromRow)]
struct InboxRow {
    ord: i64,
    #[sqlx(flatten)]
    message: MessageRow,
}

/// `inbox_list_many` of the SQL backend on PostgreSQL: the query of `inbox_list` once per
/// user inside one statement (a lateral join over the ids), so a thousand inboxes cost one
/// round trip.
pub(super) async fn inbox_list_many(
    pool: &PgPool,
    users: &[UserId],
    limit: u32,
    cutoff: i64,
) -> Result<Vec<Vec<Message>>> {
    let sql = format!(
        "select u.ord, x.* from unnest($1::int8[]) with ordinality as u(id, ord) \
         cross join lateral ( \
         select * from (select {MESSAGE_COLUMNS} from sm_deliveries d \
         join sm_messages m on m.id = d.message_id \
         where d.user_id = u.id and d.in_inbox and d.date_us >= $2 \
         order by d.date_us, d.message_id limit $3) as own \
         union all \
         select * from (select {MESSAGE_COLUMNS} from sm_audiences a \
         join sm_messages m on m.id = a.message_id \
         where a.bucket = u.id >> {BUCKET_BITS} and a.first_user <= u.id and a.last_user >= u.id \
         and a.date_us >= $2 and not exists (select 1 from sm_deliveries r \
         where r.user_id = u.id and r.date_us = a.date_us and r.message_id = a.message_id) \
         order by a.date_us, a.message_id limit $3) as runs \
         order by date_us, id limit $3) as x \
         order by u.ord, x.date_us, x.id"
    );
    let ids: Vec<i64> = users.iter().map(|u| u.0).collect();
    let rows: Vec<InboxRow> = sqlx::query_as(&sql)
        .bind(&ids)
        .bind(cutoff)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await
        .map_err(sql_error)?;
    let mut lists: Vec<Vec<Message>> = users.iter().map(|_| Vec::new()).collect();
    for row in rows {
        // `ord` counts from 1, in the order of `users`.
        if let Some(list) = usize::try_from(row.ord - 1)
            .ok()
            .and_then(|i| lists.get_mut(i))
        {
            list.push(Message::from(row.message));
        }
    }
    Ok(lists)
}

/// PostgreSQL's change feed: `LISTEN` on the changes channel (see [`CHANGES_CHANNEL`]), on
/// two connections of its own. Every write that changes inboxes notifies in its own
/// transaction, so a notification arrives exactly when the change is visible.
///
/// - The *listener* waits for notifications and reports each one.
/// - The *sync connection* listens too, but only ever sends a bare `Sync` message, for a
///   sync. Whatever asked for it, PostgreSQL sends an idle listening session every
///   notification it has pending before its `ReadyForQuery` (see `PostgresMain`, where it
///   processes a pending notify interrupt just before `ReadyForQuery`), and a writer has
///   signalled every listener before its commit returns. So once the `ReadyForQuery`
///   arrives, every change committed before the `Sync` was sent is in that connection's
///   buffer, and is applied before the sync is reported done. A sync thus costs one round
///   trip with no statement at all: nothing to parse, no transaction to begin or end.
///
/// Both connections' `application_name` ends in `(change feed)`, so operators (and the
/// tests) can find them in `pg_stat_activity`. Losing either one is losing the feed.
pub(super) async fn watch(pool: &PgPool, sink: &FeedSink) {
    use rocket::futures::StreamExt;
    use sqlx::postgres::PgListener;
    loop {
        // A pool of its own, new for each connection: the feed holds its two connections
        // for good and must not take them from the pool that serves requests, and a
        // connection that hung must not be handed back to the next attempt.
        let own = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with((*pool.connect_options()).clone());
        let listen = || async {
            let mut listener = PgListener::connect_with(&own).await?;
            // A lost connection is reported, never silently replaced.
            listener.eager_reconnect(false);
            let channel: String = sqlx::query_scalar(&format!(
                "select {}, set_config('application_name', \
                 left(current_setting('application_name'), 40) || ' (change feed)', false)",
                channel_sql(1)
            ))
            .bind(CHANGES_CHANNEL)
            .fetch_one(&mut listener)
            .await?;
            listener.listen(&channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let connecting = || async { Ok((listen().await?, listen().await?)) };
        let Some((listener, mut syncer)) =
            connect_feed(sink, || pool.is_closed(), connecting).await
        else {
            return;
        };
        // The listener lives inside the stream, so waiting for the next notification in a
        // `select!` never drops a half-read one. The stream ends when the connection does.
        let mut notifications = Box::pin(rocket::futures::stream::unfold(
            Some(listener),
            |listener| async move {
                let mut listener = listener?;
                match listener.try_recv().await {
                    Ok(Some(notification)) => Some((notification, Some(listener))),
                    Ok(None) | Err(_) => None,
                }
            },
        ));
        // The sync connection hears every notification too, and reads them only when it
        // makes a round trip: it does so at least this often, so PostgreSQL never has to
        // hold notifications for it (a session that stops reading pins the notification
        // queue for every session).
        let mut drain = rocket::tokio::time::interval(SYNC_DRAIN);
        drain.set_missed_tick_behavior(rocket::tokio::time::MissedTickBehavior::Delay);
        // Every write that notifies waits COMMIT_WAIT after its commit (SqlBackend::settle).
        sink.writers_wait();
        sink.live();
        loop {
            let sync = rocket::tokio::select! {
                _ = sink.closed() => return,
                received = notifications.next() => match received {
                    Some(notification) => {
                        sink.changed(Change::parse(notification.payload()));
                        continue;
                    }
                    None => {
                        log::warn!("stored-messages: change feed down, lost the PostgreSQL listener");
                        sink.lost();
                        break;
                    }
                },
                _ = drain.tick() => None,
                wanted = sink.wanted() => match wanted {
                    Wanted::Sync(n) => Some(n),
                    Wanted::Reconnect => {
                        sink.lost();
                        break;
                    }
                },
            };
            // Bounded: a connection that stopped answering is dropped, not waited for.
            match rocket::tokio::time::timeout(SYNC_TIMEOUT, round_trip(&mut syncer)).await {
                Ok(Ok(())) => {}
                failed => {
                    if let Ok(Err(e)) = failed {
                        log::warn!("stored-messages: change feed down, a sync failed: {e}");
                    } else {
                        log::warn!("stored-messages: change feed down, a sync got no answer");
                    }
                    sink.lost();
                    break;
                }
            }
            while let Some(notification) = syncer.next_buffered() {
                sink.caught_up(Change::parse(notification.payload()));
            }
            if let Some(n) = sync {
                sink.synced(n);
            }
        }
    }
}

/// How often PostgreSQL's sync connection reads its notifications when no sync asks it to.
const SYNC_DRAIN: Duration = Duration::from_secs(1);

/// Sends `connection` a bare `Sync` message and waits for its `ReadyForQuery` (sqlx's
/// `ping`): the cheapest round trip there is, with no statement to parse and no transaction
/// to start or end. PostgreSQL sends pending notifications before any `ReadyForQuery` of an
/// idle session, whatever the message that asked for it (see [`watch`]).
fn round_trip(
    connection: &mut sqlx::postgres::PgListener,
) -> rocket::futures::future::BoxFuture<'_, Result<(), sqlx::Error>> {
    use sqlx::{Acquire, Connection};
    Box::pin(async move { connection.acquire().await?.ping().await })
}
