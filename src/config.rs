//! Configuration under the `stored_messages` key of Rocket's figment.
//!
//! Every key has a default, so an empty section is valid. [`Config::validate`] reports every
//! problem at once, each naming its key. The database itself is configured the Rocket way,
//! under `[default.databases.stored_messages]`.

use std::collections::BTreeMap;

use rocket::figment::Figment;
use serde::{Deserialize, Serialize};

use crate::backend::{Expiry, Settings};
use crate::error::Error;
use crate::level::Level;
use crate::message::LevelTags;
pub use crate::secret_url::SecretUrl;

/// The figment key of this configuration.
pub const CONFIG_KEY: &str = "stored_messages";
/// The name of the database under `databases`.
pub const DATABASE_NAME: &str = "stored_messages";
/// The database used when none is configured: a SQLite file next to the process, created on
/// first use.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://stored-messages.sqlite?mode=rwc";

/// Which storage holds stored messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// SQLite or PostgreSQL, from the database url.
    #[default]
    Sql,
    /// Redis, from `redis_url`.
    Redis,
}

/// `[default.stored_messages]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `"sql"` (default) or `"redis"`.
    pub backend: BackendKind,
    /// Levels that are persisted when a user is logged in; default the five stored levels.
    pub store_levels: Vec<Level>,
    /// Messages below this level are dropped by the request guard (default 20, INFO).
    pub min_level: Level,
    /// Level tag overrides: level (integer or name) → tag.
    pub level_tags: BTreeMap<String, String>,
    /// Inbox entries older than this are not shown and are removed by cleanup (default 30).
    pub inbox_expire_days: u32,
    /// Messages older than this are removed everywhere by cleanup (default 120).
    pub message_expire_days: u32,
    /// Seconds between cleanups run by `serve`; 0 turns periodic cleanup off (default 3600).
    pub cleanup_interval_secs: u64,
    /// Redis server for `backend = "redis"`.
    pub redis_url: SecretUrl,
    /// Prefix for every Redis key (default empty), so several apps or tests share a server.
    pub redis_key_prefix: String,
    /// Redis: how long, in seconds, one command may wait for its answer (default 5). A
    /// command still waiting then fails as unavailable (the request gets 503) and the
    /// connection is replaced, so a server that went silent on an open connection costs a
    /// request at most this long, and the backend heals once the server answers new
    /// connections. A broadcast's script and cleanup's batches get at least 30 s.
    pub redis_timeout_secs: u64,
    /// Most messages the in-process inbox cache holds (default 100000, a few tens of MB at
    /// most; an entry the JSON API reads also keeps its messages' JSON, about as much
    /// again); 0 turns it off. See [`crate::backend::cache`].
    pub inbox_cache_messages: usize,
    /// SQLite: how often, in milliseconds, the change feed reads the `sm_changes` log for
    /// writes of other processes (default 100), which is how soon subscribers such as live
    /// pages hear of them. The inbox cache does not wait for it: it reads the log before it
    /// trusts an entry. PostgreSQL and Redis report changes as they happen. (Also accepted
    /// under its former name, `inbox_cache_poll_ms`.)
    #[serde(alias = "inbox_cache_poll_ms")]
    pub change_poll_ms: u64,
    /// SQL: a delivery to at least this many consecutive user ids is stored once, as a run,
    /// instead of one row per user (default 256). See [`crate::backend::sql`].
    pub audience_min_run: u64,
    /// Marks the library's cookies (flash queue, spill key, CSRF token) `Secure`, so browsers
    /// send them over HTTPS only. Set it when a proxy terminates TLS in front of the app;
    /// with Rocket's own TLS they are `Secure` already. Default `false`.
    pub secure_cookies: bool,
    /// New flash spills (messages over the cookie's budget, kept server-side) one logged-in
    /// user, or one address of anonymous visitors, may create per 10 minutes (default 20;
    /// 0: none). See
    /// [`crate::flash::overflow::SpillQuota`].
    pub spills_per_client: u32,
    /// Bytes the flash spills of anonymous visitors may occupy together, per instance
    /// (default 64 MiB; 0: anonymous visitors never spill). Over it, a visitor gets what fits
    /// the cookie and a warning that some messages could not be kept.
    pub anonymous_spill_bytes: usize,
    /// Serves live streams on this address (`"0.0.0.0:8001"`; port 0 picks a free one) with
    /// the library's own small stream server instead of Rocket, which holds about 36 KiB per
    /// open stream against a few here: `GET <api>/stream` then redirects there with a
    /// ticket. Default: none (Rocket serves streams). See [`crate::live::listener`].
    pub stream_address: Option<std::net::SocketAddr>,
    /// The URL browsers reach the stream listener at (`"https://live.example.com/stream"`,
    /// or a path such as `"/live/stream"` behind a proxy that routes it there); default
    /// `http://` + the request's host + `stream_address`'s port + the request's path.
    pub stream_url: Option<String>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            backend: BackendKind::Sql,
            store_levels: Level::STORED.to_vec(),
            min_level: Level::INFO,
            level_tags: BTreeMap::new(),
            inbox_expire_days: 30,
            message_expire_days: 120,
            cleanup_interval_secs: 3600,
            redis_url: SecretUrl::new("redis://127.0.0.1:6379"),
            redis_key_prefix: String::new(),
            redis_timeout_secs: 5,
            inbox_cache_messages: 100_000,
            change_poll_ms: 100,
            audience_min_run: 256,
            secure_cookies: false,
            spills_per_client: crate::flash::overflow::SPILLS_PER_CLIENT,
            anonymous_spill_bytes: crate::flash::overflow::ANONYMOUS_SPILL_BYTES,
            stream_address: None,
            stream_url: None,
        }
    }
}

impl Config {
    /// Reads and validates `stored_messages` from a figment (defaults for missing keys).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] listing every problem, each naming its key.
    pub fn from_figment(figment: &Figment) -> Result<Config, Error> {
        let config = if figment.contains(CONFIG_KEY) {
            figment.extract_inner::<Config>(CONFIG_KEY).map_err(|e| {
                Error::Config(
                    e.into_iter()
                        .map(|e| format!("{CONFIG_KEY}: {e}"))
                        .collect(),
                )
            })?
        } else {
            Config::default()
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the values; reports all problems at once.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] listing every problem, each naming its key.
    pub fn validate(&self) -> Result<(), Error> {
        let mut problems = Vec::new();
        if let Err(Error::Config(mut p)) = self.level_tags() {
            problems.append(&mut p);
        }
        if self.inbox_expire_days == 0 {
            problems.push("stored_messages.inbox_expire_days: must be at least 1".to_string());
        }
        if self.message_expire_days == 0 {
            problems.push("stored_messages.message_expire_days: must be at least 1".to_string());
        }
        if self.audience_min_run == 0 {
            problems.push("stored_messages.audience_min_run: must be at least 1".to_string());
        }
        if self.change_poll_ms == 0 {
            problems.push("stored_messages.change_poll_ms: must be at least 1".to_string());
        }
        if self.message_expire_days < self.inbox_expire_days {
            problems.push(format!(
                "stored_messages.message_expire_days: {} is shorter than inbox_expire_days ({})",
                self.message_expire_days, self.inbox_expire_days
            ));
        }
        if self.backend == BackendKind::Redis {
            match url::Url::parse(self.redis_url.expose()) {
                Ok(url) if matches!(url.scheme(), "redis" | "rediss" | "redis+unix") => {}
                _ => problems.push(format!(
                    "stored_messages.redis_url: {} is not a redis:// url",
                    self.redis_url
                )),
            }
        }
        if let Some(url) = &self.stream_url {
            let absolute = url::Url::parse(url)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
            let path = url.starts_with('/') && !url.starts_with("//");
            if !absolute && !path {
                problems.push(format!(
                    "stored_messages.stream_url: {url:?} is neither an http(s) URL nor a path"
                ));
            }
            if self.stream_address.is_none() {
                problems.push(
                    "stored_messages.stream_url: set without stream_address (nothing listens)"
                        .to_string(),
                );
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Config(problems))
        }
    }

    /// The level tags: defaults with the `level_tags` overrides.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for keys that are not levels.
    pub fn level_tags(&self) -> Result<LevelTags, Error> {
        let mut overrides = BTreeMap::new();
        let mut problems = Vec::new();
        for (key, tag) in &self.level_tags {
            match Level::parse(key) {
                Ok(level) => {
                    overrides.insert(level, tag.trim().to_string());
                }
                Err(e) => problems.push(format!("stored_messages.level_tags: {e}")),
            }
        }
        if problems.is_empty() {
            Ok(LevelTags::new(overrides))
        } else {
            Err(Error::Config(problems))
        }
    }

    /// Whether messages of `level` are persisted (for a logged-in user).
    pub fn is_store_level(&self, level: Level) -> bool {
        self.store_levels.contains(&level)
    }
}

/// The database url from `databases.stored_messages.url`, or [`DEFAULT_DATABASE_URL`].
pub fn database_url(figment: &Figment) -> SecretUrl {
    let key = format!("databases.{DATABASE_NAME}.url");
    figment
        .extract_inner::<String>(&key)
        .map(SecretUrl::new)
        .unwrap_or_else(|_| SecretUrl::new(DEFAULT_DATABASE_URL))
}

/// `[default.databases.stored_messages]` as rocket_db_pools reads a database's settings,
/// with its defaults (`max_connections` = workers × 4, `connect_timeout` = 5 s) and
/// [`DEFAULT_DATABASE_URL`] when no url is given.
///
/// # Errors
///
/// [`Error::Config`] naming the key of a value of the wrong type.
pub fn database_config(figment: &Figment) -> Result<rocket_db_pools::Config, Error> {
    use rocket::figment::providers::Serialized;
    let workers: usize = figment.extract_inner(rocket::Config::WORKERS).unwrap_or(2);
    let key = format!("databases.{DATABASE_NAME}");
    Figment::from(figment.focus(&key))
        .join(Serialized::default("url", DEFAULT_DATABASE_URL))
        .join(Serialized::default("max_connections", workers * 4))
        .join(Serialized::default("connect_timeout", 5))
        .extract::<rocket_db_pools::Config>()
        .map_err(|e| Error::Config(e.into_iter().map(|e| format!("{key}: {e}")).collect()))
}

// The backends' settings are built here, so that the backends never read the
// configuration themselves.
impl Settings {
    /// The settings of `config`.
    pub fn from_config(config: &Config) -> Settings {
        Settings {
            store_levels: config.store_levels.clone(),
            expiry: Expiry {
                inbox_days: config.inbox_expire_days,
                message_days: config.message_expire_days,
            },
            change_poll: std::time::Duration::from_millis(config.change_poll_ms.max(1)),
            audience_min_run: usize::try_from(config.audience_min_run.max(1)).unwrap_or(usize::MAX),
            command_timeout: std::time::Duration::from_secs(config.redis_timeout_secs.max(1)),
        }
    }
}

impl Default for Settings {
    fn default() -> Settings {
        Settings::from_config(&Config::default())
    }
}

#[cfg(test)]
mod tests {
    use rocket::figment::providers::{Format, Toml};

    use super::*;

    #[test]
    fn empty_section_gives_the_defaults() {
        let figment = Figment::new();
        let config = Config::from_figment(&figment).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(database_url(&figment).expose(), DEFAULT_DATABASE_URL);
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let figment = Figment::from(Toml::string(
            r#"
            [stored_messages]
            inbox_expire_days = 0
            message_expire_days = 0
            level_tags = { urgent = "u", 21 = "note" }
            "#,
        ));
        let err = Config::from_figment(&figment).unwrap_err().to_string();
        assert!(err.contains("stored_messages.inbox_expire_days"), "{err}");
        assert!(err.contains("stored_messages.message_expire_days"), "{err}");
        assert!(err.contains("unknown level \"urgent\""), "{err}");
    }

    #[test]
    fn wrong_types_and_unknown_keys_name_the_key() {
        let figment = Figment::from(Toml::string("[stored_messages]\nmin_level = \"high\""));
        let err = Config::from_figment(&figment).unwrap_err().to_string();
        assert!(err.contains("min_level"), "{err}");
        let figment = Figment::from(Toml::string("[stored_messages]\nbackedn = \"sql\""));
        let err = Config::from_figment(&figment).unwrap_err().to_string();
        assert!(err.contains("backedn"), "{err}");
    }

    #[test]
    fn the_stream_listener_is_configured_with_an_address_and_a_url() {
        let read = |toml: &str| Config::from_figment(&Figment::from(Toml::string(toml)));
        let config = read("[stored_messages]\nstream_address = \"127.0.0.1:0\"").unwrap();
        assert_eq!(config.stream_address, Some("127.0.0.1:0".parse().unwrap()));
        for url in ["https://live.example.com/stream", "/live/stream"] {
            let toml = format!(
                "[stored_messages]\nstream_address = \"[::]:8001\"\nstream_url = \"{url}\""
            );
            assert_eq!(read(&toml).unwrap().stream_url.as_deref(), Some(url));
        }
        let err = read("[stored_messages]\nstream_address = \"localhost\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("stream_address"), "{err}");
        for url in ["javascript:alert(1)", "//elsewhere.example/x", "live"] {
            let toml = format!(
                "[stored_messages]\nstream_address = \"[::]:8001\"\nstream_url = \"{url}\""
            );
            let err = read(&toml).unwrap_err().to_string();
            assert!(err.contains("stored_messages.stream_url"), "{url}: {err}");
        }
        let err = read("[stored_messages]\nstream_url = \"/live\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("without stream_address"), "{err}");
    }

    #[test]
    fn level_tags_accept_names_and_integers() {
        let config = Config {
            level_tags: [
                ("stored_info".into(), "note".into()),
                ("77".into(), "x".into()),
            ]
            .into(),
            ..Config::default()
        };
        let tags = config.level_tags().unwrap();
        assert_eq!(tags.tag(Level::STORED_INFO), "note");
        assert_eq!(tags.tag(Level(77)), "x");
        assert_eq!(tags.tag(Level::INFO), "info");
    }

    #[test]
    fn database_settings_are_read_the_rocket_db_pools_way() {
        let defaults = database_config(&Figment::new()).unwrap();
        assert_eq!(defaults.url, DEFAULT_DATABASE_URL);
        assert_eq!((defaults.max_connections, defaults.connect_timeout), (8, 5));
        let figment = Figment::from(Toml::string(
            "workers = 4\n[databases.stored_messages]\nurl = \"postgres://db/x\"\nmax_connections = 3",
        ));
        let config = database_config(&figment).unwrap();
        assert_eq!(
            (config.url.as_str(), config.max_connections),
            ("postgres://db/x", 3)
        );
        let figment = Figment::from(Toml::string(
            "[databases.stored_messages]\nmax_connections = \"many\"",
        ));
        let err = database_config(&figment).unwrap_err().to_string();
        assert!(
            err.contains("databases.stored_messages") && err.contains("max_connections"),
            "{err}"
        );
    }

    #[test]
    fn secret_urls_hide_passwords() {
        let url = SecretUrl::new("redis://user:hunter2@localhost:6379/0");
        assert!(!format!("{url:?}").contains("hunter2"));
        assert!(!url.to_string().contains("hunter2"));
        assert!(url.expose().contains("hunter2"));
    }
}
