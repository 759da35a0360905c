//! [`BackendError`]: failures of the storage itself. A leaf module (it imports nothing of
//! the crate), wrapped by the crate's [`crate::Error::Backend`].

/// A boxed error from code the library does not own (a host's user directory, a custom
/// backend).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A failure of the storage itself (as opposed to a missing message or bad input).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// SQLite or PostgreSQL failed.
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    #[error("database error")]
    Sql(#[from] sqlx::Error),
    /// A migration could not be applied.
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Redis failed.
    #[cfg(feature = "redis")]
    #[error("redis error")]
    Redis(#[from] ::redis::RedisError),
    /// Redis could not be reached when connecting (the url is shown without its password).
    #[cfg(feature = "redis")]
    #[error("cannot connect to redis at {url}")]
    RedisConnect {
        /// The server's url, redacted.
        url: String,
        /// Why the connection failed.
        #[source]
        source: ::redis::RedisError,
    },
    /// The configuration names a backend this build leaves out: the host did not turn on
    /// its Cargo feature.
    #[error(
        "this build has no {what} support: turn on the `{feature}` feature of stored-messages"
    )]
    NotCompiled {
        /// The backend or database named.
        what: &'static str,
        /// The Cargo feature that adds it.
        feature: &'static str,
    },
    /// The database url names no supported driver.
    #[error("unsupported database url {0} (expected sqlite:// or postgres://)")]
    UnsupportedUrl(String),
    /// A custom backend's own error.
    #[error("storage error")]
    Other(#[source] BoxError),
}

impl BackendError {
    /// Whether the storage is unreachable (answer 503 and retry later) rather than broken.
    pub fn is_unavailable(&self) -> bool {
        match self {
            // SQLSTATE class 08 is a connection exception, 57 an operator intervention (the
            // server is shutting down or restarting): both pass once the server is back.
            #[cfg(any(feature = "sqlite", feature = "postgres"))]
            BackendError::Sql(sqlx::Error::Database(db)) => db
                .code()
                .is_some_and(|code| code.starts_with("08") || code.starts_with("57")),
            #[cfg(any(feature = "sqlite", feature = "postgres"))]
            BackendError::Sql(e) => matches!(
                e,
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::WorkerCrashed
            ),
            #[cfg(feature = "redis")]
            BackendError::Redis(e) | BackendError::RedisConnect { source: e, .. } => {
                e.is_io_error()
                    || e.is_connection_refusal()
                    || e.is_connection_dropped()
                    || e.is_timeout()
                    || matches!(
                        e.kind(),
                        ::redis::ErrorKind::Server(
                            ::redis::ServerErrorKind::BusyLoading
                                | ::redis::ServerErrorKind::TryAgain
                        )
                    )
            }
            _ => false,
        }
    }
}
