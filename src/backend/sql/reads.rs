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

    /// The longest a read on a leased connection may take, connecting included: the pool's
    /// acquire timeout. A read that takes longer fails (its connection is closed, not
    /// reused), so a store that stopped answering gets a prompt error, never a hung request.
    pub fn read_timeout(&self) -> std::time::Duration {
        self.pool.options().get_acquire_timeout()
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
        let reused = idle.is_some();
        let connection = match idle {
            Some(connection) => connection,
            // Bounded as the pool's own connections are: a server that accepts and then says
            // nothing must not hold the request.
            None => rocket::tokio::time::timeout(
                self.read_timeout(),
                self.pool.connect_options().connect(),
            )
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??,
        };
        Ok(Lease {
            connection: Some(connection),
            reused,
            home: self,
            _permit: permit,
        })
    }

    /// Closes the idle connections: after a read failed on one of them, the others, from
    /// the same time, are likely broken too (the store restarted, the network dropped them).
    fn forget_idle(&self) {
        self.idle().clear();
    }
}

/// A connection for one read. [`Lease::done`] after the statement completed gives it back;
/// dropped without that (an error, a cancelled request), it is closed.
pub struct Lease<'a, DB: Database> {
    connection: Option<DB::Connection>,
    reused: bool,
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

    /// Settles one attempt of a read on this lease, given what it came to (`None`: it took
    /// longer than [`Reuse::read_timeout`]): `Ok(Some(out))` when it completed (the
    /// connection goes back for reuse); `Ok(None)` to try once more, on a new connection,
    /// when it failed on a reused one (reads are idempotent; after the store restarted, the
    /// connections kept idle are broken, and the first requests must not pay for them); the
    /// error otherwise, `timed_out()` for a read that never answered (its connection, and
    /// likely those kept with it, stopped answering: all are closed).
    ///
    /// # Errors
    ///
    /// The read's, or `timed_out()`.
    pub fn settle<T, E>(
        self,
        outcome: Option<Result<T, E>>,
        retried: &mut bool,
        timed_out: impl FnOnce() -> E,
    ) -> Result<Option<T>, E> {
        match outcome {
            Some(Ok(out)) => {
                self.done();
                Ok(Some(out))
            }
            Some(Err(_)) if self.reused && !*retried => {
                let home = self.home;
                drop(self);
                home.forget_idle();
                *retried = true;
                Ok(None)
            }
            Some(Err(e)) => Err(e),
            None => {
                let home = self.home;
                drop(self);
                home.forget_idle();
                Err(timed_out())
            }
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
/// closes it), within [`Reuse::read_timeout`], and a read that failed on a reused connection
/// runs once more (see [`Lease::settle`]). `$err` maps the lease's `sqlx::Error`; `$body`'s
/// `?` returns [`crate::Error`].
macro_rules! with_read {
    ($reads:expr, $err:expr, $pool:ident, $conn:ident => $body:expr) => {
        match $reads {
            #[cfg(feature = "sqlite")]
            $crate::backend::sql::SqlReads::Sqlite(reuse) => {
                with_read!(@lease reuse, $err, $pool, $conn => $body)
            }
            #[cfg(feature = "postgres")]
            $crate::backend::sql::SqlReads::Postgres(reuse) => {
                with_read!(@lease reuse, $err, $pool, $conn => $body)
            }
        }
    };
    (@lease $reuse:ident, $err:expr, $pool:ident, $conn:ident => $body:expr) => {{
        let $pool = $reuse.pool();
        let mut retried = false;
        loop {
            let mut lease = $reuse.lease().await.map_err($err)?;
            let read = async {
                let $conn = &mut *lease;
                Ok::<_, $crate::Error>($body)
            };
            let outcome = rocket::tokio::time::timeout($reuse.read_timeout(), read).await;
            let timed_out = || $err(sqlx::Error::PoolTimedOut);
            if let Some(out) = lease.settle(outcome.ok(), &mut retried, timed_out)? {
                break out;
            }
        }
    }};
}
