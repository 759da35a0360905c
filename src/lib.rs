//! # stored-messages
//!
//! Crate docs are completed below.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod backend;
pub mod config;
mod error;
mod events;
mod host;
mod level;
mod message;
mod ops;

pub mod app;

pub use crate::backend::{
    Cleanup, Cursor, ListQuery, MessageBackend, RedisBackend, SqlBackend, SqlPool,
};
pub use crate::config::Config;
pub use crate::error::{error_body, report, BoxError, Error, Result};
pub use crate::events::{Event, Events};
pub use crate::host::Host;
pub use crate::level::Level;
pub use crate::message::{
    LevelTags, Message, MessageId, NewMessage, UserId, MAX_EXTRA_TAGS_CHARS, MAX_TEXT_CHARS,
    MAX_URL_CHARS,
};
pub use crate::ops::{Delivery, Store};
