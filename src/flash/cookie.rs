//! The flash cookie codec: a queue of messages as compact JSON, split between a private
//! (encrypted) cookie and a server-side spill for what does not fit.
//!
//! A browser keeps about 4 KB per cookie. Encryption adds 28 bytes and base64 a third, so
//! the plaintext budget is [`COOKIE_BUDGET`] bytes; the queue's oldest messages go in the
//! cookie and the rest, in order, go to the spill (see [`super::overflow`]).

use chrono::{DateTime, Utc};

use crate::level::Level;
use crate::message::NewMessage;

/// The private cookie holding the first flash messages.
pub const FLASH_COOKIE: &str = "sm_flash";
/// The private cookie holding the key of the server-side spill, when there is one.
pub const SPILL_COOKIE: &str = "sm_flash_spill";
/// Rocket's own flash cookie, read so `Flash<R>` responses join the stream.
pub const ROCKET_FLASH_COOKIE: &str = "_flash";
/// Most plaintext bytes put in [`FLASH_COOKIE`]: 2900 bytes encrypt and encode to 3904,
/// leaving room for the name and attributes under the usual 4096-byte limit.
pub const COOKIE_BUDGET: usize = 2900;

/// One queued message as stored: `[level, text, extra_tags, url, date_us]`.
type Wire = (i32, String, String, Option<String>, i64);

fn to_wire(m: &NewMessage) -> Wire {
    (
        m.level().0,
        m.message().to_string(),
        m.extra_tags().to_string(),
        m.url().map(str::to_string),
        m.date().timestamp_micros(),
    )
}

fn from_wire((level, text, tags, url, date_us): Wire) -> Option<NewMessage> {
    let date = DateTime::<Utc>::from_timestamp_micros(date_us)?;
    // Validated again: a cookie written by an older version must not smuggle in what the
    // current rules refuse.
    NewMessage::parse(Level(level), &text, &tags, url.as_deref(), Some(date)).ok()
}

/// Encodes a queue as a JSON array.
pub fn encode(messages: &[NewMessage]) -> String {
    let wire: Vec<Wire> = messages.iter().map(to_wire).collect();
    serde_json::to_string(&wire).unwrap_or_else(|_| "[]".to_string())
}

/// Where the newest messages of `messages` that [`encode`] into at most `max` bytes start
/// (`messages.len() - 1` at the latest: the newest message is always kept).
pub fn newest_within(messages: &[NewMessage], max: usize) -> usize {
    // `[a,b,c]`: the brackets, each message, a comma between two.
    let mut size = 2;
    for (i, message) in messages.iter().enumerate().rev() {
        let item = serde_json::to_string(&to_wire(message)).map_or(0, |t| t.len());
        let comma = usize::from(i + 1 < messages.len());
        if size + item + comma > max && i + 1 < messages.len() {
            return i + 1;
        }
        size += item + comma;
    }
    0
}

/// Decodes a queue; anything malformed (or invalid entries) decodes to nothing rather than
/// an error: a bad cookie is treated as empty.
pub fn decode(raw: &str) -> Vec<NewMessage> {
    match serde_json::from_str::<Vec<Wire>>(raw) {
        Ok(wire) => wire.into_iter().filter_map(from_wire).collect(),
        Err(e) => {
            log::debug!("stored-messages: ignoring malformed flash data: {e}");
            Vec::new()
        }
    }
}

/// Splits a queue into what goes in the cookie (an encoded prefix within
/// [`COOKIE_BUDGET`], or `None` when the queue is empty) and the rest, in order.
pub fn split(messages: &[NewMessage]) -> (Option<String>, &[NewMessage]) {
    if messages.is_empty() {
        return (None, messages);
    }
    // Grow the prefix while it fits: each entry's encoded length plus a comma.
    let mut size = 2;
    let mut fit = 0;
    for m in messages {
        let entry = serde_json::to_string(&to_wire(m)).map_or(usize::MAX, |s| s.len());
        let extra = entry.saturating_add(usize::from(fit > 0));
        if size + extra > COOKIE_BUDGET {
            break;
        }
        size += extra;
        fit += 1;
    }
    let cookie = (fit > 0).then(|| encode(&messages[..fit]));
    (cookie, &messages[fit..])
}

/// Parses Rocket's `_flash` cookie (`"<kind length>:<kind><message>"`) into a message: kind
/// `success`/`warning`/`error` give that level, anything else INFO. Malformed values give
/// `None`; unlike Rocket's own parser this never panics on a length that splits a character.
pub fn parse_rocket_flash(raw: &str, date: DateTime<Utc>) -> Option<NewMessage> {
    let (len, rest) = raw.split_once(':')?;
    let len: usize = len.parse().ok()?;
    let kind = rest.get(..len)?;
    let text = rest.get(len..)?;
    let level = match kind {
        "success" => Level::SUCCESS,
        "warning" => Level::WARNING,
        "error" => Level::ERROR,
        _ => Level::INFO,
    };
    NewMessage::parse(level, text, "", None, Some(date)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(text: &str) -> NewMessage {
        NewMessage::parse(Level::INFO, text, "a b", Some("/x"), None).unwrap()
    }

    #[test]
    fn queues_round_trip() {
        let queue = vec![msg("one"), msg("two ❤"), msg("<b>three</b>")];
        assert_eq!(decode(&encode(&queue)), queue);
    }

    #[test]
    fn garbage_decodes_to_nothing() {
        for raw in [
            "",
            "nope",
            "{}",
            "[[1]]",
            "[[21,\"\",\"\",null,0]]",
            "[[21,\"x\",\"\",\"javascript:x\",0]]",
        ] {
            assert!(decode(raw).is_empty(), "{raw}");
        }
    }

    #[test]
    fn newest_within_keeps_the_newest_that_fit() {
        let queue: Vec<NewMessage> = (0..50)
            .map(|i| {
                NewMessage::new(Level::INFO, &format!("message {i} {}", "x".repeat(i))).unwrap()
            })
            .collect();
        for max in [0, 10, 100, 1000, 5000, usize::MAX] {
            let from = newest_within(&queue, max);
            assert!(from < queue.len());
            let kept = encode(&queue[from..]).len();
            assert!(kept <= max || from == queue.len() - 1, "max {max}: {kept}");
            if from > 0 {
                assert!(
                    encode(&queue[from - 1..]).len() > max,
                    "max {max}: could keep more"
                );
            }
        }
        assert_eq!(newest_within(&queue, usize::MAX), 0);
    }

    #[test]
    fn split_keeps_order_and_budget() {
        let queue: Vec<NewMessage> = (0..50)
            .map(|i| msg(&format!("{i:02} {}", "x".repeat(300))))
            .collect();
        let (cookie, rest) = split(&queue);
        let cookie = cookie.unwrap();
        assert!(cookie.len() <= COOKIE_BUDGET, "{}", cookie.len());
        let head = decode(&cookie);
        assert!(!head.is_empty() && !rest.is_empty());
        let mut all = head;
        all.extend_from_slice(rest);
        assert_eq!(all, queue);
    }

    #[test]
    fn a_message_larger_than_the_budget_goes_to_the_spill() {
        let queue = vec![msg(&"y".repeat(3500)), msg("small")];
        let (cookie, rest) = split(&queue);
        assert!(cookie.is_none());
        assert_eq!(rest.len(), 2);
        assert_eq!(split(&[]).0, None);
    }

    #[test]
    fn rocket_flash_cookies_parse_without_panicking() {
        let now = Utc::now();
        let m = parse_rocket_flash("7:successSaved!", now).unwrap();
        assert_eq!((m.level(), m.message()), (Level::SUCCESS, "Saved!"));
        assert_eq!(
            parse_rocket_flash("4:noteHi", now).unwrap().level(),
            Level::INFO
        );
        for bad in ["", "x", "9:short", "1:\u{e9}x", "2:okay"] {
            let _ = parse_rocket_flash(bad, now);
        }
        assert!(parse_rocket_flash("1:\u{e9}x", now).is_none());
        assert!(
            parse_rocket_flash("5:error", now).is_none(),
            "empty text is dropped"
        );
    }
}
