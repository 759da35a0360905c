//! Shared test fixtures: per-test backends on real services, a test host, service checks.

/// Stamps out one test per behaviour and backend of the reference app: each behaviour is an
/// async function taking a fresh [`TestApp`] (SQLite, PostgreSQL, or Redis for messages).
macro_rules! app_tests {
    ($($name:ident),* $(,)?) => {
        app_tests!(@backend sqlite, $($name),*);
        app_tests!(@backend postgres, $($name),*);
        app_tests!(@backend redis, $($name),*);
    };
    (@backend $backend:ident, $($name:ident),*) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(app) = crate::common::TestApp::$backend().await {
                        super::$name(&app).await;
                    }
                }
            )*
        }
    };
}

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, OnceLock};

use rand::Rng;
use stored_messages::backend::Settings;
use stored_messages::config::SecretUrl;
use stored_messages::{
    BoxError, Config, Host, MessageBackend, RedisBackend, SqlBackend, Store, UserId,
};

/// Is `STORED_MESSAGES_REQUIRE_SERVICES=1` set (as in CI)?
pub fn services_required() -> bool {
    std::env::var("STORED_MESSAGES_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// `DATABASE_URL`, read at run time, or the local default.
pub fn postgres_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// `REDIS_URL`, read at run time, or the local default.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

/// Skips (returns false, with one line on stderr) or panics when a service is missing.
pub fn service_available(name: &str, reachable: bool) -> bool {
    if reachable {
        return true;
    }
    if services_required() {
        panic!("{name} is required (STORED_MESSAGES_REQUIRE_SERVICES=1) but is not reachable");
    }
    // One line per missing service, however many of its tests skip.
    static WARNED: OnceLock<Mutex<BTreeSet<String>>> = OnceLock::new();
    let mut warned = WARNED.get_or_init(Mutex::default).lock().unwrap();
    if warned.insert(name.to_string()) {
        eprintln!("note: {name} is not reachable; its tests are skipped");
    }
    false
}

/// A random lowercase id for schema names and key prefixes.
pub fn random_id() -> String {
    let mut rng = rand::thread_rng();
    (0..12)
        .map(|_| (b'a' + rng.gen_range(0..26)) as char)
        .collect()
}

/// A PostgreSQL schema of its own, dropped when this value is dropped.
pub struct PgSchema {
    pub name: String,
    pub url: String,
}

impl PgSchema {
    /// Creates a fresh schema; `None` when PostgreSQL is unreachable and not required.
    pub async fn create() -> Option<PgSchema> {
        let base = postgres_url();
        let conn = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(std::time::Duration::from_secs(3))
            .connect(&base)
            .await;
        let pool = match conn {
            Ok(pool) => pool,
            Err(_) => {
                service_available("PostgreSQL (DATABASE_URL)", false);
                return None;
            }
        };
        let name = format!("sm_test_{}", random_id());
        sqlx::query(&format!("create schema {name}"))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options=-c%20search_path%3D{name}");
        Some(PgSchema { name, url })
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        // Drop runs inside or outside a runtime; a thread with its own runtime works in both.
        let name = self.name.clone();
        let base = postgres_url();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(pool) = sqlx::PgPool::connect(&base).await {
                    let _ = sqlx::query(&format!("drop schema if exists {name} cascade"))
                        .execute(&pool)
                        .await;
                    pool.close().await;
                }
            });
        })
        .join();
    }
}

/// A key prefix of its own on the Redis server, whose keys are removed when this value is
/// dropped.
pub struct RedisPrefix {
    pub prefix: String,
    pub url: String,
}

impl RedisPrefix {
    /// A fresh random prefix; `None` when Redis is unreachable and not required.
    pub fn create() -> Option<RedisPrefix> {
        let url = redis_url();
        if !service_available("Redis (REDIS_URL)", redis_reachable(&url)) {
            return None;
        }
        Some(RedisPrefix {
            prefix: format!("sm_test_{}:", random_id()),
            url,
        })
    }

    /// Every key under the prefix, found with `SCAN`.
    pub fn keys(&self) -> Vec<String> {
        let mut connection = redis_connection(&self.url).expect("redis connection");
        self.scan(&mut connection).expect("scan")
    }

    fn scan(&self, connection: &mut redis::Connection) -> redis::RedisResult<Vec<String>> {
        let mut pattern = String::new();
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('*');
        // SCAN may return a key more than once while other tests grow the keyspace.
        let mut keys: Vec<String> = redis::Commands::scan_match::<_, String>(connection, pattern)?
            .collect::<redis::RedisResult<_>>()?;
        keys.sort();
        keys.dedup();
        Ok(keys)
    }
}

impl Drop for RedisPrefix {
    fn drop(&mut self) {
        let Ok(mut connection) = redis_connection(&self.url) else {
            return;
        };
        let Ok(keys) = self.scan(&mut connection) else {
            return;
        };
        for chunk in keys.chunks(1000) {
            let _: redis::RedisResult<()> = redis::cmd("UNLINK").arg(chunk).query(&mut connection);
        }
    }
}

/// A blocking connection for fixtures (set-up checks and clean-up).
pub fn redis_connection(url: &str) -> redis::RedisResult<redis::Connection> {
    redis::Client::open(url)?.get_connection_with_timeout(std::time::Duration::from_secs(3))
}

/// Whether Redis answers at `url`; asked once per test run.
fn redis_reachable(url: &str) -> bool {
    static REACHABLE: OnceLock<bool> = OnceLock::new();
    *REACHABLE.get_or_init(|| {
        redis_connection(url)
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_ok()
    })
}

/// A host whose user list the test sets.
#[derive(Default)]
pub struct TestHost {
    pub users: Mutex<Vec<UserId>>,
}

impl TestHost {
    pub fn with_users(ids: impl IntoIterator<Item = i64>) -> Arc<TestHost> {
        Arc::new(TestHost {
            users: Mutex::new(ids.into_iter().map(UserId).collect()),
        })
    }
}

#[rocket::async_trait]
impl Host for TestHost {
    async fn current_user(&self, _request: &rocket::Request<'_>) -> Option<UserId> {
        None
    }

    async fn all_users(&self) -> Result<Vec<UserId>, BoxError> {
        Ok(self.users.lock().unwrap().clone())
    }
}

/// Where a per-test backend lives; dropping it removes the data.
#[allow(dead_code)]
pub enum Place {
    Sqlite(tempfile::TempDir),
    Postgres(PgSchema),
    Redis(RedisPrefix),
    /// The reference app on Redis: its users in SQLite, its messages in Redis.
    SqliteAndRedis(tempfile::TempDir, RedisPrefix),
}

/// A store over a fresh backend, and the host that lists its users.
pub struct TestStore {
    pub store: Store,
    pub host: Arc<TestHost>,
    pub url: String,
    pub place: Place,
}

impl TestStore {
    pub fn backend(&self) -> &dyn stored_messages::MessageBackend {
        self.store.backend()
    }

    /// Another store over the same data with different configuration (e.g. expiry).
    pub async fn reconfigured(&self, config: Config) -> Store {
        let backend = connect(&self.place, &self.url, Settings::from_config(&config)).await;
        Store::new(backend, self.host.clone(), config).unwrap()
    }
}

/// A SQLite database file in a temp dir of its own.
pub fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("test.sqlite").display()
    )
}

pub async fn sqlite_store() -> Option<TestStore> {
    sqlite_store_with(Config::default()).await
}

pub async fn postgres_store() -> Option<TestStore> {
    postgres_store_with(Config::default()).await
}

/// SQL stores that keep every delivery of two or more consecutive users as a run, so the
/// conformance suite runs over runs too (its users 1, 2 and 3 are consecutive).
pub fn runs_config() -> Config {
    Config {
        audience_min_run: 2,
        ..Config::default()
    }
}

pub async fn sqlite_store_with(config: Config) -> Option<TestStore> {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(&dir);
    Some(new_store(url, Place::Sqlite(dir), config).await)
}

pub async fn postgres_store_with(config: Config) -> Option<TestStore> {
    let schema = PgSchema::create().await?;
    let url = schema.url.clone();
    Some(new_store(url, Place::Postgres(schema), config).await)
}

pub async fn redis_store() -> Option<TestStore> {
    let prefix = RedisPrefix::create()?;
    let url = prefix.url.clone();
    Some(new_store(url, Place::Redis(prefix), Config::default()).await)
}

/// The backend of `place` at `url`, connected with `settings`.
async fn connect(place: &Place, url: &str, settings: Settings) -> Arc<dyn MessageBackend> {
    let url = SecretUrl::new(url);
    match place {
        Place::Sqlite(_) | Place::Postgres(_) => Arc::new(
            SqlBackend::connect(&url, settings)
                .await
                .expect("connect and migrate"),
        ),
        Place::Redis(keys) | Place::SqliteAndRedis(_, keys) => Arc::new(
            RedisBackend::connect(&url, &keys.prefix, settings)
                .await
                .expect("connect to redis"),
        ),
    }
}

async fn new_store(url: String, place: Place, config: Config) -> TestStore {
    let backend = connect(&place, &url, Settings::from_config(&config)).await;
    let host = TestHost::with_users([]);
    let store = Store::new(backend, host.clone(), config.clone()).unwrap();
    TestStore {
        store,
        host,
        url,
        place,
    }
}

/// The reference app over a per-test database, with helpers that act like a browser.
pub struct TestApp {
    pub url: String,
    /// Redis url and key prefix when the messages live in Redis.
    pub redis: Option<(String, String)>,
    pub users: Arc<stored_messages_app::users::Users>,
    _place: Place,
}

/// The figment a test app runs with: the real Rocket.toml defaults, this test's database,
/// no periodic cleanup, quiet logs.
pub fn test_figment(url: &str) -> rocket::figment::Figment {
    rocket::Config::figment()
        .merge(("databases.stored_messages.url", url))
        .merge((
            "template_dir",
            concat!(env!("CARGO_MANIFEST_DIR"), "/templates"),
        ))
        .merge(("stored_messages.cleanup_interval_secs", 0))
        .merge(("log_level", "off"))
        .merge(("secret_key", "hPRYyVRiMyxpw5sBB1XeCMN1kFsDCqKvBi2QJxBVHQk="))
}

impl TestApp {
    pub async fn sqlite() -> Option<TestApp> {
        let dir = tempfile::tempdir().unwrap();
        let url = sqlite_url(&dir);
        Some(
            TestApp::open(url, Place::Sqlite(dir))
                .await
                .announcing()
                .await,
        )
    }

    pub async fn postgres() -> Option<TestApp> {
        let schema = PgSchema::create().await?;
        let url = schema.url.clone();
        Some(
            TestApp::open(url, Place::Postgres(schema))
                .await
                .announcing()
                .await,
        )
    }

    /// The app with its messages in Redis (users stay in SQL, as in the reference app).
    pub async fn redis() -> Option<TestApp> {
        let prefix = RedisPrefix::create()?;
        let dir = tempfile::tempdir().unwrap();
        let url = sqlite_url(&dir);
        let redis = Some((prefix.url.clone(), prefix.prefix.clone()));
        let mut app = TestApp::open(url, Place::SqliteAndRedis(dir, prefix)).await;
        app.redis = redis;
        Some(app.announcing().await)
    }

    /// The test's own `Users` ends sessions as the app and the CLI do: announced on the
    /// store's change feed, so that the apps' session caches drop them.
    async fn announcing(self) -> TestApp {
        let figment = self
            .figment()
            .merge(("stored_messages.inbox_cache_messages", 0));
        let host = Arc::new(stored_messages_app::users::AppHost::new(self.users.clone()));
        let store = stored_messages::Store::connect(&figment, host)
            .await
            .expect("the test's store");
        self.users.announce_on(store.change_announcer());
        self
    }

    /// The figment of this test's app.
    pub fn figment(&self) -> rocket::figment::Figment {
        let figment = test_figment(&self.url);
        match &self.redis {
            Some((url, prefix)) => figment
                .merge(("stored_messages.backend", "redis"))
                .merge(("stored_messages.redis_url", url))
                .merge(("stored_messages.redis_key_prefix", prefix)),
            None => figment,
        }
    }

    async fn open(url: String, place: Place) -> TestApp {
        let users = stored_messages_app::connect_users(&test_figment(&url))
            .await
            .unwrap();
        TestApp {
            url,
            redis: None,
            users: Arc::new(users),
            _place: place,
        }
    }

    /// The app as Rocket builds it for this test's database.
    pub fn rocket(&self) -> rocket::Rocket<rocket::Build> {
        stored_messages_app::rocket_from(self.figment())
    }

    /// A browser on a customised app (extra test routes).
    pub async fn browser_with(&self, rocket: rocket::Rocket<rocket::Build>) -> Browser {
        let client = rocket::local::asynchronous::Client::tracked(rocket)
            .await
            .expect("valid app");
        Browser { client }
    }

    /// Creates a user (password "horse-battery-9").
    pub async fn user(&self, name: &str, admin: bool) -> stored_messages_app::users::User {
        self.users
            .create(name, "horse-battery-9", admin)
            .await
            .unwrap()
    }

    /// The texts of a user's unread messages, oldest first, as the backend has them.
    pub async fn inbox_texts(browser: &Browser, user: UserId) -> Vec<String> {
        TestApp::store(browser)
            .backend()
            .inbox_list(user, stored_messages::ListQuery::ALL)
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.message)
            .collect()
    }

    /// The store of a running browser's app.
    pub fn store(browser: &Browser) -> &Store {
        browser
            .client
            .rocket()
            .state::<Store>()
            .expect("store is managed")
    }
}

pub struct Browser {
    pub client: rocket::local::asynchronous::Client,
}

impl Browser {
    /// This browser's CSRF token for its current session. The token is bound to the session,
    /// so this asks for a page first (the login page, which consumes no messages and
    /// redirects a logged-in browser) to get the one issued for the session as it is now.
    pub async fn csrf_token(&self) -> String {
        self.client.get("/login").dispatch().await;
        let cookie = self
            .client
            .cookies()
            .get_private(stored_messages::csrf::CSRF_COOKIE)
            .unwrap();
        token_of(cookie.value())
    }

    pub async fn get_html(&self, path: &str) -> (rocket::http::Status, String) {
        let response = self.client.get(path.to_string()).dispatch().await;
        let status = response.status();
        (status, response.into_string().await.unwrap_or_default())
    }

    /// Posts a urlencoded form with this browser's CSRF token first.
    pub async fn post_form(
        &self,
        path: &str,
        fields: &[(&str, &str)],
    ) -> rocket::local::asynchronous::LocalResponse<'_> {
        let token = self.csrf_token().await;
        let mut body = format!("csrf_token={}", urlencode(&token));
        for (k, v) in fields {
            body.push_str(&format!("&{}={}", urlencode(k), urlencode(v)));
        }
        self.client
            .post(path.to_string())
            .header(rocket::http::ContentType::Form)
            .body(body)
            .dispatch()
            .await
    }

    pub async fn login_as(&self, name: &str) {
        let response = self
            .post_form(
                "/login",
                &[("username", name), ("password", "horse-battery-9")],
            )
            .await;
        assert_eq!(
            response.status(),
            rocket::http::Status::SeeOther,
            "login as {name}"
        );
    }
}

/// The token in a CSRF cookie's value (`<token>` or `<token>.<session binding>`).
pub fn token_of(cookie_value: &str) -> String {
    cookie_value.split('.').next().unwrap_or("").to_string()
}

pub fn urlencode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// Asserts a redirect to `location`.
#[allow(dead_code)]
pub fn assert_redirect(response: &rocket::local::asynchronous::LocalResponse<'_>, location: &str) {
    assert!(
        response.status().class().is_redirection(),
        "status {}",
        response.status()
    );
    assert_eq!(response.headers().get_one("Location"), Some(location));
}
