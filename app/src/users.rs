//! The reference app's users: a table with argon2 password hashes, and the [`Host`]
//! implementation that tells the library who is logged in and who exists.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use chrono::Utc;
use rand::rngs::OsRng;
use rocket::Request;

use stored_messages::backend::micros;
use stored_messages::backend::sql::{run_migrations, SqlPool};
use stored_messages::backend::BackendError;
use stored_messages::Host;
use stored_messages::UserId;
use stored_messages::{BoxError, Error, Printable};
use stored_messages::{Change, ChangeFeed, Store};

use crate::sessions::SessionCache;

/// The private cookie holding the logged-in user's id.
pub const SESSION_COOKIE: &str = "sm_session";
/// Longest username accepted.
pub const MAX_USERNAME_CHARS: usize = 64;
/// Shortest password accepted.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest password accepted (the login form takes no more).
pub const MAX_PASSWORD_CHARS: usize = 1024;

/// Passwords refused whatever their length: the most common ones.
const COMMON_PASSWORDS: &[&str] = &[
    "password",
    "password1",
    "password12",
    "password123",
    "passw0rd",
    "12345678",
    "123456789",
    "1234567890",
    "11111111",
    "00000000",
    "87654321",
    "qwertyui",
    "qwertyuiop",
    "qwerty123",
    "iloveyou",
    "abcdefgh",
    "abc12345",
    "letmein1",
    "welcome1",
    "admin123",
    "sunshine",
    "football",
    "baseball",
    "princess",
    "superman",
    "trustno1",
    "changeme",
];

/// Why a user could not be created or found.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// Bad username.
    #[error(
        "invalid username \"{}\": use 1 to 64 ASCII letters, digits, '.', '_', '-' or '@' \
         (letters are lowercased)",
        Printable(.0)
    )]
    InvalidUsername(String),
    /// Password too short.
    #[error("password is too short: at least {MIN_PASSWORD_CHARS} characters")]
    PasswordTooShort,
    /// Password too long to be typed into the login form.
    #[error("password is too long: at most {MAX_PASSWORD_CHARS} characters")]
    PasswordTooLong,
    /// Password easy to guess.
    #[error("password is too easy to guess: {0}")]
    PasswordTooWeak(&'static str),
    /// Username taken.
    #[error("user \"{}\" already exists", Printable(.0))]
    Exists(String),
    /// Usernames that do not exist.
    #[error(transparent)]
    Unknown(Error),
    /// Hashing failed.
    #[error("password hashing failed: {0}")]
    Hash(String),
    /// The database failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Sessions ended, but other processes could not be told at once (the store's change
    /// feed did not take the announcement). The announcement is retried in the background,
    /// and no instance accepts the sessions after [`crate::sessions::MAX_ENTRY_AGE`] anyway.
    #[error("sessions ended, but other instances could not be told yet (they drop them within a minute): {0}")]
    Announce(Error),
}

impl From<sqlx::Error> for UserError {
    fn from(e: sqlx::Error) -> UserError {
        UserError::Backend(BackendError::Sql(e))
    }
}

/// A user of the reference app.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct User {
    /// Id, as the library knows it.
    pub id: i64,
    /// Unique name.
    pub username: String,
    /// May use `/admin`.
    pub is_admin: bool,
}

impl User {
    /// The id as the library's type.
    pub fn user_id(&self) -> UserId {
        UserId(self.id)
    }
}

/// The users table.
#[derive(Debug, Clone)]
pub struct Users {
    pool: SqlPool,
    /// For the session lookup of every request: connections reused without sqlx's ping.
    reads: std::sync::Arc<stored_messages::backend::SqlReads>,
    /// The store's change feed, on which ending sessions is announced to every process (see
    /// [`Users::announce_on`]).
    feed: Arc<std::sync::OnceLock<ChangeFeed>>,
    /// Sessions kept in memory (see [`Users::cache_sessions`]).
    sessions: Arc<std::sync::OnceLock<Arc<SessionCache>>>,
}

/// Checks a username: 1–64 characters of letters, digits, `.`, `_`, `-`, `@`.
pub fn check_username(name: &str) -> Result<(), UserError> {
    normalize_username(name).map(|_| ())
}

/// The one spelling of a username: ASCII letters lowercased, digits, `.`, `_`, `-`, `@`.
/// Usernames are compared in this form, so `Alice` is `alice`; letters outside ASCII
/// (Cyrillic `а`, fullwidth `ａ`) are refused, since they can look like ASCII ones.
///
/// # Errors
///
/// [`UserError::InvalidUsername`] for anything else, or more than 64 characters.
pub fn normalize_username(name: &str) -> Result<String, UserError> {
    let name = name.trim();
    let ok = !name.is_empty()
        && name.len() <= MAX_USERNAME_CHARS
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'));
    if ok {
        Ok(name.to_ascii_lowercase())
    } else {
        Err(UserError::InvalidUsername(name.to_string()))
    }
}

/// The name to look an account up by: its one spelling, or for an account created before
/// names had one (mixed case, non-ASCII letters), the name as typed; lookups compare
/// without case and prefer an exact match.
fn lookup_name(typed: &str) -> String {
    normalize_username(typed).unwrap_or_else(|_| typed.trim().to_string())
}

/// Recipients as typed (in any case, maybe repeated): each name once, in its one spelling
/// where it has one (`ALICE` is `alice`), in the order given. So a recipient typed twice
/// is counted, audited and shown once.
pub fn recipient_names<'a>(typed: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    typed
        .into_iter()
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(lookup_name)
        .filter(|name| seen.insert(name.clone()))
        .collect()
}

/// Whether `password` may be `username`'s: 8 to 1,024 characters, not only spaces, not the
/// username, not one of the most common passwords.
///
/// # Errors
///
/// [`UserError::PasswordTooShort`], [`UserError::PasswordTooLong`] or
/// [`UserError::PasswordTooWeak`], saying why.
pub fn check_password(username: &str, password: &str) -> Result<(), UserError> {
    let length = password.chars().count();
    if length < MIN_PASSWORD_CHARS {
        return Err(UserError::PasswordTooShort);
    }
    if length > MAX_PASSWORD_CHARS {
        return Err(UserError::PasswordTooLong);
    }
    if password.trim().is_empty() {
        return Err(UserError::PasswordTooWeak("it is only spaces"));
    }
    let lowered = password.to_lowercase();
    if lowered == username.to_lowercase() {
        return Err(UserError::PasswordTooWeak("it is the username"));
    }
    if COMMON_PASSWORDS.contains(&lowered.as_str())
        || lowered.chars().all(|c| lowered.starts_with(c))
    {
        return Err(UserError::PasswordTooWeak(
            "it is one of the most common passwords",
        ));
    }
    Ok(())
}

/// An argon2id hash of `password` in PHC form.
pub fn hash_password(password: &str) -> Result<String, UserError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| UserError::Hash(e.to_string()))
}

fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

impl Users {
    /// Uses `pool` (already migrated with [`Users::migrate`]).
    pub fn new(pool: SqlPool) -> Users {
        let reads = std::sync::Arc::new(stored_messages::backend::SqlReads::new(&pool));
        Users {
            pool,
            reads,
            feed: Arc::default(),
            sessions: Arc::default(),
        }
    }

    /// Announces every ending of sessions on `feed` (the store's change feed, started or
    /// not: [`Store::change_announcer`]), so that session caches in every process drop them
    /// before the ending returns. Every process that ends sessions while servers with a
    /// session cache run must call this (the app and the CLI do). Later calls do nothing.
    pub fn announce_on(&self, feed: ChangeFeed) {
        let _ = self.feed.set(feed);
    }

    /// Keeps sessions in memory, current through `store`'s change feed (which this starts;
    /// see [`crate::sessions`]), and announces on it. Later calls do nothing.
    pub fn cache_sessions(&self, store: &Store) {
        let feed = store.changes().clone();
        self.announce_on(feed.clone());
        let _ = self.sessions.set(SessionCache::new(feed));
    }

    /// The session cache, when there is one.
    pub fn session_cache(&self) -> Option<&SessionCache> {
        self.sessions.get().map(|c| &**c)
    }

    /// Tells every process that `user`'s sessions changed (see [`Users::announce_on`]): this
    /// one at once, the others through the feed. A store without a change feed has no
    /// session caches to tell.
    ///
    /// When the announcement fails, the sessions are already gone from the database, and
    /// only caches filled before that still hold them, for at most
    /// [`crate::sessions::MAX_ENTRY_AGE`]. The announcement is then retried in the
    /// background until it goes through or that age has passed (after which no cache can
    /// hold the sessions any more), and the caller gets [`UserError::Announce`].
    async fn sessions_ended(&self, user: i64) -> Result<(), UserError> {
        if let Some(cache) = self.sessions.get() {
            cache.forget_user(user);
        }
        let Some(feed) = self.feed.get() else {
            return Ok(());
        };
        let change = Change::users(&[UserId(user)]);
        match feed.announce(&change).await {
            Ok(()) | Err(Error::Unsupported(_)) => Ok(()),
            Err(e) => {
                let until = std::time::Instant::now() + crate::sessions::MAX_ENTRY_AGE;
                rocket::tokio::spawn(retry_announce(feed.clone(), change, until));
                Err(UserError::Announce(e))
            }
        }
    }

    /// Applies the app's migrations (`migrations/…`).
    pub async fn migrate(&self) -> Result<(), BackendError> {
        run_migrations(
            &self.pool,
            sqlx::migrate!("migrations/sqlite"),
            sqlx::migrate!("migrations/postgres"),
        )
        .await
    }

    /// The pool.
    pub fn pool(&self) -> &SqlPool {
        &self.pool
    }

    /// Creates a user.
    pub async fn create(
        &self,
        username: &str,
        password: &str,
        is_admin: bool,
    ) -> Result<User, UserError> {
        let username = normalize_username(username)?;
        check_password(&username, password)?;
        // An account from before names had one spelling (`Alice`) holds this name too.
        if self.by_name(&username).await?.is_some() {
            return Err(UserError::Exists(username));
        }
        let hash = hash_password(password)?;
        self.insert_hashed(&username, &hash, is_admin).await
    }

    /// Creates a user from an existing password hash (bulk seeding, imports).
    pub async fn insert_hashed(
        &self,
        username: &str,
        hash: &str,
        is_admin: bool,
    ) -> Result<User, UserError> {
        let username = &normalize_username(username)?;
        let sql = "insert into app_users (username, password_hash, is_admin, created_us) \
                   values ($1, $2, $3, $4) on conflict (username) do nothing \
                   returning id, username, is_admin";
        // fetch_all, not fetch_optional: see `returned_id` in the SQL backend.
        let user: Vec<User> = with_pool!(&self.pool, pool => sqlx::query_as(sql)
            .bind(username)
            .bind(hash)
            .bind(is_admin)
            .bind(micros(Utc::now()))
            .fetch_all(pool)
            .await?);
        user.into_iter()
            .next()
            .ok_or_else(|| UserError::Exists(username.to_string()))
    }

    /// Whether the database answers (`select 1`): the readiness check.
    pub async fn ping(&self) -> Result<(), UserError> {
        with_pool!(&self.pool, pool => { sqlx::query("select 1").execute(pool).await?; });
        Ok(())
    }

    /// The user called `username`.
    pub async fn by_name(&self, username: &str) -> Result<Option<User>, UserError> {
        let username = lookup_name(username);
        let sql = "select id, username, is_admin from app_users \
                   where lower(username) = lower($1) order by username = $1 desc limit 1";
        Ok(
            with_pool!(&self.pool, pool => sqlx::query_as(sql).bind(username).fetch_optional(pool).await?),
        )
    }

    /// The user with this id.
    pub async fn by_id(&self, id: UserId) -> Result<Option<User>, UserError> {
        let sql = "select id, username, is_admin from app_users where id = $1";
        Ok(
            with_pool!(&self.pool, pool => sqlx::query_as(sql).bind(id.0).fetch_optional(pool).await?),
        )
    }

    /// The user if `password` is theirs. Unknown users cost a hash verification too, so
    /// timing does not tell which usernames exist.
    pub async fn verify(&self, username: &str, password: &str) -> Result<Option<User>, UserError> {
        let sql = "select id, username, is_admin, password_hash from app_users \
                   where lower(username) = lower($1) order by username = $1 desc limit 1";
        // Unknown names still cost a hash check (the dummy below), so timing tells nothing.
        let username = lookup_name(username);
        let row: Option<(i64, String, bool, String)> = with_pool!(&self.pool, pool => sqlx::query_as(sql).bind(&username).fetch_optional(pool).await?);
        let password = password.to_string();
        let checked = rocket::tokio::task::spawn_blocking(move || match row {
            Some((id, username, is_admin, hash)) => {
                verify_password(&password, &hash).then_some(User {
                    id,
                    username,
                    is_admin,
                })
            }
            None => {
                let _ = verify_password(&password, DUMMY_HASH);
                None
            }
        })
        .await
        .map_err(|e| UserError::Hash(e.to_string()))?;
        Ok(checked)
    }

    /// Starts a session for `user` lasting `lifetime`, and returns its id (144 random bits,
    /// for the private session cookie). Expired sessions are dropped on the way.
    pub async fn start_session(&self, user: i64, lifetime: Duration) -> Result<String, UserError> {
        let id = random_password();
        let now = Utc::now();
        let expires =
            now + chrono::Duration::from_std(lifetime).unwrap_or(chrono::Duration::days(14));
        with_pool!(&self.pool, pool => {
            sqlx::query("delete from app_sessions where expires_us <= $1")
                .bind(micros(now))
                .execute(pool)
                .await?;
            sqlx::query(
                "insert into app_sessions (id, user_id, created_us, expires_us) values ($1, $2, $3, $4)",
            )
            .bind(&id)
            .bind(user)
            .bind(micros(now))
            .bind(micros(expires))
            .execute(pool)
            .await?;
        });
        Ok(id)
    }

    /// The user of session `id`, unless it ended or expired.
    pub async fn session_user(&self, id: &str) -> Result<Option<User>, UserError> {
        self.session_user_since(id, std::time::Instant::now()).await
    }

    /// [`Users::session_user`] for a request that began at `since`
    /// ([`stored_messages::request_start`]): it must see every session ended before then,
    /// and may share the change feed's sync with the request's other reads.
    pub async fn session_user_since(
        &self,
        id: &str,
        since: std::time::Instant,
    ) -> Result<Option<User>, UserError> {
        Ok(self
            .sessions_users_since(&[id], since)
            .await?
            .pop()
            .flatten())
    }

    /// [`Users::session_user_since`] for many sessions at once, one answer per id in their
    /// order: the cache first, then one query per 500 sessions it could not vouch for (after
    /// a broadcast, every live stream checks its session, and the broadcast emptied the
    /// cache).
    pub async fn sessions_users_since(
        &self,
        ids: &[&str],
        since: std::time::Instant,
    ) -> Result<Vec<Option<User>>, UserError> {
        let now = micros(Utc::now());
        let cache = self.sessions.get();
        let mut found: Vec<Option<User>> = vec![None; ids.len()];
        let mut missing: Vec<usize> = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            match cache {
                Some(cache) => match cache.get(id, now, since).await {
                    Some(user) => found[i] = Some(user),
                    None => missing.push(i),
                },
                None => missing.push(i),
            }
        }
        for chunk in missing.chunks(500) {
            let before = cache.map(|c| c.generations());
            let list: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 2)).collect();
            let sql = format!(
                "select s.id, u.id, u.username, u.is_admin, s.expires_us from app_sessions s \
                 join app_users u on u.id = s.user_id where s.expires_us > $1 and s.id in ({})",
                list.join(", ")
            );
            let rows: Vec<(String, i64, String, bool, i64)> = with_read!(&*self.reads, conn => {
                let mut query = sqlx::query_as(&sql).bind(now);
                for &i in chunk {
                    query = query.bind(ids[i]);
                }
                query.fetch_all(conn).await?
            });
            let rows: HashMap<String, (User, i64)> = rows
                .into_iter()
                .map(|(session, id, username, is_admin, expires_us)| {
                    let user = User {
                        id,
                        username,
                        is_admin,
                    };
                    (session, (user, expires_us))
                })
                .collect();
            for &i in chunk {
                // A session may be asked for twice (two streams of one session).
                if let Some((user, expires_us)) = rows.get(ids[i]) {
                    if let (Some(cache), Some(before)) = (cache, &before) {
                        cache.put(ids[i], user, *expires_us, before);
                    }
                    found[i] = Some(user.clone());
                }
            }
        }
        Ok(found)
    }

    /// Sets `user`'s password (checked as for a new user) and ends all of their sessions, on
    /// every instance: whoever knew the old password is logged out. Returns how many sessions
    /// ended.
    pub async fn set_password(&self, user: &User, password: &str) -> Result<u64, UserError> {
        self.change_password(user, password, None).await
    }

    /// Sets `user`'s password and ends every session of theirs but `keep` (the one that
    /// changed it), on every instance at once; returns how many sessions ended.
    ///
    /// # Errors
    ///
    /// A password that [`check_password`] refuses, or a database error.
    pub async fn change_password(
        &self,
        user: &User,
        password: &str,
        keep: Option<&str>,
    ) -> Result<u64, UserError> {
        check_password(&user.username, password)?;
        let hash = hash_password(password)?;
        with_pool!(&self.pool, pool => {
            sqlx::query("update app_users set password_hash = $1 where id = $2")
                .bind(&hash)
                .bind(user.id)
                .execute(pool)
                .await?;
        });
        match keep {
            None => self.end_sessions(user.id).await,
            Some(keep) => {
                let ended = with_pool!(&self.pool, pool => sqlx::query(
                        "delete from app_sessions where user_id = $1 and id <> $2",
                    )
                    .bind(user.id)
                    .bind(keep)
                    .execute(pool)
                    .await?
                    .rows_affected());
                self.sessions_ended(user.id).await?;
                Ok(ended)
            }
        }
    }

    /// Ends session `id` of `user` (logout), on every instance at once. Announced even when
    /// the session was already gone: repeating a logout whose announcement failed, or
    /// racing another logout of the same session, still returns only once every instance
    /// has been told.
    pub async fn end_session(&self, id: &str, user: i64) -> Result<(), UserError> {
        with_pool!(&self.pool, pool => {
            sqlx::query("delete from app_sessions where id = $1 and user_id = $2")
                .bind(id)
                .bind(user)
                .execute(pool)
                .await?;
        });
        self.sessions_ended(user).await
    }

    /// Ends every session of `user`; returns how many there were.
    pub async fn end_sessions(&self, user: i64) -> Result<u64, UserError> {
        let ended = with_pool!(&self.pool, pool => sqlx::query("delete from app_sessions where user_id = $1")
            .bind(user)
            .execute(pool)
            .await?
            .rows_affected());
        self.sessions_ended(user).await?;
        Ok(ended)
    }

    /// The ids of these usernames, in the same order.
    ///
    /// # Errors
    ///
    /// [`UserError::Unknown`] naming every username that does not exist.
    pub async fn ids_by_names(&self, names: &[String]) -> Result<Vec<UserId>, UserError> {
        let mut ids = Vec::with_capacity(names.len());
        let mut seen = std::collections::HashSet::new();
        let mut unknown = Vec::new();
        for name in names {
            match self.by_name(name).await? {
                // Two spellings of one user are one recipient.
                Some(user) => {
                    if seen.insert(user.id) {
                        ids.push(user.user_id());
                    }
                }
                None => unknown.push(name.clone()),
            }
        }
        if unknown.is_empty() {
            Ok(ids)
        } else {
            Err(UserError::Unknown(Error::UnknownUsers(unknown)))
        }
    }

    /// Every user id.
    pub async fn all_ids(&self) -> Result<Vec<UserId>, UserError> {
        let ids: Vec<i64> = with_pool!(&self.pool, pool =>
            sqlx::query_scalar("select id from app_users order by id").fetch_all(pool).await?);
        Ok(ids.into_iter().map(UserId).collect())
    }

    /// How many users exist.
    pub async fn count(&self) -> Result<i64, UserError> {
        Ok(with_pool!(&self.pool, pool =>
            sqlx::query_scalar("select count(*) from app_users").fetch_one(pool).await?))
    }
}

/// A valid argon2 hash of a random password, verified against when a username is unknown.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$2ptDXN6Rvc5wztu4zpPtc5o1Vn2ipZZd8gUZGmaAJUk";

/// The reference app as a [`Host`]: the session cookie says who is logged in, the users
/// table says who exists.
#[derive(Debug, Clone)]
pub struct AppHost {
    users: Arc<Users>,
}

impl AppHost {
    /// A host over this users table.
    pub fn new(users: Arc<Users>) -> AppHost {
        AppHost { users }
    }
}

#[rocket::async_trait]
impl Host for AppHost {
    async fn current_user(&self, request: &Request<'_>) -> Option<UserId> {
        // The same request-local copy as the `CurrentUser` guard: one lookup per request.
        crate::auth::request_session(request)
            .await
            .map(User::user_id)
    }

    /// A session the users database cannot read is not an anonymous visitor: the library
    /// answers 503 for it.
    async fn try_current_user(&self, request: &Request<'_>) -> Result<Option<UserId>, BoxError> {
        Ok(crate::auth::request_session_checked(request)
            .await?
            .map(User::user_id))
    }

    async fn all_users(&self) -> Result<Vec<UserId>, BoxError> {
        Ok(self.users.all_ids().await?)
    }

    /// A digest of the session id (the CSRF cookie need not hold the session's secret), for
    /// a session that is live; `None` otherwise.
    async fn session_key(&self, request: &Request<'_>) -> Option<String> {
        use base64::Engine as _;
        use sha2::Digest as _;
        let id = crate::auth::request_session_id(request).await?;
        let digest = sha2::Sha256::digest(id.as_bytes());
        Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..16]))
    }

    /// The session's id: a live stream stays open only while its session does (ending
    /// sessions is announced as a change of the user, which makes the user's streams ask).
    async fn stream_session(&self, request: &Request<'_>) -> Option<String> {
        crate::auth::request_session_id(request)
            .await
            .map(str::to_string)
    }

    /// Looked up as a request's session is (the session cache, current through the change
    /// feed, else the database); a store that does not answer vouches for nothing.
    async fn session_active(&self, user: UserId, session: &str) -> bool {
        match self.users.session_user(session).await {
            Ok(found) => found.is_some_and(|u| u.user_id() == user),
            Err(e) => {
                log::warn!(
                    "reference app: checking the session of a live stream failed: {}",
                    stored_messages::report(&e)
                );
                false
            }
        }
    }

    /// As [`Host::session_active`], with one query per 500 sessions the cache cannot vouch
    /// for.
    async fn sessions_active(&self, sessions: &[(UserId, &str)]) -> Vec<bool> {
        let ids: Vec<&str> = sessions.iter().map(|(_, session)| *session).collect();
        let since = std::time::Instant::now();
        match self.users.sessions_users_since(&ids, since).await {
            Ok(found) => sessions
                .iter()
                .zip(found)
                .map(|((user, _), found)| found.is_some_and(|u| u.user_id() == *user))
                .collect(),
            Err(e) => {
                log::warn!(
                    "reference app: checking the sessions of {} live streams failed: {}",
                    sessions.len(),
                    stored_messages::report(&e)
                );
                vec![false; sessions.len()]
            }
        }
    }
}

/// A random password for the first admin: 18 random bytes, URL-safe base64 (24 characters).
pub fn random_password() -> String {
    use base64::Engine as _;
    use rand::RngCore as _;
    let mut bytes = [0u8; 18];
    OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// What a page adds when sessions ended but announcing it failed ([`UserError::Announce`]):
/// the retry and [`crate::sessions::MAX_ENTRY_AGE`] bound how long other instances lag.
pub const OTHER_SERVERS_WITHIN_A_MINUTE: &str =
    "Other servers of this site could not be told at once; there it takes effect within a minute.";

/// Announces `change` until it goes through or `until` has passed, waiting a little longer
/// after each failure (0.1 s, doubling, at most 2 s apart).
async fn retry_announce(feed: ChangeFeed, change: Change, until: std::time::Instant) {
    let mut pause = Duration::from_millis(100);
    loop {
        let now = std::time::Instant::now();
        if now >= until {
            log::error!(
                "reference app: ending sessions was never announced; other instances dropped them \
                 from their caches by age"
            );
            return;
        }
        rocket::tokio::time::sleep(pause.min(until - now)).await;
        match feed.announce(&change).await {
            Ok(()) | Err(Error::Unsupported(_)) => {
                log::info!("reference app: ending sessions announced after a retry");
                return;
            }
            Err(e) => {
                log::warn!(
                    "reference app: announcing the end of sessions failed again: {}",
                    stored_messages::report(&e)
                );
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use refusing::Refusing;

    mod refusing {
        use chrono::{DateTime, Utc};
        use std::sync::atomic::Ordering;
        use stored_messages::backend::{
            BackendError, Cleanup, FeedSink, ListQuery, MessageBackend, WatchChanges,
        };
        use stored_messages::{
            Change, Error, Level, Message, MessageId, NewMessage, Result, UserId,
        };

        /// A store whose change feed refuses the first `refusals` announcements and counts
        /// them all; it stores nothing (the session tests need only its feed).
        pub(super) struct Refusing {
            pub(super) refusals: u64,
            pub(super) announced: std::sync::atomic::AtomicU64,
        }

        fn nothing<T>() -> Result<T> {
            Err(Error::Unsupported("storing in the test feed"))
        }

        #[rocket::async_trait]
        impl MessageBackend for Refusing {
            fn name(&self) -> &'static str {
                "refusing"
            }
            fn can_handle(&self, _: Level) -> bool {
                false
            }
            async fn create_message(&self, _: &NewMessage) -> Result<Message> {
                nothing()
            }
            async fn archive_store(&self, _: &[UserId], _: &Message) -> Result<u64> {
                nothing()
            }
            async fn inbox_store(&self, _: &[UserId], _: &Message) -> Result<u64> {
                nothing()
            }
            async fn deliver(&self, _: &[UserId], _: &NewMessage) -> Result<Message> {
                nothing()
            }
            async fn inbox_list(&self, _: UserId, _: ListQuery) -> Result<Vec<Message>> {
                nothing()
            }
            async fn inbox_count(&self, _: UserId) -> Result<u64> {
                nothing()
            }
            async fn inbox_get(&self, _: UserId, _: MessageId) -> Result<Message> {
                nothing()
            }
            async fn inbox_delete_many(
                &self,
                _: UserId,
                _: &[MessageId],
            ) -> Result<Vec<MessageId>> {
                nothing()
            }
            async fn inbox_purge(&self, _: UserId) -> Result<u64> {
                nothing()
            }
            async fn archive_list(&self, _: UserId, _: ListQuery) -> Result<Vec<Message>> {
                nothing()
            }
            async fn expired_messages_cleanup(&self, _: DateTime<Utc>) -> Result<Cleanup> {
                nothing()
            }
            async fn flush(&self) -> Result<()> {
                nothing()
            }
            async fn deliver_once(&self, _: &[UserId], _: &Message) -> Result<u64> {
                nothing()
            }
            fn change_feed(&self) -> Option<&dyn WatchChanges> {
                Some(self)
            }
        }

        #[rocket::async_trait]
        impl WatchChanges for Refusing {
            async fn watch_changes(&self, _: FeedSink) -> Result<()> {
                nothing()
            }
            async fn announce(&self, _: &Change) -> Result<()> {
                let n = self.announced.fetch_add(1, Ordering::SeqCst) + 1;
                if n <= self.refusals {
                    Err(Error::Backend(BackendError::Sql(sqlx::Error::PoolTimedOut)))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Users on a fresh SQLite file, announcing on a feed that refuses `refusals` times.
    async fn users_announcing_on(refusals: u64) -> (Users, Arc<Refusing>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("users.db").display()
        );
        let config = rocket_db_pools::Config {
            url,
            min_connections: None,
            max_connections: 2,
            connect_timeout: 5,
            idle_timeout: None,
            extensions: None,
        };
        let users = Users::new(SqlPool::connect_with(&config).await.unwrap());
        users.migrate().await.unwrap();
        let feed = Arc::new(Refusing {
            refusals,
            announced: Default::default(),
        });
        users.announce_on(ChangeFeed::new(feed.clone()));
        (users, feed, dir)
    }

    /// Waits (up to 5 s) until `feed` was asked to announce `n` times.
    async fn wait_for_announcements(feed: &Refusing, n: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while feed.announced.load(std::sync::atomic::Ordering::SeqCst) < n {
            assert!(
                std::time::Instant::now() < deadline,
                "the announcement was not retried"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A logout whose announcement fails has still ended the session; the announcement is
    /// retried until it goes through, without anyone logging out again.
    #[tokio::test]
    async fn a_failed_announcement_of_a_logout_is_retried_until_it_goes_through() {
        use std::sync::atomic::Ordering;
        let (users, feed, _dir) = users_announcing_on(2).await;
        let alice = users
            .create("alice", "correct horse battery", false)
            .await
            .unwrap();
        let session = users
            .start_session(alice.id, Duration::from_secs(60))
            .await
            .unwrap();
        let ended = users.end_session(&session, alice.id).await;
        assert!(matches!(ended, Err(UserError::Announce(_))), "{ended:?}");
        assert_eq!(
            users.session_user(&session).await.unwrap(),
            None,
            "ended all the same"
        );
        wait_for_announcements(&feed, 3).await;
        // Through on the third try: no more after that.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(feed.announced.load(Ordering::SeqCst), 3);
    }

    /// A password change whose announcement fails reports it the same way, and the
    /// announcement is retried too.
    #[tokio::test]
    async fn a_failed_announcement_of_a_password_change_is_retried() {
        let (users, feed, _dir) = users_announcing_on(1).await;
        let bob = users
            .create("bob", "correct horse battery", false)
            .await
            .unwrap();
        let kept = users
            .start_session(bob.id, Duration::from_secs(60))
            .await
            .unwrap();
        let other = users
            .start_session(bob.id, Duration::from_secs(60))
            .await
            .unwrap();
        let changed = users
            .change_password(&bob, "another good passphrase", Some(&kept))
            .await;
        assert!(
            matches!(changed, Err(UserError::Announce(_))),
            "{changed:?}"
        );
        assert_eq!(users.session_user(&other).await.unwrap(), None);
        assert!(users.session_user(&kept).await.unwrap().is_some());
        assert!(users
            .verify("bob", "another good passphrase")
            .await
            .unwrap()
            .is_some());
        wait_for_announcements(&feed, 2).await;
    }

    /// Retrying stops when no cache can hold the sessions any more, even if the feed never
    /// takes the announcement.
    #[tokio::test]
    async fn retrying_an_announcement_stops_at_its_deadline() {
        use std::sync::atomic::Ordering;
        let feed = Arc::new(Refusing {
            refusals: u64::MAX,
            announced: Default::default(),
        });
        let until = std::time::Instant::now() + Duration::from_millis(400);
        let change = Change::users(&[UserId(1)]);
        tokio::time::timeout(
            Duration::from_secs(5),
            retry_announce(ChangeFeed::new(feed.clone()), change, until),
        )
        .await
        .expect("retrying ends at its deadline");
        assert!(std::time::Instant::now() >= until);
        // At 0.1 s, 0.3 s and the deadline at most (fewer on a slow machine), none after.
        let tries = feed.announced.load(Ordering::SeqCst);
        assert!((1..=3).contains(&tries), "{tries} tries");
    }

    #[test]
    fn usernames_have_one_ascii_spelling() {
        assert_eq!(normalize_username(" Alice ").unwrap(), "alice");
        assert!(normalize_username("bob.o'").is_err());
        for confusable in [
            "\u{430}lice",
            "\u{ff41}\u{ff4c}\u{ff49}\u{ff43}\u{ff45}",
            "al ice",
            "",
        ] {
            assert!(normalize_username(confusable).is_err(), "{confusable:?}");
        }
        assert!(normalize_username(&"a".repeat(65)).is_err());
    }

    #[test]
    fn weak_and_overlong_passwords_are_refused() {
        for (password, ok) in [
            ("correct horse battery", true),
            ("password", false),
            ("PassWord123", false),
            ("        ", false),
            ("aaaaaaaaaaaa", false),
            ("alice-smith", false),
            ("short", false),
        ] {
            assert_eq!(
                check_password("alice-smith", password).is_ok(),
                ok,
                "{password:?}"
            );
        }
        assert!(matches!(
            check_password("alice", &"x1".repeat(513)),
            Err(UserError::PasswordTooLong)
        ));
        assert!(check_password("alice", &"x1".repeat(512)).is_ok());
    }

    #[test]
    fn passwords_verify_against_their_hash_only() {
        let hash = hash_password("correct horse").unwrap();
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("wrong horse", &hash));
        assert!(!verify_password("x", "not a hash"));
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
    }

    #[test]
    fn usernames_are_checked() {
        assert!(check_username("alice").is_ok());
        assert!(check_username("a.b-c_d@e").is_ok());
        assert!(check_username("").is_err());
        assert!(check_username("has space").is_err());
        assert!(check_username("<script>").is_err());
        assert!(check_username(&"x".repeat(65)).is_err());
    }
}
