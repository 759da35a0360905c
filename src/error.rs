//! The crate's error type and the one place that maps errors to HTTP.
//!
//! Every JSON error has the shape `{"error": {"status": 404, "code": "not_found",
//! "message": "…"}}`. Internal failures answer with a generic message; their detail goes to
//! the log, never to the client.

use rocket::http::Status;
use rocket::serde::json::{json, Value};

use crate::backend::error::BackendError;
use crate::level::{Level, UnknownLevel};
use crate::message::{InvalidMessage, MessageId};

pub use crate::backend::error::BoxError;

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A text as an error message quotes it: control characters are written as `\u{…}`
/// escapes, so that a terminal or a page shows them as text instead of obeying them (an
/// escape sequence in a refused url must not recolour the terminal that prints the error).
/// Everything else is written as it is.
///
/// ```
/// assert_eq!(stored_messages::Printable("a\u{1b}[2Jb").to_string(), "a\\u{1b}[2Jb");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Printable<'a>(pub &'a str);

impl std::fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_unicode())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// Everything that can go wrong in stored-messages.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The backend does not store messages of this level (it is not in `store_levels`).
    #[error("level {0} is not a store level")]
    MessageTypeNotSupported(Level),
    /// No such message for this user (unknown id, another user's message, or not in the
    /// inbox any more).
    #[error("message {0} does not exist")]
    MessageDoesNotExist(MessageId),
    /// An id that is not a positive decimal integer (its first 40 characters).
    #[error("malformed message id \"{}\"", Printable(.0))]
    MessageIdMalformed(String),
    /// A level that is neither an integer nor one of the ten names (its first 40
    /// characters).
    #[error("unknown level \"{}\"", Printable(.0))]
    UnknownLevel(String),
    /// Message text that is empty or only whitespace.
    #[error("message text is empty")]
    EmptyMessage,
    /// Message text with control characters other than line breaks and tabs.
    #[error("message text contains control characters")]
    MessageHasControlCharacters,
    /// Message text over [`crate::MAX_TEXT_CHARS`].
    #[error("message text is {len} characters long, the limit is {max}")]
    MessageTooLong {
        /// Length of the refused text, in characters.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Extra tags over [`crate::MAX_EXTRA_TAGS_CHARS`].
    #[error("extra tags are {len} characters long, the limit is {max}")]
    ExtraTagsTooLong {
        /// Length of the refused tags, in characters.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Extra tags with control characters.
    #[error("extra tags {0:?} contain control characters")]
    InvalidExtraTags(String),
    /// A url that is not `http(s)` or a site-relative path.
    #[error("invalid url \"{}\": {why}", Printable(.url))]
    InvalidUrl {
        /// The refused url.
        url: String,
        /// Why it was refused.
        why: &'static str,
    },
    /// Usernames the host does not know; nothing was sent.
    #[error(
        "unknown user{}: {}",
        if .0.len() == 1 { "" } else { "s" },
        .0.iter().map(|n| Printable(n).to_string()).collect::<Vec<_>>().join(", ")
    )]
    UnknownUsers(Vec<String>),
    /// Configuration that does not validate; every problem is listed, naming its key.
    #[error("invalid configuration: {}", .0.join("; "))]
    Config(Vec<String>),
    /// The backend does not offer this optional operation.
    #[error("this backend does not support {0}")]
    Unsupported(&'static str),
    /// The storage failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The host's user directory failed.
    #[error("user directory failed")]
    Host(#[source] BoxError),
}

impl From<InvalidMessage> for Error {
    fn from(e: InvalidMessage) -> Error {
        match e {
            InvalidMessage::Empty => Error::EmptyMessage,
            InvalidMessage::ControlCharacters => Error::MessageHasControlCharacters,
            InvalidMessage::TooLong { len, max } => Error::MessageTooLong { len, max },
            InvalidMessage::ExtraTagsTooLong { len, max } => Error::ExtraTagsTooLong { len, max },
            InvalidMessage::InvalidExtraTags(tags) => Error::InvalidExtraTags(tags),
            InvalidMessage::InvalidUrl { url, why } => Error::InvalidUrl { url, why },
            InvalidMessage::MalformedId(id) => Error::MessageIdMalformed(id),
        }
    }
}

impl From<UnknownLevel> for Error {
    fn from(e: UnknownLevel) -> Error {
        Error::UnknownLevel(e.0)
    }
}

impl Error {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> Status {
        match self {
            Error::MessageDoesNotExist(_) | Error::MessageIdMalformed(_) => Status::NotFound,
            Error::MessageTypeNotSupported(_)
            | Error::UnknownLevel(_)
            | Error::EmptyMessage
            | Error::MessageHasControlCharacters
            | Error::MessageTooLong { .. }
            | Error::ExtraTagsTooLong { .. }
            | Error::InvalidExtraTags(_)
            | Error::InvalidUrl { .. }
            | Error::UnknownUsers(_) => Status::UnprocessableEntity,
            Error::Backend(e) if e.is_unavailable() => Status::ServiceUnavailable,
            Error::Unsupported(_) => Status::NotImplemented,
            Error::Config(_) | Error::Backend(_) | Error::Host(_) => Status::InternalServerError,
        }
    }

    /// Whether this error is the caller's fault (bad input), as opposed to a failure here.
    pub fn is_bad_input(&self) -> bool {
        self.status().code < 500
    }

    /// The message a client may see: the error itself for bad input, a generic sentence
    /// for internal failures (their detail belongs in the log).
    pub fn public_message(&self) -> String {
        match self.status() {
            Status::ServiceUnavailable => {
                "message storage is unavailable, try again shortly".into()
            }
            s if s.code >= 500 => "internal error".into(),
            _ => self.to_string(),
        }
    }
}

/// The one JSON error body: `{"error": {"status", "code", "message"}}`.
pub fn error_body(status: Status, message: &str) -> Value {
    let code = status
        .reason()
        .unwrap_or("error")
        .to_ascii_lowercase()
        .replace([' ', '-'], "_")
        .replace('\'', "");
    json!({ "error": { "status": status.code, "code": code, "message": message } })
}

/// Formats an error with its chain of causes on one line (`a: b: c`), for logs and the CLI.
pub fn report(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_maps_to_client_statuses() {
        assert_eq!(Error::EmptyMessage.status(), Status::UnprocessableEntity);
        assert_eq!(
            Error::MessageDoesNotExist(MessageId(3)).status(),
            Status::NotFound
        );
        assert_eq!(
            Error::MessageIdMalformed("x".into()).status(),
            Status::NotFound
        );
        assert!(Error::UnknownLevel("x".into()).is_bad_input());
        assert_eq!(
            Error::UnknownUsers(vec!["a".into(), "b".into()]).to_string(),
            "unknown users: a, b"
        );
    }

    #[test]
    fn error_body_has_one_shape() {
        let body = error_body(Status::NotFound, "message 3 does not exist");
        assert_eq!(body["error"]["status"], 404);
        assert_eq!(body["error"]["code"], "not_found");
        assert_eq!(body["error"]["message"], "message 3 does not exist");
        let body = error_body(Status::UnprocessableEntity, "x");
        assert_eq!(body["error"]["code"], "unprocessable_entity");
    }
}
