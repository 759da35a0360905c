//! # stored-messages
//!
//! Flash messages and per-user stored messages for Rocket 0.5, merged into one stream.
//!
//! - **Flash messages** are one-shot notices for the next page a browser sees: many at a
//!   time, each with a level and tags, kept in a private (encrypted) cookie that spills to the
//!   server when it is full, so nothing is lost.
//! - **Stored messages** are persisted per user (SQLite, PostgreSQL, Redis, or a backend of
//!   your own). They wait in the user's **inbox** until a page shows them, then they are
//!   *read*; every message a user received stays in the **archive**.
//!
//! It is the Rust successor of django-stored-messages: same levels, same backend operations,
//! no lost messages.
//!
//! ## Modules
//!
//! | module | what it is for |
//! |---|---|
//! | [`StoredMessages`] (`fairing`) | the one fairing a host attaches: store, API, CSRF, marking read |
//! | [`Messages`] (`request`) | the request guard: add messages, show the merged stream |
//! | [`template`] | the Tera helpers, [`template::Page`], the built-in partials |
//! | [`api`] | the JSON API and its OpenAPI document |
//! | [`live`] | `GET <api>/stream`: the inbox as server-sent events, from the change feed |
//! | [`csrf`] | the CSRF check, [`CsrfToken`], [`csrf::CsrfForm`] |
//! | [`flash`] | the flash queue: private cookie, server-side spill |
//! | [`Store`] (`ops`) | the request-free API: send, broadcast, read, clean up |
//! | [`backend`] | [`MessageBackend`] and its SQL and Redis implementations, the inbox cache |
//! | [`changes`] | the change feed: which inboxes changed, in any process |
//! | [`config`] | `[stored_messages]` settings |
//! | [`Host`], [`Level`], [`Message`], [`Error`], [`Event`] | the vocabulary the rest uses |
//!
//! ## Cargo features
//!
//! One per backend: `sqlite` (the default), `postgres`, `redis`. A host compiles the drivers
//! it picks and nothing else; with `default-features = false` and no backend it brings its
//! own (see "A backend of your own" below). A configuration naming a backend the build left
//! out fails at launch with [`backend::BackendError::NotCompiled`], which names the feature.
//! The reference app and its command line are a separate crate (`stored-messages-app`), built
//! on this crate's public API.
//!
//! ## Quick start
//!
//! The repository's `examples/host` is a complete host written as these steps say.
//!
//! 1. Depend on it, with Rocket's `secrets` feature and Tera templates:
//!
//!    ```toml
//!    [dependencies]
//!    stored-messages = "0.1"   # features = ["postgres", "redis"] for those backends
//!    rocket = { version = "0.5", features = ["secrets", "json"] }
//!    rocket_dyn_templates = { version = "0.2", features = ["tera"] }
//!    ```
//!
//! 2. Configure it in `Rocket.toml` (every key is optional; these are the defaults):
//!
//!    ```toml
//!    [default.stored_messages]
//!    backend = "sql"                      # or "redis"
//!    min_level = 20
//!    store_levels = [11, 21, 26, 31, 41]
//!    inbox_expire_days = 30
//!    message_expire_days = 120
//!
//!    [default.databases.stored_messages]
//!    url = "sqlite://stored-messages.sqlite?mode=rwc"
//!    ```
//!
//! 3. Tell it about your users ([`Host`]), attach the fairing and the templates (with the
//!    helpers registered):
//!
//!    ```no_run
//!    use rocket::Request;
//!    use stored_messages::{BoxError, Host, StoredMessages, UserId};
//!
//!    struct MyUsers;
//!
//!    #[rocket::async_trait]
//!    impl Host for MyUsers {
//!        async fn current_user(&self, req: &Request<'_>) -> Option<UserId> {
//!            req.cookies().get_private("user_id")?.value().parse().ok().map(UserId)
//!        }
//!        async fn all_users(&self) -> Result<Vec<UserId>, BoxError> {
//!            Ok(vec![UserId(1), UserId(2)])
//!        }
//!    }
//!
//!    #[rocket::launch]
//!    fn rocket() -> _ {
//!        rocket::build()
//!            // The JSON API is mounted at /messages unless you say `.api_at("/other")`
//!            // or `.without_api()`.
//!            .attach(StoredMessages::fairing(MyUsers))
//!            // rocket_dyn_templates with the helpers; `template::custom(|engines| …)`
//!            // to register functions of your own as well.
//!            .attach(stored_messages::template::fairing())
//!    }
//!    ```
//!
//! 4. Add and show messages with the [`Messages`] guard, and render pages with
//!    [`template::Page`] (it takes the same arguments as `Template::render`):
//!
//!    ```
//!    use rocket::response::Redirect;
//!    use rocket_dyn_templates::context;
//!    use stored_messages::{template::Page, Messages};
//!
//!    #[rocket::post("/save")]
//!    async fn save(messages: Messages<'_>) -> Redirect {
//!        // Persisted for a logged-in user; a flash message for anyone else.
//!        let _ = messages.stored_success("Saved.").await;
//!        Redirect::to("/")
//!    }
//!
//!    #[rocket::get("/")]
//!    fn index(messages: Messages<'_>) -> Page {
//!        // Serializing the guard shows the stream: it is consumed at the end of the request.
//!        Page::render("index", context! { messages })
//!    }
//!    ```
//!
//! 5. Any template can then use `{{ stored_messages_list(limit=10) }}`,
//!    `{{ stored_messages_archive(limit=10) }}`, `{{ stored_messages_count() }}` (in a
//!    [`template::Page`] a number: `{% if stored_messages_count() > 0 %}` works) and
//!    `{{ csrf_token() }}` (see [`template`]), and include the stream with
//!    `{% include "stored_messages/messages" %}`. Both partials are built in; put your own
//!    `stored_messages/list.html.tera` or `stored_messages/messages.html.tera` in your
//!    templates directory to change one.
//!
//! ## How a message travels
//!
//! - `messages.add(level, text)` in a handler: if `level` is in `store_levels` and the host
//!   says a user is logged in, the message is written to the backend at once, in the user's
//!   archive and inbox together ([`MessageBackend::deliver`]). Otherwise it joins the flash
//!   queue, and the private cookie is rewritten right away (Rocket copies cookie changes into
//!   the response before any response fairing runs).
//! - The first use of the guard in a request loads the flash queue (cookie, spill, Rocket's
//!   own `_flash`) and the user's unread inbox, once. The inbox usually comes from the
//!   in-process inbox cache ([`backend::cache`]), which is never staler than the store
//!   itself (see "Consistency" below).
//! - Showing the stream (iterating the guard, or serializing it into a template context)
//!   records exactly which messages were shown. Shown flash messages leave the cookie
//!   immediately; the fairing marks the shown stored messages read after a successful
//!   response. A message that reaches the inbox after the stream was shown stays unread.
//!   `set_used(false)` keeps everything. A page that lists the inbox or the archive itself
//!   shows [`Messages::flash`] instead: the one-time notices alone, the inbox untouched.
//! - Without a request, the managed [`Store`] sends ([`Store::add_message_for`],
//!   [`Store::broadcast_message`]) and reads ([`Store::mark_read`],
//!   [`Store::mark_all_read`]); every write publishes [`Event`]s.
//!
//! ## Consistency across processes
//!
//! The CLI, background jobs and any number of app instances may share one store. The
//! guarantee: **a write that has returned in any process** (a handler, the request-free
//! [`Store`], the `stored-messages` CLI, another app instance) **is seen by every request
//! that starts after it, in every process sharing the store**, on SQLite, PostgreSQL and
//! Redis. That holds for new messages, for reads (`mark_read`) and for `mark_all_read`.
//!
//! The inbox cache keeps it so:
//! - every write announces the inboxes it changed from inside its own transaction or
//!   script (PostgreSQL `NOTIFY`, Redis `PUBLISH`, a row of SQLite's `sm_changes` log), and
//!   each process's [`ChangeFeed`] hears every announcement and drops those entries;
//! - before it answers from an entry, a request waits for [`ChangeFeed::sync`], which returns
//!   only once every write committed before it began has been applied to the cache (one
//!   round trip to the store; on SQLite often none). One sync serves every request waiting
//!   at that moment, so under load it costs a
//!   round trip per batch of requests, not per request;
//! - on PostgreSQL and Redis, every write that changes inboxes waits
//!   [`changes::COMMIT_WAIT`] (1.6 ms) once the store acknowledged it, before it returns; a
//!   request then trusts a sync that began less than [`changes::RECENT_SYNC`] before it
//!   instead of waiting for its own, and a busy process keeps such a sync at hand (see
//!   [`changes`]);
//! - while a feed is down (database restart, killed listener, Redis restart) the cache is
//!   bypassed, never trusted: requests read the store (and get 503 if the store itself is
//!   down). The feed reconnects by itself and starts again with an empty cache.
//!
//! The feed is public: [`Store::changes`] tells any code of yours which inboxes changed,
//! wherever the change was made (see [`changes`]).
//!
//! ## A backend of your own
//!
//! Implement [`MessageBackend`] (each method's documentation is its contract; the crate's
//! conformance suite checks those sentences) and hand a [`Store`] over it to
//! [`StoredMessages::with_store`]. What only some backends can do is opt-in: return your
//! implementation of [`FlashSpill`], [`WatchChanges`] or [`MessageAdmin`] from
//! [`MessageBackend::flash_spill`], [`MessageBackend::change_feed`] or
//! [`MessageBackend::admin`]; without them flash spills stay in process memory, nothing is
//! cached, and the admin's message browser says it is unsupported. A complete, if naive,
//! in-memory backend with none of them:
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::sync::Mutex;
//!
//! use chrono::{DateTime, Utc};
//! use stored_messages::backend::{unique_ids, Cleanup, ListQuery, MessageBackend};
//! use stored_messages::{Error, Level, Message, MessageId, NewMessage, Result, UserId};
//!
//! #[derive(Default)]
//! struct Memory {
//!     messages: Mutex<BTreeMap<i64, Message>>,
//!     // (user, message id) -> unread?
//!     deliveries: Mutex<BTreeMap<(i64, i64), bool>>,
//! }
//!
//! impl Memory {
//!     fn listed(&self, user: UserId, unread_only: bool, newest_first: bool, q: ListQuery) -> Vec<Message> {
//!         let messages = self.messages.lock().unwrap();
//!         let deliveries = self.deliveries.lock().unwrap();
//!         let mut list: Vec<Message> = deliveries
//!             .iter()
//!             .filter(|((u, _), unread)| *u == user.0 && (**unread || !unread_only))
//!             .filter_map(|((_, id), _)| messages.get(id).cloned())
//!             .collect();
//!         list.sort_by_key(|m| (m.date, m.id));
//!         if newest_first {
//!             list.reverse();
//!         }
//!         let start = q.after.map_or(0, |c| {
//!             list.iter().position(|m| if newest_first { (m.date, m.id) < (c.date, c.id) } else { (m.date, m.id) > (c.date, c.id) }).unwrap_or(list.len())
//!         });
//!         list.into_iter().skip(start).take(q.limit.map_or(usize::MAX, |l| l as usize)).collect()
//!     }
//! }
//!
//! #[rocket::async_trait]
//! impl MessageBackend for Memory {
//!     fn name(&self) -> &'static str { "memory" }
//!     fn can_handle(&self, level: Level) -> bool { Level::STORED.contains(&level) }
//!     async fn create_message(&self, new: &NewMessage) -> Result<Message> {
//!         if !self.can_handle(new.level()) { return Err(Error::MessageTypeNotSupported(new.level())); }
//!         let mut messages = self.messages.lock().unwrap();
//!         let id = messages.keys().next_back().map_or(1, |k| k + 1);
//!         let message = new.clone().into_message(MessageId(id));
//!         messages.insert(id, message.clone());
//!         Ok(message)
//!     }
//!     async fn archive_store(&self, users: &[UserId], m: &Message) -> Result<u64> {
//!         let mut d = self.deliveries.lock().unwrap();
//!         Ok(unique_ids(users).into_iter().filter(|u| {
//!             let fresh = !d.contains_key(&(*u, m.id.0));
//!             if fresh { d.insert((*u, m.id.0), false); }
//!             fresh
//!         }).count() as u64)
//!     }
//!     async fn inbox_store(&self, users: &[UserId], m: &Message) -> Result<u64> {
//!         let mut d = self.deliveries.lock().unwrap();
//!         Ok(unique_ids(users).into_iter().filter(|u| d.insert((*u, m.id.0), true) != Some(true)).count() as u64)
//!     }
//!     async fn deliver_once(&self, users: &[UserId], m: &Message) -> Result<u64> {
//!         let mut d = self.deliveries.lock().unwrap();
//!         Ok(unique_ids(users).into_iter().filter(|u| {
//!             let fresh = !d.contains_key(&(*u, m.id.0));
//!             if fresh { d.insert((*u, m.id.0), true); }
//!             fresh
//!         }).count() as u64)
//!     }
//!     async fn deliver(&self, users: &[UserId], new: &NewMessage) -> Result<Message> {
//!         let m = self.create_message(new).await?;
//!         self.inbox_store(users, &m).await?;
//!         Ok(m)
//!     }
//!     async fn inbox_list(&self, user: UserId, q: ListQuery) -> Result<Vec<Message>> {
//!         Ok(self.listed(user, true, false, q))
//!     }
//!     async fn inbox_count(&self, user: UserId) -> Result<u64> {
//!         Ok(self.listed(user, true, false, ListQuery::ALL).len() as u64)
//!     }
//!     async fn inbox_get(&self, user: UserId, id: MessageId) -> Result<Message> {
//!         self.listed(user, true, false, ListQuery::ALL).into_iter().find(|m| m.id == id)
//!             .ok_or(Error::MessageDoesNotExist(id))
//!     }
//!     async fn inbox_delete(&self, user: UserId, id: MessageId) -> Result<()> {
//!         match self.deliveries.lock().unwrap().get_mut(&(user.0, id.0)) {
//!             Some(unread) if *unread => { *unread = false; Ok(()) }
//!             _ => Err(Error::MessageDoesNotExist(id)),
//!         }
//!     }
//!     async fn inbox_delete_many(&self, user: UserId, ids: &[MessageId]) -> Result<Vec<MessageId>> {
//!         let mut read = Vec::new();
//!         for id in ids {
//!             if self.inbox_delete(user, *id).await.is_ok() { read.push(*id); }
//!         }
//!         Ok(read)
//!     }
//!     async fn inbox_purge(&self, user: UserId) -> Result<u64> {
//!         let mut d = self.deliveries.lock().unwrap();
//!         let mut n = 0;
//!         for ((u, _), unread) in d.iter_mut() {
//!             if *u == user.0 && *unread { *unread = false; n += 1; }
//!         }
//!         Ok(n)
//!     }
//!     async fn archive_list(&self, user: UserId, q: ListQuery) -> Result<Vec<Message>> {
//!         Ok(self.listed(user, false, true, q))
//!     }
//!     async fn expired_messages_cleanup(&self, _now: DateTime<Utc>) -> Result<Cleanup> {
//!         Ok(Cleanup::default()) // this toy keeps everything
//!     }
//!     async fn flush(&self) -> Result<()> {
//!         self.messages.lock().unwrap().clear();
//!         self.deliveries.lock().unwrap().clear();
//!         Ok(())
//!     }
//! }
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]

#[macro_use]
extern crate rocket;

pub mod api;
pub mod backend;
pub mod changes;
pub mod config;
pub mod csrf;
mod error;
mod events;
mod fairing;
pub mod flash;
mod host;
mod level;
pub mod live;
mod message;
mod ops;
mod redirect;
mod request;
mod secret_url;
pub mod template;

#[cfg(feature = "redis")]
pub use crate::backend::RedisBackend;
pub use crate::backend::{
    Cleanup, Cursor, FlashSpill, ListQuery, MessageAdmin, MessageBackend, MessageStats,
    WatchChanges,
};
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use crate::backend::{SqlBackend, SqlPool};
pub use crate::changes::{Change, ChangeFeed, ChangeReceiver};
pub use crate::config::Config;
pub use crate::csrf::CsrfToken;
pub use crate::error::{error_body, report, BoxError, Error, Printable, Result};
pub use crate::events::{Event, Events};
pub use crate::fairing::StoredMessages;
pub use crate::host::Host;
pub use crate::level::{Level, UnknownLevel};
pub use crate::message::{
    parse_extra_tags, parse_url, InvalidMessage, LevelTags, Message, MessageId, NewMessage, UserId,
    MAX_EXTRA_TAGS_CHARS, MAX_TEXT_CHARS, MAX_URL_CHARS,
};
pub use crate::ops::{Delivery, Store};
pub use crate::redirect::local_path;
pub use crate::request::{
    request_start, Messages, StreamMessage, LONG_TEXT_CHARS, MAX_STREAM_STORED, OVERFLOW_NOTICE,
};
