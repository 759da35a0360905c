//! The request-free API: add, broadcast, read and clean up stored messages from anywhere
//! (background jobs, other services, the CLI), through a [`Store`].
//!
//! A `Store` wraps the configured backend with what the backend itself does not know: the
//! host's users (the audience of a broadcast), the level tags, and the event hub. Every write
//! goes through here, so every write publishes its [`Event`]s, whatever the backend.

use std::sync::Arc;

use chrono::Utc;
use rocket::figment::Figment;

#[cfg(feature = "redis")]
use crate::backend::RedisBackend;
use crate::backend::{CachedBackend, Cleanup, FlashSpill, MessageBackend, Settings};
#[cfg(any(feature = "sqlite", feature = "postgres"))]
use crate::backend::{SqlBackend, SqlPool};
use crate::changes::ChangeFeed;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
use crate::config::database_config;
use crate::config::{BackendKind, Config};
use crate::error::{Error, Result};
use crate::events::{Event, Events};
use crate::flash::overflow::{MemorySpill, SpillQuota};
use crate::host::Host;
use crate::message::{LevelTags, Message, MessageId, NewMessage, UserId};

/// A message and how many users received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The stored message, with its id.
    pub message: Message,
    /// How many distinct users it was delivered to.
    pub recipients: u64,
}

/// The handle to stored messages: backend, configuration, host and events. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Arc<dyn MessageBackend>,
    /// The backend without the inbox cache in front.
    uncached: Arc<dyn MessageBackend>,
    cache: Option<Arc<CachedBackend>>,
    feed: ChangeFeed,
    host: Arc<dyn Host>,
    config: Config,
    level_tags: LevelTags,
    events: Events,
    spill_quota: SpillQuota,
    open_streams: crate::live::OpenStreams,
    stream_asks: crate::live::StreamAsks,
    stream_hub: Arc<crate::live::StreamHub>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.inner.backend.name())
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// A store over `backend`, with `host` for users and `config` for levels and tags.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when `config` does not validate.
    pub fn new(
        backend: Arc<dyn MessageBackend>,
        host: Arc<dyn Host>,
        config: Config,
    ) -> Result<Store> {
        config.validate()?;
        let level_tags = config.level_tags()?;
        let feed = ChangeFeed::new(backend.clone());
        let cache = (config.inbox_cache_messages > 0).then(|| {
            Arc::new(CachedBackend::new(
                backend.clone(),
                feed.clone(),
                &Settings::from_config(&config),
                config.inbox_cache_messages,
            ))
        });
        let uncached = backend.clone();
        let backend = match &cache {
            Some(cache) => cache.clone() as Arc<dyn MessageBackend>,
            None => backend,
        };
        let spill_quota = SpillQuota::new(config.spills_per_client, config.anonymous_spill_bytes);
        let inner = Inner {
            backend,
            uncached,
            cache,
            feed,
            host,
            config,
            level_tags,
            events: Events::new(),
            spill_quota,
            open_streams: crate::live::OpenStreams::default(),
            stream_asks: crate::live::StreamAsks::default(),
            stream_hub: Arc::default(),
        };
        Ok(Store {
            inner: Arc::new(inner),
        })
    }

    /// Reads `stored_messages` and the database url from `figment`, connects the configured
    /// backend, applies its migrations and returns the store. This is what the fairing does
    /// at ignite, and what the CLI does before each command.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for bad configuration, [`Error::Backend`] when the storage cannot be
    /// reached or migrated, or when it is a backend this build leaves out
    /// ([`crate::backend::BackendError::NotCompiled`]: the Cargo features `sqlite`, `postgres`, `redis`).
    #[cfg_attr(
        not(any(feature = "sqlite", feature = "postgres", feature = "redis")),
        allow(unreachable_code, unused_variables)
    )]
    pub async fn connect(figment: &Figment, host: Arc<dyn Host>) -> Result<Store> {
        let config = Config::from_figment(figment)?;
        let settings = Settings::from_config(&config);
        let backend: Arc<dyn MessageBackend> = match config.backend {
            #[cfg(any(feature = "sqlite", feature = "postgres"))]
            BackendKind::Sql => {
                let pool = SqlPool::connect_with(&database_config(figment)?).await?;
                pool.migrate().await?;
                Arc::new(SqlBackend::new(pool, settings))
            }
            #[cfg(not(any(feature = "sqlite", feature = "postgres")))]
            BackendKind::Sql => {
                return Err(crate::backend::BackendError::NotCompiled {
                    what: "SQL",
                    feature: "sqlite` or `postgres",
                }
                .into())
            }
            #[cfg(feature = "redis")]
            BackendKind::Redis => Arc::new(
                RedisBackend::connect(&config.redis_url, &config.redis_key_prefix, settings)
                    .await?,
            ),
            #[cfg(not(feature = "redis"))]
            BackendKind::Redis => {
                return Err(crate::backend::BackendError::NotCompiled {
                    what: "Redis",
                    feature: "redis",
                }
                .into())
            }
        };
        Store::new(backend, host, config)
    }

    /// The backend, for reads (`inbox_list`, `archive_list`, `inbox_count`, …). Writes should
    /// go through the store so that they publish events.
    pub fn backend(&self) -> &dyn MessageBackend {
        &*self.inner.backend
    }

    /// Whether the storage answers now: one small read that goes to the storage itself, past
    /// the inbox cache (for a readiness check).
    ///
    /// # Errors
    ///
    /// The backend's error when it does not answer.
    pub async fn ping(&self) -> Result<()> {
        self.inner.uncached.inbox_count(UserId(0)).await.map(|_| ())
    }

    /// Where flash messages that did not fit their cookie wait: the backend's
    /// [`FlashSpill`], or this process's memory for a backend without one.
    pub fn flash_spill(&self) -> &dyn FlashSpill {
        self.inner
            .backend
            .flash_spill()
            .unwrap_or_else(|| MemorySpill::global())
    }

    /// How many live streams (`GET <api>/stream`) this store serves now.
    pub fn open_streams(&self) -> usize {
        self.inner.open_streams.get()
    }

    pub(crate) fn open_streams_counter(&self) -> &crate::live::OpenStreams {
        &self.inner.open_streams
    }

    pub(crate) fn stream_asks(&self) -> &crate::live::StreamAsks {
        &self.inner.stream_asks
    }

    pub(crate) fn stream_hub(&self) -> &Arc<crate::live::StreamHub> {
        &self.inner.stream_hub
    }

    /// How many flash spills clients may still create (see [`SpillQuota`]).
    pub(crate) fn spill_quota(&self) -> &SpillQuota {
        &self.inner.spill_quota
    }

    /// The inbox cache in front of the backend, unless `inbox_cache_messages` is 0.
    pub fn inbox_cache(&self) -> Option<&CachedBackend> {
        self.inner.cache.as_deref()
    }

    /// The change feed: which inboxes changed, in any process sharing the storage (see
    /// [`crate::changes`]). It starts with the inbox cache, or on the first call to
    /// [`Store::changes`] when the cache is off.
    pub fn changes(&self) -> &ChangeFeed {
        self.inner.feed.start();
        &self.inner.feed
    }

    /// The user's unread messages as [`MessageBackend::inbox_list`] answers them, for a read
    /// that must see every write that returned before `since` (a request's
    /// [`crate::request_start`]): through the inbox cache, whose sync it may share with the
    /// request's other reads.
    ///
    /// # Errors
    ///
    /// As [`MessageBackend::inbox_list`].
    pub async fn inbox_list_since(
        &self,
        user: UserId,
        query: crate::backend::ListQuery,
        since: std::time::Instant,
    ) -> Result<Vec<Message>> {
        Ok(self
            .inbox_listed_since(user, query, since)
            .await?
            .into_vec())
    }

    /// [`Store::inbox_list_since`] without copying the messages out of the cache.
    pub(crate) async fn inbox_listed_since(
        &self,
        user: UserId,
        query: crate::backend::ListQuery,
        since: std::time::Instant,
    ) -> Result<crate::backend::cache::Listed> {
        match self.inbox_cache() {
            Some(cache) => cache.inbox_listed_since(user, query, since).await,
            None => Ok(crate::backend::cache::Listed::all(
                self.inner.backend.inbox_list(user, query).await?,
            )),
        }
    }

    /// The user's unread count, as fresh as [`Store::inbox_list_since`].
    ///
    /// # Errors
    ///
    /// As [`MessageBackend::inbox_count`].
    pub async fn inbox_count_since(&self, user: UserId, since: std::time::Instant) -> Result<u64> {
        match self.inbox_cache() {
            Some(cache) => cache.inbox_count_since(user, since).await,
            None => self.inner.backend.inbox_count(user).await,
        }
    }

    /// The change feed, without starting it (unlike [`Store::changes`]): enough to
    /// [`ChangeFeed::announce`] a change to every process, for a short-lived process such as
    /// a command that does not follow changes itself.
    pub fn change_announcer(&self) -> ChangeFeed {
        self.inner.feed.clone()
    }

    /// The host's view of users.
    pub fn host(&self) -> &dyn Host {
        &*self.inner.host
    }

    pub(crate) fn host_arc(&self) -> &Arc<dyn Host> {
        &self.inner.host
    }

    /// The validated configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Level tags, defaults plus configured overrides.
    pub fn level_tags(&self) -> &LevelTags {
        &self.inner.level_tags
    }

    /// The event hub: `store.events().subscribe()` or `store.events().on(|event| …)`.
    pub fn events(&self) -> &Events {
        &self.inner.events
    }

    /// Stores `message` for each of `users` (archive and inbox together, atomically) and
    /// publishes `ArchiveStored` and `InboxStored`. Duplicate users count once.
    ///
    /// # Errors
    ///
    /// [`Error::MessageTypeNotSupported`] when the level is not a store level (nothing is
    /// written), [`Error::Backend`] when the storage fails (nothing is written either).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn f(store: stored_messages::Store) -> stored_messages::Result<()> {
    /// use stored_messages::{Level, NewMessage, UserId};
    ///
    /// let message = NewMessage::parse(Level::STORED_INFO, "Your export is ready", "export",
    ///                                 Some("/exports/42"), None)?;
    /// store.add_message_for(&[UserId(1), UserId(2)], message).await?;
    /// # Ok(()) }
    /// ```
    pub async fn add_message_for(&self, users: &[UserId], message: NewMessage) -> Result<Delivery> {
        // Sorted and deduplicated once: the backend's own pass over sorted ids is linear,
        // and the events take the vector as it is.
        let users = unique(users);
        let message = self.inner.backend.deliver(&users, &message).await?;
        let recipients = self.publish_delivery(users, &message);
        log::debug!(
            "stored-messages: message {} delivered to {recipients} users",
            message.id
        );
        Ok(Delivery {
            message,
            recipients,
        })
    }

    /// Stores `message` for every user that exists now (as the host lists them), in one
    /// atomic bulk write.
    ///
    /// # Errors
    ///
    /// As [`Store::add_message_for`], plus [`Error::Host`] when the user list fails.
    pub async fn broadcast_message(&self, message: NewMessage) -> Result<Delivery> {
        let users = self.inner.host.all_users().await.map_err(Error::Host)?;
        self.add_message_for(&users, message).await
    }

    /// Adds an existing message to every user of `users` who does not have it yet, read or
    /// unread (see [`MessageBackend::deliver_once`]), and publishes the events for the chunk.
    /// Background broadcasts call this chunk by chunk: repeating a chunk never delivers twice.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the storage fails.
    pub async fn deliver_once(&self, users: &[UserId], message: &Message) -> Result<u64> {
        let users = unique(users);
        let added = self.inner.backend.deliver_once(&users, message).await?;
        if added > 0 {
            self.publish_delivery(users, message);
        }
        Ok(added)
    }

    /// Marks one message read for `user`: `true` if it was unread, `false` if it was already
    /// read, expired, unknown or someone else's (never an error for those). Publishes
    /// `InboxDeleted` when it was unread.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the storage fails.
    pub async fn mark_read(&self, user: UserId, id: MessageId) -> Result<bool> {
        Ok(!self.mark_many_read(user, &[id]).await?.is_empty())
    }

    /// Marks these messages read for `user` in one step and returns those that were unread.
    /// Publishes one `InboxDeleted` for them.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the storage fails.
    pub async fn mark_many_read(&self, user: UserId, ids: &[MessageId]) -> Result<Vec<MessageId>> {
        let read = self.inner.backend.inbox_delete_many(user, ids).await?;
        if !read.is_empty() {
            self.inner.events.publish(Event::InboxDeleted {
                user,
                message_ids: read.clone().into(),
            });
        }
        Ok(read)
    }

    /// Marks every unread message of `user` read and returns how many there were. A message
    /// arriving meanwhile is either counted here or stays unread. Publishes `InboxPurged`.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the storage fails.
    pub async fn mark_all_read(&self, user: UserId) -> Result<u64> {
        let count = self.inner.backend.inbox_purge(user).await?;
        self.inner
            .events
            .publish(Event::InboxPurged { user, count });
        Ok(count)
    }

    /// Removes expired inbox entries and messages now.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the storage fails.
    pub async fn cleanup(&self) -> Result<Cleanup> {
        let cleanup = self
            .inner
            .backend
            .expired_messages_cleanup(Utc::now())
            .await?;
        log::info!(
            "stored-messages: cleanup removed {} expired inbox entries and {} messages",
            cleanup.inbox_entries,
            cleanup.messages
        );
        Ok(cleanup)
    }

    /// Publishes `ArchiveStored` and `InboxStored` for `users` (sorted, unique).
    fn publish_delivery(&self, users: Vec<UserId>, message: &Message) -> u64 {
        let recipients = users.len() as u64;
        if recipients > 0 {
            let users: Arc<[UserId]> = users.into();
            let message = Arc::new(message.clone());
            let events = &self.inner.events;
            events.publish(Event::ArchiveStored {
                users: users.clone(),
                message: message.clone(),
            });
            events.publish(Event::InboxStored { users, message });
        }
        recipients
    }
}

/// `users` sorted, each once.
fn unique(users: &[UserId]) -> Vec<UserId> {
    let mut users = users.to_vec();
    users.sort_unstable();
    users.dedup();
    users
}
