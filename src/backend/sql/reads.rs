//! Connections for the hottest one-statement reads, reused without sqlx's check on return.
//!
//! sqlx's pool pings every connection handed back to it before anyone may take it again:
//! on PostgreSQL a round trip to the server, on SQLite a hop to the connection's worker
//! thread and back. For a read of a few rows (a session, a page of an inbox) that check
//! costs as much as the query. [`SqlReads`] keeps a few connections taken out of the pool
//! and hands them back only after a statement *completed*: a read interrupted half way (its
//! request went away) or failed drops its connection instead, which is what the ping
//! guards against. Writes and transactions keep going through the pool.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

use sqlx::{Database, Pool};

use super::SqlPool;

/// How many connections each [`SqlReads`] holds at most (beyond the pool's own); a read
/// beyond waits for one.
const KEEP: usize = 4;

/// A few connections of a pool, reused for single-statement reads (see the module docs).
/// Built from a [`SqlPool`]; use it through [`Reuse::lease`] per dialect.
#[derive(Debug)]
pub enum SqlReads {
    /// Connections of a SQLite pool.
    #[cfg(feature = "sqlite")]
    Sqlite(Reuse<sqlx::Sqlite>),
    /// Connections of a PostgreSQL pool.
    #[cfg(feature = "postgres")]
    Postgres(Reuse<sqlx::Postgres>),
}

impl SqlReads {
    /// Reuses connections of `pool`.
    pub fn new(pool: &SqlPool) -> SqlReads {
        match pool {
            #[cfg(feature = "sqlite")]
            SqlPool::Sqlite(pool) => SqlReads::Sqlite(Reuse::new(pool.clone())),
            #[cfg(feature = "postgres")]
            SqlPool::Postgres(pool) => SqlReads::Postgres(Reuse::new(pool.clone())),
        }
    }
}

/// Connections of one pool's database, at most four at a time (`KEEP`).
pub struct Reuse<DB: Database> {
    pool: Pool<DB>,
    idle: Mutex<Vec<DB::Connection>>,
    permits: rocket::tokio::sync::Semaphore,
}

impl<DB: Database> std::fmt::Debug for Reuse<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reuse")
            .field("idle", &self.idle().len())
            .finish_non_exhaustive()
    }
}

impl<DB: Database> Reuse<DB> {
    fn new(pool: Pool<DB>) -> Reuse<DB> {
        Reuse {
            pool,
            idle: Mutex::new(Vec::with_capacity(KEEP)),
            permits: rocket::tokio::sync::Semaphore::new(KEEP),
        }
    }

    /// The pool the connections come from.
    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<DB::Connection>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle connection, or one taken out of the pool.
    ///
    /// # Errors
    ///
    /// The pool's, when it has no connection to give.
    pub async fn lease(&self) -> Result<Lease<'_, DB>, sqlx::Error> {
        use sqlx::ConnectOptions;
        if self.pool.is_closed() {
            return Err(sqlx::Error::PoolClosed);
        }
        let permit = rocket::tokio::time::timeout(
            self.pool.options().get_acquire_timeout(),
            self.permits.acquire(),
        )
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)?
        .map_err(|_| sqlx::Error::PoolClosed)?;
        let idle = self.idle().pop();
        let connection = match idle {
            Some(connection) => connection,
            None => self.pool.connect_options().connect().await?,
        };
        Ok(Lease {
            connection: Some(connection),
            home: self,
            _permit: permit,
        })
    }
}

/// A connection for one read. [`Lease::done`] after the statement completed gives it back;
/// dropped without that (an error, a cancelled request), it is closed.
pub struct Lease<'a, DB: Database> {
    connection: Option<DB::Connection>,
    home: &'a Reuse<DB>,
    _permit: rocket::tokio::sync::SemaphorePermit<'a>,
}

impl<DB: Database> Lease<'_, DB> {
    /// The statement completed: the connection may serve the next read.
    pub fn done(mut self) {
        if let Some(connection) = self.connection.take() {
            if self.home.pool.is_closed() {
                return;
            }
            self.home.idle().push(connection);
        }
    }
}

impl<DB: Database> Deref for Lease<'_, DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &DB::Connection {
        self.connection
            .as_ref()
            .expect("a lease holds its connection until it is done")
    }
}

impl<DB: Database> DerefMut for Lease<'_, DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        self.connection
            .as_mut()
            .expect("a lease holds its connection until it is done")
    }
}

/// Runs `$body` with `$conn` bound to a leased connection (`&mut` the dialect's connection)
/// of `$reads` (a [`SqlReads`]) and `$pool` to its pool (for the dialect's helpers); the
/// connection goes back for reuse only if `$body` completed (an early return through `?`
/// closes it). `$err` maps the lease's `sqlx::Error`.
macro_rules! with_read {
    ($reads:expr, $err:expr, $pool:ident, $conn:ident => $body:expr) => {
        match $reads {
            #[cfg(feature = "sqlite")]
            $crate::backend::sql::SqlReads::Sqlite(reuse) => {
                let $pool = reuse.pool();
                let mut lease = reuse.lease().await.map_err($err)?;
                let $conn = &mut *lease;
                let out = $body;
                lease.done();
                out
            }
            #[cfg(feature = "postgres")]
            $crate::backend::sql::SqlReads::Postgres(reuse) => {
                let $pool = reuse.pool();
                let mut lease = reuse.lease().await.map_err($err)?;
                let $conn = &mut *lease;
                let out = $body;
                lease.done();
                out
            }
        }
    };
}
