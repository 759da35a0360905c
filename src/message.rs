//! Messages: validated input ([`NewMessage`]), stored messages ([`Message`]), ids and tags.
//!
//! Text, extra tags and urls are checked once, when a [`NewMessage`] is parsed; everything
//! downstream (backends, handlers, templates) takes the typed value and trusts it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};

use crate::level::Level;

/// At most this many unread stored messages are loaded into one request's stream; the rest
/// wait, unread, for the next page.
pub const MAX_STREAM_STORED: u32 = 100;

/// Longest message text accepted, in characters (Unicode scalar values).
pub const MAX_TEXT_CHARS: usize = 4000;
/// Longest extra tags accepted, in characters.
pub const MAX_EXTRA_TAGS_CHARS: usize = 255;
/// Longest url accepted, in characters.
pub const MAX_URL_CHARS: usize = 2048;

/// The id of a stored message. It is a string in JSON (`"42"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(pub i64);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for MessageId {
    type Err = InvalidMessage;

    /// Parses a decimal id; anything else is [`InvalidMessage::MalformedId`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<i64>() {
            Ok(id) if id > 0 && !s.starts_with('+') => Ok(MessageId(id)),
            _ => Err(InvalidMessage::MalformedId(crate::request::summary(s))),
        }
    }
}

/// Why a message (or its id) is not valid. Each variant says which value and why; the
/// crate's [`crate::Error`] wraps them under the same names (`InvalidMessage::TooLong` is
/// `Error::MessageTooLong`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidMessage {
    /// The text is empty or only whitespace.
    #[error("message text is empty")]
    Empty,
    /// The text is longer than [`MAX_TEXT_CHARS`].
    #[error("message text is {len} characters long, the limit is {max}")]
    TooLong {
        /// Its length in characters.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The text holds control characters other than line breaks and tabs (ESC, BEL, …),
    /// which would reach terminals and logs as commands.
    #[error("message text contains control characters")]
    ControlCharacters,
    /// The extra tags are longer than [`MAX_EXTRA_TAGS_CHARS`].
    #[error("extra tags are {len} characters long, the limit is {max}")]
    ExtraTagsTooLong {
        /// Their length in characters.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The extra tags hold control characters (the value is their first 40 characters).
    #[error("extra tags {0:?} contain control characters")]
    InvalidExtraTags(String),
    /// The url is not an `http(s)` url with a host or a site-relative path.
    #[error("invalid url \"{}\": {why}", crate::error::Printable(.url))]
    InvalidUrl {
        /// The url given (its first 40 characters, with `…` if it was longer).
        url: String,
        /// Why it was refused.
        why: &'static str,
    },
    /// An id that is not a positive decimal integer (its first 40 characters).
    #[error("malformed message id \"{}\"", crate::error::Printable(.0))]
    MalformedId(String),
}

impl Serialize for MessageId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

/// The id of a user, as the host application knows it.
///
/// The library does not own users: the host tells it who the current user is and which users
/// exist (see [`crate::Host`]). Ids are integers so that a broadcast to a million users moves
/// eight bytes per recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(pub i64);

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A message that passed validation and is ready to be stored or queued.
///
/// Its text is non-empty and at most [`MAX_TEXT_CHARS`] long, its extra tags are
/// space-separated tokens of at most [`MAX_EXTRA_TAGS_CHARS`] in all, and its url, if any, is
/// an `http(s)` url or a site-relative path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewMessage {
    level: Level,
    message: String,
    extra_tags: String,
    url: Option<String>,
    date: DateTime<Utc>,
}

impl NewMessage {
    /// Validates a message dated now, without extra tags or url.
    ///
    /// # Errors
    ///
    /// See [`NewMessage::parse`].
    pub fn new(level: Level, message: &str) -> Result<NewMessage, InvalidMessage> {
        NewMessage::parse(level, message, "", None, None)
    }

    /// Validates every part of a message. `date` defaults to now; it is kept to the
    /// microsecond, the precision every backend stores.
    ///
    /// # Errors
    ///
    /// [`InvalidMessage`] naming the offending value: `Empty`, `ControlCharacters`,
    /// `TooLong`, `ExtraTagsTooLong`, `InvalidExtraTags` or `InvalidUrl`.
    pub fn parse(
        level: Level,
        message: &str,
        extra_tags: &str,
        url: Option<&str>,
        date: Option<DateTime<Utc>>,
    ) -> Result<NewMessage, InvalidMessage> {
        if message.trim().is_empty() {
            return Err(InvalidMessage::Empty);
        }
        if message
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        {
            return Err(InvalidMessage::ControlCharacters);
        }
        let len = message.chars().count();
        if len > MAX_TEXT_CHARS {
            return Err(InvalidMessage::TooLong {
                len,
                max: MAX_TEXT_CHARS,
            });
        }
        let extra_tags = parse_extra_tags(extra_tags)?;
        let url = match url.map(str::trim) {
            None | Some("") => None,
            Some(url) => Some(parse_url(url)?),
        };
        let date = date.unwrap_or_else(Utc::now).trunc_subsecs(6);
        Ok(NewMessage {
            level,
            message: message.to_string(),
            extra_tags,
            url,
            date,
        })
    }

    /// The level.
    pub fn level(&self) -> Level {
        self.level
    }

    /// The text.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The extra tags, space separated (may be empty).
    pub fn extra_tags(&self) -> &str {
        &self.extra_tags
    }

    /// The url, if any.
    pub fn url(&self) -> Option<&str> {
        self.url.as_deref()
    }

    /// When the message was created (UTC, microsecond precision).
    pub fn date(&self) -> DateTime<Utc> {
        self.date
    }

    /// The stored message this becomes once a backend gave it an id.
    pub fn into_message(self, id: MessageId) -> Message {
        Message {
            id,
            level: self.level,
            message: self.message,
            extra_tags: self.extra_tags,
            url: self.url,
            date: self.date,
        }
    }
}

/// A stored message, as backends return it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Unique per backend.
    pub id: MessageId,
    /// The level.
    pub level: Level,
    /// The text (unescaped: templates escape it).
    pub message: String,
    /// Space-separated extra tags, possibly empty.
    pub extra_tags: String,
    /// A link for the message: `http(s)` or site-relative.
    pub url: Option<String>,
    /// When it was created, UTC.
    pub date: DateTime<Utc>,
}

impl Message {
    /// The level tag under `tags` (`"stored info"` by default).
    pub fn level_tag<'a>(&self, tags: &'a LevelTags) -> &'a str {
        tags.tag(self.level)
    }

    /// Extra tags then the level tag, space separated, as Django builds `tags`.
    pub fn tags(&self, tags: &LevelTags) -> String {
        join_tags(&self.extra_tags, self.level_tag(tags))
    }
}

/// `extra` and `level_tag`, space separated, skipping whichever is empty.
pub(crate) fn join_tags(extra: &str, level_tag: &str) -> String {
    match (extra.is_empty(), level_tag.is_empty()) {
        (true, _) => level_tag.to_string(),
        (false, true) => extra.to_string(),
        (false, false) => format!("{extra} {level_tag}"),
    }
}

/// Level tags: the defaults of [`Level::default_tag`] with configured overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LevelTags {
    overrides: BTreeMap<Level, String>,
}

impl LevelTags {
    /// Tags with these overrides on top of the defaults.
    pub fn new(overrides: BTreeMap<Level, String>) -> LevelTags {
        LevelTags { overrides }
    }

    /// The tag of `level`; empty for a custom level without an override.
    pub fn tag(&self, level: Level) -> &str {
        self.overrides
            .get(&level)
            .map(String::as_str)
            .unwrap_or(level.default_tag())
    }
}

/// Checks and normalizes extra tags as [`NewMessage::parse`] does (whitespace-separated
/// words, at most [`MAX_EXTRA_TAGS_CHARS`], no control characters), for forms that report
/// each field's error on its own.
///
/// # Errors
///
/// [`InvalidMessage::InvalidExtraTags`] or [`InvalidMessage::ExtraTagsTooLong`].
pub fn parse_extra_tags(raw: &str) -> Result<String, InvalidMessage> {
    if raw.chars().any(|c| c.is_control() && !c.is_whitespace()) {
        return Err(InvalidMessage::InvalidExtraTags(crate::request::summary(
            raw,
        )));
    }
    let tags = raw.split_whitespace().collect::<Vec<_>>().join(" ");
    let len = tags.chars().count();
    if len > MAX_EXTRA_TAGS_CHARS {
        return Err(InvalidMessage::ExtraTagsTooLong {
            len,
            max: MAX_EXTRA_TAGS_CHARS,
        });
    }
    Ok(tags)
}

/// Accepts an absolute `http`/`https` url with a host, or a site-relative path (`/inbox`).
///
/// Protocol-relative urls (`//evil.example`) and backslashes are refused: browsers treat
/// both as links to another site. [`NewMessage::parse`] applies the same check.
///
/// # Errors
///
/// [`InvalidMessage::InvalidUrl`], saying why.
pub fn parse_url(raw: &str) -> Result<String, InvalidMessage> {
    let invalid = |why: &'static str| InvalidMessage::InvalidUrl {
        url: crate::request::summary(raw),
        why,
    };
    if raw.chars().count() > MAX_URL_CHARS {
        return Err(invalid("longer than 2048 characters"));
    }
    if raw
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == '\\')
    {
        return Err(invalid(
            "contains spaces, control characters or backslashes",
        ));
    }
    if raw.starts_with('/') {
        if raw.starts_with("//") {
            return Err(invalid("protocol-relative urls point to another site"));
        }
        return Ok(raw.to_string());
    }
    let parsed = url::Url::parse(raw).map_err(|_| invalid("not an http(s) url or a path"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid(
            "only http, https and site-relative urls are allowed",
        ));
    }
    if parsed.host_str().map_or(true, str::is_empty) {
        return Err(invalid("an http(s) url needs a host"));
    }
    Ok(parsed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_join_extra_and_level_tag_like_django() {
        let tags = LevelTags::default();
        let mut m = NewMessage::parse(Level::STORED_INFO, "hi", "  a   b ", None, None)
            .unwrap()
            .into_message(MessageId(1));
        assert_eq!(m.extra_tags, "a b");
        assert_eq!(m.tags(&tags), "a b stored info");
        m.extra_tags.clear();
        assert_eq!(m.tags(&tags), "stored info");
        m.level = Level(3);
        assert_eq!(m.tags(&tags), "");
        let custom = LevelTags::new([(Level(3), "custom".to_string())].into());
        assert_eq!(m.tags(&custom), "custom");
    }

    #[test]
    fn text_may_hold_line_breaks_and_tabs_but_no_other_control_characters() {
        assert!(NewMessage::new(Level::INFO, "two\r\nlines\tand a tab").is_ok());
        for bad in [
            "\u{1b}]0;pwned\u{7}",
            "bell \u{7}",
            "nul \0",
            "del \u{7f}",
            "c1 \u{9b}",
        ] {
            assert_eq!(
                NewMessage::new(Level::INFO, bad).unwrap_err(),
                InvalidMessage::ControlCharacters,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn text_must_be_present_and_within_the_limit() {
        assert!(matches!(
            NewMessage::new(Level::INFO, ""),
            Err(InvalidMessage::Empty)
        ));
        assert!(matches!(
            NewMessage::new(Level::INFO, " \n\t"),
            Err(InvalidMessage::Empty)
        ));
        let long = "❤".repeat(MAX_TEXT_CHARS);
        assert!(NewMessage::new(Level::INFO, &long).is_ok());
        let longer = format!("{long}x");
        let err = NewMessage::new(Level::INFO, &longer).unwrap_err();
        assert_eq!(
            err.to_string(),
            "message text is 4001 characters long, the limit is 4000"
        );
    }

    #[test]
    fn errors_quote_at_most_forty_characters_of_the_bad_value() {
        let long = "x".repeat(100_000);
        let short = |e: &dyn std::fmt::Display| {
            let text = e.to_string();
            assert!(text.contains(&format!("{}…", "x".repeat(40))), "{text:.80}");
            assert!(text.chars().count() < 120, "{text:.80}");
        };
        short(&long.parse::<MessageId>().unwrap_err());
        short(&long.parse::<Level>().unwrap_err());
        short(&parse_url(&long).unwrap_err());
        short(&parse_extra_tags(&format!("{long}\u{7}")).unwrap_err());
        // Short values are quoted whole.
        assert_eq!(
            "12a".parse::<MessageId>().unwrap_err().to_string(),
            "malformed message id \"12a\""
        );
    }

    #[test]
    fn urls_are_http_or_site_relative() {
        for ok in [
            "/inbox",
            "/a?b=c#d",
            "http://example.com",
            "https://example.com/x?y=1",
        ] {
            assert!(parse_url(ok).is_ok(), "{ok} should be accepted");
        }
        for bad in [
            "javascript:alert(1)",
            "JavaScript:alert(1)",
            "data:text/html,x",
            "//evil.example",
            "/\\evil.example",
            "http://",
            "ftp://example.com",
            "relative/path",
            "/has space",
            "java\nscript:alert(1)",
        ] {
            assert!(parse_url(bad).is_err(), "{bad:?} should be refused");
        }
        let err = parse_url("javascript:alert(1)").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid url \"javascript:alert(1)\""),
            "{err}"
        );
    }

    #[test]
    fn message_ids_parse_strictly() {
        assert_eq!("42".parse::<MessageId>().unwrap(), MessageId(42));
        for bad in ["", "0", "-1", "+4", "4x", "99999999999999999999", "abc"] {
            assert!(bad.parse::<MessageId>().is_err(), "{bad:?}");
        }
        let json = serde_json::to_string(&MessageId(7)).unwrap();
        assert_eq!(json, "\"7\"");
    }

    #[test]
    fn dates_keep_microseconds() {
        let date = "2026-01-02T03:04:05.123456789Z".parse().unwrap();
        let m = NewMessage::parse(Level::INFO, "x", "", None, Some(date)).unwrap();
        assert_eq!(m.date().to_rfc3339(), "2026-01-02T03:04:05.123456+00:00");
    }
}
