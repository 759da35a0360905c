//! Message levels: an open integer newtype with the ten named levels.
//!
//! The values are Django's (`DEBUG` 10 … `ERROR` 40) and their stored variants are one higher,
//! as in django-stored-messages. Any other integer is a valid custom level; it simply has no
//! default level tag.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A message level. Higher is more important.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Level(pub i32);

impl Level {
    /// Development detail (10).
    pub const DEBUG: Level = Level(10);
    /// Informational (20).
    pub const INFO: Level = Level(20);
    /// An action succeeded (25).
    pub const SUCCESS: Level = Level(25);
    /// Something to look at (30).
    pub const WARNING: Level = Level(30);
    /// An action failed (40).
    pub const ERROR: Level = Level(40);
    /// Persisted variant of [`Level::DEBUG`] (11).
    pub const STORED_DEBUG: Level = Level(11);
    /// Persisted variant of [`Level::INFO`] (21).
    pub const STORED_INFO: Level = Level(21);
    /// Persisted variant of [`Level::SUCCESS`] (26).
    pub const STORED_SUCCESS: Level = Level(26);
    /// Persisted variant of [`Level::WARNING`] (31).
    pub const STORED_WARNING: Level = Level(31);
    /// Persisted variant of [`Level::ERROR`] (41).
    pub const STORED_ERROR: Level = Level(41);

    /// The ten named levels with their names, in ascending order of value.
    pub const NAMED: [(&'static str, Level); 10] = [
        ("debug", Level::DEBUG),
        ("stored_debug", Level::STORED_DEBUG),
        ("info", Level::INFO),
        ("stored_info", Level::STORED_INFO),
        ("success", Level::SUCCESS),
        ("stored_success", Level::STORED_SUCCESS),
        ("warning", Level::WARNING),
        ("stored_warning", Level::STORED_WARNING),
        ("error", Level::ERROR),
        ("stored_error", Level::STORED_ERROR),
    ];

    /// The five stored levels, the default `store_levels`.
    pub const STORED: [Level; 5] = [
        Level::STORED_DEBUG,
        Level::STORED_INFO,
        Level::STORED_SUCCESS,
        Level::STORED_WARNING,
        Level::STORED_ERROR,
    ];

    /// The integer value.
    pub const fn value(self) -> i32 {
        self.0
    }

    /// The name of a named level (`"stored_info"`), `None` for a custom level.
    pub fn name(self) -> Option<&'static str> {
        Self::NAMED
            .iter()
            .find(|(_, l)| *l == self)
            .map(|(n, _)| *n)
    }

    /// The default level tag: `info`, `stored info`, …; empty for a custom level.
    pub fn default_tag(self) -> &'static str {
        match self.0 {
            10 => "debug",
            20 => "info",
            25 => "success",
            30 => "warning",
            40 => "error",
            11 => "stored debug",
            21 => "stored info",
            26 => "stored success",
            31 => "stored warning",
            41 => "stored error",
            _ => "",
        }
    }

    /// The level in a word people read on a page: `"Info"` for both INFO and STORED_INFO,
    /// `"Debug"`, `"Success"`, `"Warning"`, `"Error"`; `"Message"` for a custom level.
    ///
    /// Level tags are for CSS classes and may be anything a host configures; this is what
    /// the shipped templates print.
    pub fn label(self) -> &'static str {
        match self.0 {
            10 | 11 => "Debug",
            20 | 21 => "Info",
            25 | 26 => "Success",
            30 | 31 => "Warning",
            40 | 41 => "Error",
            _ => "Message",
        }
    }

    /// Whether this is one of the five default stored levels (11, 21, 26, 31, 41).
    ///
    /// Which levels are actually persisted is the `store_levels` setting; this only tells
    /// the named stored variants apart.
    pub fn is_stored(self) -> bool {
        Self::STORED.contains(&self)
    }

    /// Parses a level from an integer (`"21"`) or a name (`"stored_info"`, `"Stored Info"`,
    /// `"STORED-INFO"`).
    ///
    /// # Errors
    ///
    /// [`UnknownLevel`] naming the input when it is neither.
    pub fn parse(input: &str) -> Result<Level, UnknownLevel> {
        let trimmed = input.trim();
        if let Ok(value) = trimmed.parse::<i32>() {
            return Ok(Level(value));
        }
        let normalized: String = trimmed
            .chars()
            .map(|c| match c {
                ' ' | '-' => '_',
                c => c.to_ascii_lowercase(),
            })
            .collect();
        Self::NAMED
            .iter()
            .find(|(name, _)| *name == normalized)
            .map(|(_, level)| *level)
            .ok_or_else(|| UnknownLevel(crate::request::summary(input)))
    }
}

/// A level that is neither an integer nor a level's name (wrapped by
/// [`crate::Error::UnknownLevel`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown level \"{}\"", crate::error::Printable(.0))]
pub struct UnknownLevel(pub String);

impl FromStr for Level {
    type Err = UnknownLevel;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Level::parse(s)
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} ({})", self.0),
            None => write!(f, "{}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_integers_parse() {
        assert_eq!(Level::parse("stored_error").unwrap(), Level::STORED_ERROR);
        assert_eq!(Level::parse("Stored Info").unwrap(), Level::STORED_INFO);
        assert_eq!(Level::parse("WARNING").unwrap(), Level::WARNING);
        assert_eq!(Level::parse(" 77 ").unwrap(), Level(77));
        assert_eq!(Level::parse("-3").unwrap(), Level(-3));
    }

    #[test]
    fn unknown_names_are_named_in_the_error() {
        let err = Level::parse("urgent").unwrap_err();
        assert_eq!(err.to_string(), "unknown level \"urgent\"");
        assert!(Level::parse("").is_err());
        assert!(Level::parse("2.5").is_err());
    }

    #[test]
    fn stored_levels_are_one_above_their_plain_level() {
        for (plain, stored) in [
            (Level::DEBUG, Level::STORED_DEBUG),
            (Level::INFO, Level::STORED_INFO),
            (Level::SUCCESS, Level::STORED_SUCCESS),
            (Level::WARNING, Level::STORED_WARNING),
            (Level::ERROR, Level::STORED_ERROR),
        ] {
            assert_eq!(plain.0 + 1, stored.0);
            assert!(stored.is_stored());
            assert!(!plain.is_stored());
            assert_eq!(
                stored.default_tag(),
                format!("stored {}", plain.default_tag())
            );
        }
        assert_eq!(Level(99).default_tag(), "");
    }
}
