//! # stored-messages
//!
//! Crate docs are completed below.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

#[macro_use]
extern crate rocket;

pub mod backend;
pub mod config;
pub mod csrf;
mod error;
mod events;
mod fairing;
pub mod flash;
mod host;
mod level;
mod message;
mod ops;
mod request;
pub mod template;

pub mod app;
pub mod cli;

pub use crate::backend::{Cleanup, Cursor, ListQuery, MessageBackend, SqlBackend, SqlPool};
pub use crate::config::Config;
pub use crate::csrf::CsrfToken;
pub use crate::error::{error_body, report, BoxError, Error, Result};
pub use crate::events::{Event, Events};
pub use crate::fairing::StoredMessages;
pub use crate::host::Host;
pub use crate::level::Level;
pub use crate::message::{
    LevelTags, Message, MessageId, NewMessage, UserId, MAX_EXTRA_TAGS_CHARS, MAX_TEXT_CHARS,
    MAX_URL_CHARS,
};
pub use crate::ops::{Delivery, Store};
pub use crate::request::{Messages, StreamMessage, MAX_STREAM_STORED};
