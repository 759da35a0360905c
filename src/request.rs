//! The [`Messages`] request guard: add messages, and read the merged stream of flash and
//! stored messages.
//!
//! The guard gathers, the handler phase writes cookies, the fairing settles the database:
//! - on first use in a request, the guard loads the flash queue (cookie, spill, Rocket's
//!   `_flash`) and the user's unread inbox once, into the request-local cache;
//! - every change to the flash queue (adding, showing, `set_used(false)`) rewrites the
//!   cookies at once, while the handler runs, because Rocket copies cookie changes into the
//!   response before response fairings run (and a catcher starts from an empty delta);
//! - the [`crate::StoredMessages`] fairing then writes the spill, and marks read exactly the
//!   stored messages that were shown, and only for a successful response.

use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use rocket::http::{Cookie, CookieJar, SameSite, Status};
use rocket::request::{FromRequest, Outcome};
use rocket::{Ignite, Request, Rocket, Sentinel};
use serde::ser::{Serialize, Serializer};
use unicode_segmentation::UnicodeSegmentation;

use crate::backend::ListQuery;
use crate::error::{Error, Result};
use crate::flash::cookie::{
    decode, encode, newest_within, parse_rocket_flash, split, FLASH_COOKIE, ROCKET_FLASH_COOKIE,
    SPILL_COOKIE,
};
use crate::flash::overflow::{is_valid_key, new_key, MAX_SPILL_BYTES};
use crate::level::Level;
use crate::message::{join_tags, LevelTags, Message, MessageId, NewMessage, UserId};
use crate::ops::Store;

pub use crate::message::MAX_STREAM_STORED;

/// One message of the merged stream, as handlers iterate it and templates see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StreamMessage {
    /// The stored message's id; `None` for a flash message.
    pub id: Option<MessageId>,
    /// Whether it is a stored message (it is marked read once shown).
    pub stored: bool,
    /// The level.
    pub level: Level,
    /// Its level tag (`"stored info"`).
    pub level_tag: String,
    /// The level in a word for people (`"Info"`, see [`Level::label`]).
    pub level_label: &'static str,
    /// Extra tags then the level tag, space separated: use as CSS classes.
    pub tags: String,
    /// Extra tags alone.
    pub extra_tags: String,
    /// The text (templates escape it).
    pub message: String,
    /// A link, `http(s)` or site-relative.
    pub url: Option<String>,
    /// When it was created (RFC 3339 with microseconds in templates and JSON).
    #[serde(serialize_with = "rfc3339_micros")]
    pub date: DateTime<Utc>,
    /// The date for people: `2026-11-25 14:05 UTC`.
    pub date_text: String,
    /// The text cut to 40 characters (with `…`), for labels such as a button's. Characters
    /// as a reader sees them: an emoji or an accented letter is never cut in two.
    pub summary: String,
    /// For a long text (over [`LONG_TEXT_CHARS`] characters): its start, about 200
    /// characters (as [`StreamMessage::summary`] counts them) cut at a space, which the templates show with the rest behind "Show more".
    /// `None` for a text short enough to show whole.
    pub head: Option<String>,
}

/// Texts longer than this (in characters, as [`StreamMessage::summary`] counts them) have
/// a [`StreamMessage::head`].
pub const LONG_TEXT_CHARS: usize = 300;

/// The start of a long text (see [`StreamMessage::head`]).
pub(crate) fn long_head(text: &str) -> Option<&str> {
    // No more code points than that is no more characters: most texts need no lookup.
    text.char_indices().nth(LONG_TEXT_CHARS)?;
    // One pass: the first 200 characters, then whether more than the limit follow.
    let cut = cut_after_characters(text, 200)?;
    cut_after_characters(&text[cut..], LONG_TEXT_CHARS - 200)?;
    let head = &text[..cut];
    Some(match head.rfind(char::is_whitespace) {
        Some(space) if space > cut / 2 => head[..space].trim_end(),
        _ => head,
    })
}

/// Writes `n` into `digits` as exactly `digits.len()` decimal digits (`n` is below
/// `10^digits.len()`).
fn put_digits(digits: &mut [u8], n: u32) {
    let mut rest = n;
    for digit in digits.iter_mut().rev() {
        *digit = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
}

/// The proleptic Gregorian date of a day counted from 1970-01-01: year, month, day. Howard
/// Hinnant's `civil_from_days`: whole 400-year eras, then the year of the era with March as
/// its first month, so that February's varying length comes last.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // days from 0000-03-01
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153; // 0 is March
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month as u32, day as u32)
}

/// What dates are written into: a page being built (`String`) or an API answer's bytes,
/// which take ASCII as it is, without a UTF-8 check.
pub(crate) trait PushAscii {
    /// Appends `text`, which is ASCII.
    fn push_ascii(&mut self, text: &[u8]);
}

impl PushAscii for String {
    fn push_ascii(&mut self, text: &[u8]) {
        // ASCII is valid UTF-8.
        self.push_str(std::str::from_utf8(text).unwrap_or_default());
    }
}

impl PushAscii for Vec<u8> {
    fn push_ascii(&mut self, text: &[u8]) {
        self.extend_from_slice(text);
    }
}

/// `2026-11-25 14:05` then, for `seconds`, `:07.123456`: the digits written directly, from
/// the timestamp, as pages and API answers format every message's date on every request.
fn push_date(out: &mut impl PushAscii, date: DateTime<Utc>, separator: u8, seconds: bool) {
    let timestamp = date.timestamp();
    let (year, month, day) = civil_from_days(timestamp.div_euclid(86_400));
    let of_day = timestamp.rem_euclid(86_400) as u32;
    let mut text = *b"0000-00-00 00:00:00.000000";
    put_digits(&mut text[5..7], month);
    put_digits(&mut text[8..10], day);
    text[10] = separator;
    put_digits(&mut text[11..13], of_day / 3_600);
    put_digits(&mut text[14..16], of_day / 60 % 60);
    let len = if seconds {
        put_digits(&mut text[17..19], of_day % 60);
        // A leap second shows as :59.999999 rather than as an out-of-range :60.
        put_digits(
            &mut text[20..26],
            date.timestamp_subsec_micros().min(999_999),
        );
        26
    } else {
        16
    };
    let text = match u32::try_from(year) {
        Ok(year @ 0..=9_999) => {
            put_digits(&mut text[0..4], year);
            &text[..len]
        }
        // Years of other widths (never seen in practice) carry their sign.
        _ => {
            out.push_ascii(format!("{year:+05}").as_bytes());
            &text[4..len]
        }
    };
    out.push_ascii(text);
}

/// `2026-11-25 14:05 UTC`.
pub(crate) fn date_text(date: DateTime<Utc>) -> String {
    let mut out = String::with_capacity(20);
    push_date_text(&mut out, date);
    out
}

/// Appends [`date_text`].
pub(crate) fn push_date_text(out: &mut String, date: DateTime<Utc>) {
    push_date(out, date, b' ', false);
    out.push_str(" UTC");
}

/// `2026-11-25T14:05:07.123456Z`.
pub(crate) fn rfc3339(date: DateTime<Utc>) -> String {
    let mut out = String::with_capacity(27);
    push_rfc3339(&mut out, date);
    out
}

/// Appends [`rfc3339`].
pub(crate) fn push_rfc3339(out: &mut impl PushAscii, date: DateTime<Utc>) {
    push_date(out, date, b'T', true);
    out.push_ascii(b"Z");
}

fn rfc3339_micros<S: Serializer>(date: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&rfc3339(*date))
}

/// A message's text as a short name (button labels, notices): its words, each run of
/// whitespace (newlines, indents) as one space, then the first 40 characters, with `…`
/// when it was longer.
pub(crate) fn message_summary(text: &str) -> String {
    // Most texts are already single-spaced: no copy for them.
    let plain = !text.starts_with(' ')
        && !text.ends_with(' ')
        && !text.contains("  ")
        && !text.chars().any(|c| c.is_whitespace() && c != ' ');
    if plain {
        return summary(text);
    }
    let words = text.split_whitespace().collect::<Vec<_>>().join(" ");
    summary(&words)
}

/// The first 40 characters of `text` (user-perceived: see [`cut_after_characters`]), with
/// `…` when it was longer.
pub(crate) fn summary(text: &str) -> String {
    match summary_cut(text) {
        (head, true) => format!("{head}…"),
        (head, false) => head.to_string(),
    }
}

/// The first 40 characters of `text`, and whether that cut something off.
pub(crate) fn summary_cut(text: &str) -> (&str, bool) {
    match cut_after_characters(text, 40) {
        Some(cut) => (&text[..cut], true),
        None => (text, false),
    }
}

/// Where `text` ends after its first `n` user-perceived characters (Unicode's extended
/// grapheme clusters: a letter with its accents, a flag, an emoji with its modifiers and
/// joined parts), or `None` when it has no more than `n`. A cut there splits no character
/// a reader sees as one.
pub(crate) fn cut_after_characters(text: &str, n: usize) -> Option<usize> {
    // In ASCII every byte is a character of its own, except CR before LF: when the first
    // n + 1 bytes are ASCII without CR, byte n starts character n + 1 (no lookup needed).
    let probe = &text.as_bytes()[..text.len().min(n + 1)];
    if probe.is_ascii() && !probe.contains(&b'\r') {
        return (text.len() > n).then_some(n);
    }
    text.grapheme_indices(true).nth(n).map(|(i, _)| i)
}

impl StreamMessage {
    fn flash(m: &NewMessage, tags: &LevelTags) -> StreamMessage {
        let level_tag = tags.tag(m.level()).to_string();
        StreamMessage {
            id: None,
            stored: false,
            level: m.level(),
            tags: join_tags(m.extra_tags(), &level_tag),
            level_tag,
            level_label: m.level().label(),
            extra_tags: m.extra_tags().to_string(),
            message: m.message().to_string(),
            url: m.url().map(str::to_string),
            date: m.date(),
            date_text: date_text(m.date()),
            summary: message_summary(m.message()),
            head: long_head(m.message()).map(str::to_string),
        }
    }

    /// The stream form of a stored message.
    pub fn stored(m: &Message, tags: &LevelTags) -> StreamMessage {
        let level_tag = tags.tag(m.level).to_string();
        StreamMessage {
            id: Some(m.id),
            stored: true,
            level: m.level,
            tags: join_tags(&m.extra_tags, &level_tag),
            level_tag,
            level_label: m.level.label(),
            extra_tags: m.extra_tags.clone(),
            message: m.message.clone(),
            url: m.url.clone(),
            date: m.date,
            date_text: date_text(m.date),
            summary: message_summary(&m.message),
            head: long_head(&m.message).map(str::to_string),
        }
    }
}

/// One message of the stream, serialized exactly like [`StreamMessage`] but straight from
/// the queued or stored message, without building one first.
pub(crate) struct StreamView<'a> {
    pub(crate) id: Option<MessageId>,
    pub(crate) level: Level,
    pub(crate) extra_tags: &'a str,
    pub(crate) message: &'a str,
    pub(crate) url: Option<&'a str>,
    date: DateTime<Utc>,
    pub(crate) tags: &'a LevelTags,
}

impl<'a> StreamView<'a> {
    fn flash(m: &'a NewMessage, tags: &'a LevelTags) -> StreamView<'a> {
        StreamView {
            id: None,
            level: m.level(),
            extra_tags: m.extra_tags(),
            message: m.message(),
            url: m.url(),
            date: m.date(),
            tags,
        }
    }

    fn stored(m: &'a Message, tags: &'a LevelTags) -> StreamView<'a> {
        StreamView {
            id: Some(m.id),
            level: m.level,
            extra_tags: &m.extra_tags,
            message: &m.message,
            url: m.url.as_deref(),
            date: m.date,
            tags,
        }
    }
}

/// The stream as a page's context showed it: its messages in stream order (by date, flash
/// first on equal dates), owned, for a page to render or serialize after the guard is gone
/// (see [`crate::template::Page`]).
#[derive(Debug, Clone)]
pub(crate) struct StreamSnapshot {
    items: Vec<StreamItem>,
    tags: LevelTags,
}

#[derive(Debug, Clone)]
enum StreamItem {
    Flash(NewMessage),
    Stored(Message),
}

impl StreamItem {
    fn date(&self) -> DateTime<Utc> {
        match self {
            StreamItem::Flash(m) => m.date(),
            StreamItem::Stored(m) => m.date,
        }
    }
}

impl StreamSnapshot {
    fn of(inner: &Inner, tags: &LevelTags) -> StreamSnapshot {
        StreamSnapshot {
            items: inner.in_order(
                |m| StreamItem::Flash(m.clone()),
                |m| StreamItem::Stored(m.clone()),
                StreamItem::date,
            ),
            tags: tags.clone(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The messages, in stream order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = StreamView<'_>> {
        self.items.iter().map(|item| self.view(item))
    }

    fn view<'a>(&'a self, item: &'a StreamItem) -> StreamView<'a> {
        match item {
            StreamItem::Flash(m) => StreamView::flash(m, &self.tags),
            StreamItem::Stored(m) => StreamView::stored(m, &self.tags),
        }
    }
}

/// The same JSON as the [`Messages`] it was taken from.
impl Serialize for StreamSnapshot {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

impl Serialize for StreamView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let level_tag = self.tags.tag(self.level);
        let mut out = serializer.serialize_struct("StreamMessage", 13)?;
        // In descending order of the names: a page's context is made of JSON maps
        // (`BTreeMap`s), and each name then goes in at the front of its map after one
        // comparison, where other orders compare it with several names already there. That
        // takes 12% off the cost of turning the stream into a page's context (callgrind).
        out.serialize_field("url", &self.url)?;
        out.serialize_field("tags", &join_tags(self.extra_tags, level_tag))?;
        out.serialize_field("summary", &message_summary(self.message))?;
        out.serialize_field("stored", &self.id.is_some())?;
        out.serialize_field("message", self.message)?;
        out.serialize_field("level_tag", level_tag)?;
        out.serialize_field("level_label", self.level.label())?;
        out.serialize_field("level", &self.level)?;
        out.serialize_field("id", &self.id)?;
        out.serialize_field("head", &long_head(self.message))?;
        out.serialize_field("extra_tags", self.extra_tags)?;
        out.serialize_field("date_text", &date_text(self.date))?;
        out.serialize_field("date", &rfc3339(self.date))?;
        out.end()
    }
}

/// When the library first saw a request (see [`request_start`]).
struct RequestStart(std::time::Instant);

/// When the library first saw `request`: its fairing notes it on the way in, before any
/// guard runs. A read for this request is fresh when it sees every write that returned
/// before this moment (see [`crate::ChangeFeed::sync_since`]), so the reads of one request
/// (its session, its inbox, its count) can share one sync of the change feed.
pub fn request_start(request: &Request<'_>) -> std::time::Instant {
    request
        .local_cache(|| RequestStart(std::time::Instant::now()))
        .0
}

/// What one request loaded and showed. Lives in the request-local cache.
pub(crate) struct RequestState {
    pub(crate) user: Option<UserId>,
    /// Why loading failed (the guard then fails with this status).
    failure: Option<Status>,
    inner: Mutex<Inner>,
}

#[derive(Default)]
pub(crate) struct Inner {
    /// Flash queue in order, each with whether it was shown.
    flash: Vec<(NewMessage, bool)>,
    /// Stored messages of the stream (inbox snapshot, then those added here), with whether
    /// they were shown.
    stored: Vec<(Message, bool)>,
    /// The stream was shown and not reset with `set_used(false)`.
    used: bool,
    /// Spill key the browser sent.
    loaded_spill_key: Option<String>,
    /// Whether the spill the key names was there (a replayed key of a spill that is gone
    /// replaces nothing).
    spill_found: bool,
    /// Spill to write (key, payload) so the cookie set in this request finds its messages.
    pub(crate) pending_spill: Option<(String, String)>,
    /// Whether the quota let this request create a spill (asked once, at the first
    /// overflow; replacing the spill the browser brought back is always allowed).
    spill_allowed: Option<bool>,
    /// The bytes the quota counted for this request's anonymous spill.
    spill_counted: usize,
    /// The client's address, for the spill quota.
    client: Option<std::net::IpAddr>,
    /// Whether this request rewrote the flash cookies.
    pub(crate) cookies_rewritten: bool,
    /// Whether the inbox snapshot stopped at [`MAX_STREAM_STORED`] (more may be unread).
    truncated: bool,
    /// When it did: the store's unread count when the snapshot was taken (`None` if that
    /// read failed), so that a page can still count exactly without a marker.
    unread_at_load: Option<u64>,
    /// Stored messages this request added to the user's inbox.
    added: u64,
    /// A request that only looks (HEAD, a browser's prefetch): showing does not consume.
    look_only: bool,
}

/// Whether a request only looks (see [`looks_only`]), as decided on its way in.
#[derive(Debug, Clone, Copy)]
struct LooksOnly(bool);

/// Decides, on the request's way in (the fairing's `on_request`), whether it only looks:
/// Rocket answers `HEAD` with the `GET` route and turns the method into `GET` for it, so this
/// must be asked before routing.
pub(crate) fn note_looks_only(request: &Request<'_>) {
    request.local_cache(|| LooksOnly(looks_only(request)));
}

/// Whether `header` is named `name` (any case). Headers are found by going through them
/// (a request or response has a handful) where it is done on every request: a lookup by
/// name in Rocket's header map hashes the name byte by byte with SipHash.
pub(crate) fn is_named(header: &rocket::http::Header<'_>, name: &str) -> bool {
    header.name().as_str().eq_ignore_ascii_case(name)
}

/// Whether `request` only looks: `HEAD`, or a prefetch or prerender a browser makes on its
/// own (`Sec-Purpose: prefetch`, or the older `Purpose: prefetch`). Showing the stream to
/// such a request consumes nothing: the user has not seen it.
///
/// The headers are read in one pass: a lookup by name in Rocket's header map hashes the name
/// byte by byte, and this runs on every request.
fn looks_only(request: &Request<'_>) -> bool {
    const NAMES: [&str; 4] = ["Sec-Purpose", "Purpose", "X-Moz", "X-Purpose"];
    request.method() == rocket::http::Method::Head
        || request.headers().iter().any(|header| {
            NAMES.iter().any(|name| is_named(&header, name)) && {
                let value = header.value().to_ascii_lowercase();
                value.contains("prefetch") || value.contains("preview")
            }
        })
}

impl Inner {
    /// The stream in its order, each message made into a `T`: flash then stored, each in
    /// queue order, then sorted by `date`, stably, so equal dates keep that order. Iterating,
    /// serializing and a page's snapshot all show it so.
    fn in_order<'a, T>(
        &'a self,
        flash: impl FnMut(&'a NewMessage) -> T,
        stored: impl FnMut(&'a Message) -> T,
        date: impl FnMut(&T) -> DateTime<Utc>,
    ) -> Vec<T> {
        let mut stream: Vec<T> = self
            .flash
            .iter()
            .map(|(m, _)| m)
            .map(flash)
            .chain(self.stored.iter().map(|(m, _)| m).map(stored))
            .collect();
        stream.sort_by_key(date);
        stream
    }

    /// Ids of stored messages shown in this request, if the stream counts as used.
    pub(crate) fn shown_stored(&self) -> Vec<MessageId> {
        if !self.used {
            return Vec::new();
        }
        self.stored
            .iter()
            .filter(|(_, shown)| *shown)
            .map(|(m, _)| m.id)
            .collect()
    }

    /// The user's unread messages once this request is settled, oldest first, from the
    /// request's own snapshot (no query): the snapshot and what this request stored, minus
    /// what it showed when `marked_read`. `None` when the snapshot was truncated.
    pub(crate) fn unread_after(&self, marked_read: bool) -> Option<Vec<Message>> {
        if self.truncated {
            return None;
        }
        let consumed = marked_read && self.used;
        Some(
            self.stored
                .iter()
                .filter(|(_, shown)| !(consumed && *shown))
                .map(|(m, _)| m.clone())
                .collect(),
        )
    }

    /// How many unread messages the user has once this request is settled: as
    /// [`Inner::unread_after`] counts them, and past a truncated snapshot from the count
    /// read with it. `None` when neither is known.
    pub(crate) fn unread_count_after(&self, marked_read: bool) -> Option<u64> {
        // Counted, not collected: a page render asks on every request.
        let consumed = marked_read && self.used;
        let shown = self
            .stored
            .iter()
            .filter(|(_, shown)| consumed && *shown)
            .count() as u64;
        if !self.truncated {
            return Some(self.stored.len() as u64 - shown);
        }
        self.unread_at_load
            .map(|n| (n + self.added).saturating_sub(shown))
    }

    /// The spill key the browser sent, if this request's cookies no longer point to it.
    pub(crate) fn stale_spill_key(&self) -> Option<&str> {
        let current = self.pending_spill.as_ref().map(|(k, _)| k.as_str());
        match (&self.loaded_spill_key, self.cookies_rewritten) {
            (Some(old), true) if Some(old.as_str()) != current => Some(old),
            _ => None,
        }
    }
}

impl RequestState {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn load(request: &Request<'_>, store: &Store) -> RequestState {
        let mut failure = None;
        // A host that cannot tell who is logged in: 503, never an anonymous answer.
        let user = crate::host::current_user(request, store.host())
            .await
            .unwrap_or_else(|_| {
                failure = Some(Status::ServiceUnavailable);
                None
            });
        let jar = request.cookies();
        let mut flash: Vec<NewMessage> = jar
            .get_private(FLASH_COOKIE)
            .map(|c| decode(c.value()))
            .unwrap_or_default();
        let loaded_spill_key = jar
            .get_private(SPILL_COOKIE)
            .map(|c| c.value().to_string())
            .filter(|k| is_valid_key(k));
        let mut spill_found = false;
        if let Some(key) = &loaded_spill_key {
            match store.flash_spill().spill_get(key).await {
                Ok(Some(payload)) => {
                    spill_found = true;
                    flash.extend(decode(&payload));
                }
                Ok(None) => log::debug!("stored-messages: flash spill {key} is gone"),
                Err(e) => {
                    log::error!(
                        "stored-messages: reading flash spill failed: {}",
                        crate::report(&e)
                    );
                    failure = Some(e.status());
                }
            }
        }
        if let Some(cookie) = jar.get(ROCKET_FLASH_COOKIE) {
            flash.extend(parse_rocket_flash(cookie.value(), Utc::now()));
        }
        let mut stored = Vec::new();
        let mut truncated = false;
        let mut unread_at_load = None;
        if let Some(user) = user {
            let since = request_start(request);
            match store
                .inbox_list_since(user, ListQuery::first(MAX_STREAM_STORED), since)
                .await
            {
                Ok(inbox) => {
                    truncated = inbox.len() >= MAX_STREAM_STORED as usize;
                    stored = inbox.into_iter().map(|m| (m, false)).collect();
                    if truncated {
                        // Only past the window: a page's count stays a number (usable in
                        // any Tera expression) for users with very many unread messages.
                        unread_at_load = store
                            .inbox_count_since(user, since)
                            .await
                            .map_err(|e| {
                                log::warn!(
                                    "stored-messages: counting the inbox of user {user} failed: {}",
                                    crate::report(&e)
                                );
                            })
                            .ok();
                    }
                }
                Err(e) => {
                    log::error!(
                        "stored-messages: loading inbox of user {user} failed: {}",
                        crate::report(&e)
                    );
                    failure = Some(e.status());
                }
            }
        }
        let inner = Inner {
            flash: flash.into_iter().map(|m| (m, false)).collect(),
            stored,
            loaded_spill_key,
            spill_found,
            truncated,
            unread_at_load,
            look_only: request.local_cache(|| LooksOnly(looks_only(request))).0,
            client: request.client_ip(),
            ..Inner::default()
        };
        RequestState {
            user,
            failure,
            inner: Mutex::new(inner),
        }
    }
}

/// Request guard for adding messages and reading the merged stream.
///
/// - `add*` and the per-level shorthands store the message for the logged-in user when its
///   level is a store level, and queue it as a flash message otherwise (anonymous visitors
///   always get flash). Empty text and levels below `min_level` are dropped silently, as in
///   Django; other bad input (too long, bad url) is an error and changes nothing.
/// - Iterating (`iter()`, `for m in &messages`) or serializing it into a template context
///   shows the stream: flash messages and the unread inbox, in date order. Shown flash
///   messages leave the cookie; shown stored messages are marked read when the response
///   succeeds. `set_used(false)` keeps everything for later.
/// - A request that only looks (`HEAD`, a browser's prefetch with `Sec-Purpose: prefetch`)
///   consumes nothing by showing: the user did not see the page.
///
/// Fails with 503 when the storage is unavailable.
pub struct Messages<'r> {
    jar: &'r CookieJar<'r>,
    store: &'r Store,
    state: &'r RequestState,
}

#[rocket::async_trait]
impl<'r> FromRequest<'r> for Messages<'r> {
    type Error = Status;

    async fn from_request(request: &'r Request<'_>) -> Outcome<Self, Status> {
        let Some(store) = request.rocket().state::<Store>() else {
            log::error!("stored-messages: Messages guard used without StoredMessages::fairing()");
            return Outcome::Error((Status::InternalServerError, Status::InternalServerError));
        };
        let state = request
            .local_cache_async(async {
                let state = RequestState::load(request, store).await;
                Some(state)
            })
            .await;
        // Cached as an `Option` so the fairing can ask "was it loaded?" without loading.
        let Some(state) = state else {
            return Outcome::Error((Status::InternalServerError, Status::InternalServerError));
        };
        if let Some(status) = state.failure {
            return Outcome::Error((status, status));
        }
        Outcome::Success(Messages {
            jar: request.cookies(),
            store,
            state,
        })
    }
}

impl Sentinel for Messages<'_> {
    fn abort(rocket: &Rocket<Ignite>) -> bool {
        if rocket.state::<Store>().is_none() {
            log::error!("stored-messages: the Messages guard needs StoredMessages::fairing()");
            return true;
        }
        false
    }
}

/// The request's state, if the guard loaded it.
pub(crate) fn request_state<'r>(request: &'r Request<'_>) -> Option<&'r RequestState> {
    request.local_cache(|| None::<RequestState>).as_ref()
}

impl<'r> Messages<'r> {
    /// The logged-in user, if any.
    pub fn user(&self) -> Option<UserId> {
        self.state.user
    }

    /// Adds a message with a level. See [`Messages::add_with`].
    ///
    /// # Errors
    ///
    /// As [`Messages::add_with`].
    pub async fn add(&self, level: Level, text: &str) -> Result<()> {
        self.add_with(level, text, "", None).await
    }

    /// Adds a message with extra tags and an optional url: stored for a logged-in user when
    /// the level is a store level, queued as flash otherwise. Empty text and levels below
    /// `min_level` are dropped (not an error).
    ///
    /// # Errors
    ///
    /// Validation errors of [`NewMessage::parse`] (nothing is added), and
    /// [`Error::Backend`] when storing fails.
    pub async fn add_with(
        &self,
        level: Level,
        text: &str,
        extra_tags: &str,
        url: Option<&str>,
    ) -> Result<()> {
        let config = self.store.config();
        if text.trim().is_empty() || level < config.min_level {
            return Ok(());
        }
        let message = NewMessage::parse(level, text, extra_tags, url, None)?;
        match self.state.user {
            Some(user) if config.is_store_level(level) => {
                let delivery = self.store.add_message_for(&[user], message).await?;
                let mut inner = self.state.lock();
                inner.stored.push((delivery.message, false));
                inner.added += 1;
            }
            _ => {
                let mut inner = self.state.lock();
                inner.flash.push((message, false));
                self.rewrite_cookies(&mut inner);
            }
        }
        Ok(())
    }

    /// Queues a flash message whatever the level, even one the configuration stores: for
    /// the library's own notices (what a plain button did), which must never become stored
    /// messages that need marking read in turn. Dropped like [`Messages::add_with`]'s when
    /// empty or below `min_level`.
    pub(crate) fn add_flash(&self, level: Level, text: &str) -> Result<()> {
        if text.trim().is_empty() || level < self.store.config().min_level {
            return Ok(());
        }
        let message = NewMessage::parse(level, text, "", None, None)?;
        let mut inner = self.state.lock();
        inner.flash.push((message, false));
        self.rewrite_cookies(&mut inner);
        Ok(())
    }

    /// The stream in date order, marking it shown. Each call returns the whole stream.
    pub fn iter(&self) -> std::vec::IntoIter<StreamMessage> {
        let tags = self.store.level_tags();
        self.show()
            .in_order(
                |m| StreamMessage::flash(m, tags),
                |m| StreamMessage::stored(m, tags),
                |m| m.date,
            )
            .into_iter()
    }

    /// Marks the whole stream shown (shown flash messages leave the cookie at once) and
    /// returns it, locked.
    fn show(&self) -> MutexGuard<'_, Inner> {
        let mut inner = self.state.lock();
        for (_, shown) in inner.flash.iter_mut() {
            *shown = true;
        }
        for (_, shown) in inner.stored.iter_mut() {
            *shown = true;
        }
        // A request that only looks shows the stream and keeps it (as `set_used(false)`).
        inner.used = !inner.look_only;
        if !inner.flash.is_empty() {
            self.rewrite_cookies(&mut inner);
        }
        inner
    }

    /// The flash messages alone, in date order, marking them shown (they leave the cookie);
    /// the stored messages stay as they are, neither shown nor marked read.
    ///
    /// For pages that list the inbox or the archive themselves and must not consume it:
    /// put `messages.flash()` in the context where the stream would go.
    pub fn flash(&self) -> Vec<StreamMessage> {
        let tags = self.store.level_tags();
        let mut inner = self.state.lock();
        for (_, shown) in inner.flash.iter_mut() {
            *shown = true;
        }
        // `used` settles only what is marked shown: no stored message is.
        inner.used = !inner.look_only;
        if !inner.flash.is_empty() {
            self.rewrite_cookies(&mut inner);
        }
        let mut flash: Vec<StreamMessage> = inner
            .flash
            .iter()
            .map(|(m, _)| StreamMessage::flash(m, tags))
            .collect();
        flash.sort_by_key(|m| m.date);
        flash
    }

    /// How many messages the stream holds now, without showing it.
    pub fn len(&self) -> usize {
        let inner = self.state.lock();
        inner.flash.len() + inner.stored.len()
    }

    /// How many stored messages the stream holds now, without showing it: what a page
    /// that shows the stream marks read (unless it calls [`Messages::set_used`] with
    /// `false`).
    pub fn stored_len(&self) -> usize {
        self.state.lock().stored.len()
    }

    /// Whether the stream is empty, without showing it.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the stream was shown and will be consumed.
    pub fn is_used(&self) -> bool {
        self.state.lock().used
    }

    /// `set_used(false)` keeps everything shown so far unread and in the flash queue, like
    /// django's `storage.used = False`; `set_used(true)` consumes what was shown.
    pub fn set_used(&self, used: bool) {
        let mut inner = self.state.lock();
        inner.used = used;
        self.rewrite_cookies(&mut inner);
    }

    /// Info (20) flash message.
    pub async fn info(&self, text: &str) -> Result<()> {
        self.add(Level::INFO, text).await
    }

    /// Success (25) flash message.
    pub async fn success(&self, text: &str) -> Result<()> {
        self.add(Level::SUCCESS, text).await
    }

    /// Warning (30) flash message.
    pub async fn warning(&self, text: &str) -> Result<()> {
        self.add(Level::WARNING, text).await
    }

    /// Error (40) flash message.
    pub async fn error(&self, text: &str) -> Result<()> {
        self.add(Level::ERROR, text).await
    }

    /// Debug (10) flash message (dropped under the default `min_level`).
    pub async fn debug(&self, text: &str) -> Result<()> {
        self.add(Level::DEBUG, text).await
    }

    /// Stored info (21): persisted for a logged-in user.
    pub async fn stored_info(&self, text: &str) -> Result<()> {
        self.add(Level::STORED_INFO, text).await
    }

    /// Stored success (26): persisted for a logged-in user.
    pub async fn stored_success(&self, text: &str) -> Result<()> {
        self.add(Level::STORED_SUCCESS, text).await
    }

    /// Stored warning (31): persisted for a logged-in user.
    pub async fn stored_warning(&self, text: &str) -> Result<()> {
        self.add(Level::STORED_WARNING, text).await
    }

    /// Stored error (41): persisted for a logged-in user.
    pub async fn stored_error(&self, text: &str) -> Result<()> {
        self.add(Level::STORED_ERROR, text).await
    }

    /// Whether the library's cookies are marked `Secure` (`secure_cookies`).
    fn secure(&self) -> bool {
        self.store.config().secure_cookies
    }

    /// Writes the flash cookies for the queue as it now stands: everything when the stream is
    /// not used, only what was not shown otherwise. Overflow gets a fresh spill key; the
    /// fairing stores its payload.
    fn rewrite_cookies(&self, inner: &mut Inner) {
        let keep: Vec<NewMessage> = inner
            .flash
            .iter()
            .filter(|(_, shown)| !inner.used || !*shown)
            .map(|(m, _)| m.clone())
            .collect();
        let (head, rest) = split(&keep);
        match head {
            Some(value) => self
                .jar
                .add_private(library_cookie(FLASH_COOKIE, value, self.secure())),
            None => remove_if_present(self.jar, FLASH_COOKIE),
        }
        if rest.is_empty() {
            inner.pending_spill = None;
            remove_if_present(self.jar, SPILL_COOKIE);
        } else {
            // The spill keeps the newest messages that fit its size limit.
            let from = newest_within(rest, MAX_SPILL_BYTES);
            let payload = encode(&rest[from..]);
            if from > 0 {
                log::warn!(
                    "stored-messages: {from} flash messages dropped: the queue is over {MAX_SPILL_BYTES} bytes"
                );
            }
            let anonymous = self.state.user.is_none();
            let quota = self.store.spill_quota();
            // Replacing the spill the browser brought back does not grow the storage; a
            // queue that grew since the quota let it spill counts what it grew by.
            let allowed = inner.spill_found
                || match inner.spill_allowed {
                    Some(false) => false,
                    Some(true) => {
                        !anonymous
                            || payload.len() <= inner.spill_counted
                            || quota.allow_more(payload.len() - inner.spill_counted)
                    }
                    None => quota.allow(inner.client, self.state.user, payload.len()),
                };
            if allowed && anonymous {
                inner.spill_counted = inner.spill_counted.max(payload.len());
            }
            inner.spill_allowed = Some(allowed);
            if allowed {
                let key = new_key();
                self.jar
                    .add_private(library_cookie(SPILL_COOKIE, key.clone(), self.secure()));
                inner.pending_spill = Some((key, payload));
            } else {
                log::warn!(
                    "stored-messages: flash spill refused by the quota ({} messages, {} bytes dropped)",
                    rest.len(),
                    payload.len()
                );
                let kept = with_overflow_notice(&keep[..keep.len() - rest.len()]);
                let (head, _) = split(&kept);
                if let Some(value) = head {
                    self.jar
                        .add_private(library_cookie(FLASH_COOKIE, value, self.secure()));
                }
                inner.pending_spill = None;
                remove_if_present(self.jar, SPILL_COOKIE);
            }
        }
        // Rocket's `_flash` message now lives in our queue (or was shown).
        if self.jar.get(ROCKET_FLASH_COOKIE).is_some() {
            self.jar
                .remove(Cookie::build(ROCKET_FLASH_COOKIE).path("/"));
        }
        inner.cookies_rewritten = true;
    }
}

/// The warning that stands in for flash messages the spill quota refused to keep.
pub const OVERFLOW_NOTICE: &str =
    "Some messages could not be kept: too many were waiting. Reload the page to see new ones.";

/// `fitting` (a queue that fits the cookie) with [`OVERFLOW_NOTICE`] at its end, dropping
/// its newest messages until the notice fits too.
fn with_overflow_notice(fitting: &[NewMessage]) -> Vec<NewMessage> {
    let Ok(notice) = NewMessage::new(Level::WARNING, OVERFLOW_NOTICE) else {
        return fitting.to_vec();
    };
    let mut kept = fitting.to_vec();
    loop {
        kept.push(notice.clone());
        if split(&kept).1.is_empty() || kept.len() == 1 {
            return kept;
        }
        kept.pop();
        kept.pop();
    }
}

/// A cookie of the library's (flash queue, spill key, CSRF token): site-wide, `Lax`, not
/// for scripts, `Secure` when configured.
pub(crate) fn library_cookie(name: &'static str, value: String, secure: bool) -> Cookie<'static> {
    let cookie = Cookie::build((name, value))
        .path("/")
        .same_site(SameSite::Lax)
        .http_only(true);
    // Unset (not `false`) unless configured, so that Rocket's TLS can still mark it.
    if secure {
        cookie.secure(true).build()
    } else {
        cookie.build()
    }
}

fn remove_if_present(jar: &CookieJar<'_>, name: &'static str) {
    if jar.get_private(name).is_some() {
        jar.remove_private(Cookie::build(name).path("/"));
    }
}

impl IntoIterator for &Messages<'_> {
    type Item = StreamMessage;
    type IntoIter = std::vec::IntoIter<StreamMessage>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Serializing the guard (e.g. `context! { messages }`) shows the stream, like iterating,
/// and writes each message as a [`StreamMessage`].
impl Serialize for Messages<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let tags = self.store.level_tags();
        let inner = self.show();
        // In a `Page`'s context: a stand-in that the page replaces, or renders straight from
        // this snapshot when its templates only count the stream (see `template::stream`).
        if let Some(len) = crate::template::defer_stream(|| StreamSnapshot::of(&inner, tags)) {
            drop(inner);
            return crate::template::serialize_placeholder(serializer, len);
        }
        serializer.collect_seq(inner.in_order(
            |m| StreamView::flash(m, tags),
            |m| StreamView::stored(m, tags),
            |m| m.date,
        ))
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        e.status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_summaries_are_the_words_of_the_text() {
        assert_eq!(
            message_summary("\n\n   \n   leading  blank\tlines"),
            "leading blank lines"
        );
        let long = format!("  {}", "word ".repeat(20));
        assert_eq!(
            message_summary(&long),
            format!("{}…", &"word ".repeat(8)[..40])
        );
        assert_eq!(message_summary("plain words"), "plain words");
        assert_eq!(message_summary("two  spaces"), "two spaces");
        assert_eq!(message_summary("no\u{a0}break"), "no break");
    }

    #[test]
    fn summaries_cut_at_forty_characters() {
        assert_eq!(summary("short"), "short");
        let long = "❤".repeat(41);
        assert_eq!(summary(&long), format!("{}…", "❤".repeat(40)));
        assert_eq!(summary(&"x".repeat(40)), "x".repeat(40));
    }

    #[test]
    fn summaries_never_split_a_character_a_reader_sees_as_one() {
        let family = "\u{1f468}\u{200d}\u{1f469}\u{200d}\u{1f467}"; // one emoji, five code points
        let text = format!("{}{family}{family}", "x".repeat(39));
        assert_eq!(summary(&text), format!("{}{family}…", "x".repeat(39)));
        // An accent that follows the fortieth letter stays with it; so does a skin tone.
        let accented = format!("{}e\u{301}tude", "x".repeat(39));
        assert_eq!(summary(&accented), format!("{}e\u{301}…", "x".repeat(39)));
        let waving = format!("{}\u{1f44b}\u{1f3fd} hello", "x".repeat(39));
        assert_eq!(
            summary(&waving),
            format!("{}\u{1f44b}\u{1f3fd}…", "x".repeat(39))
        );
        // A flag is two regional indicators.
        let flags = "\u{1f1eb}\u{1f1f7}".repeat(41);
        assert_eq!(
            summary(&flags),
            format!("{}…", "\u{1f1eb}\u{1f1f7}".repeat(40))
        );
        // Exactly 40 of them: nothing cut.
        assert_eq!(summary(&family.repeat(40)), family.repeat(40));
        // CR LF is one character too; the ASCII shortcut must not take it for two.
        assert_eq!(cut_after_characters(&"\r\n".repeat(3), 2), Some(4));
        assert_eq!(cut_after_characters("abc", 2), Some(2));
        assert_eq!(cut_after_characters("ab", 2), None);
        assert_eq!(cut_after_characters("", 0), None);
    }

    #[test]
    fn long_texts_have_a_head_cut_at_a_space() {
        assert_eq!(long_head(&"x".repeat(300)), None);
        let long = "word ".repeat(100);
        let head = long_head(&long).unwrap();
        assert!(head.len() <= 200 && head.len() > 150, "{head:?}");
        assert!(head.ends_with("word"), "{head:?}");
        let unbroken = "❤".repeat(301);
        assert_eq!(long_head(&unbroken).unwrap(), "❤".repeat(200));
        // 302 code points, but 151 characters: short enough to show whole.
        assert_eq!(long_head(&"e\u{301}".repeat(151)), None);
        let mixed = format!("{}e\u{301}{}", "x".repeat(199), "y".repeat(200));
        assert_eq!(
            long_head(&mixed).unwrap(),
            format!("{}e\u{301}", "x".repeat(199))
        );
    }

    #[test]
    fn views_serialize_exactly_like_stream_messages() {
        let tags = LevelTags::new([(Level::STORED_INFO, "note".to_string())].into());
        let stored = Message {
            id: MessageId(7),
            level: Level::STORED_INFO,
            message: "a message longer than forty characters, to be cut".into(),
            extra_tags: "x y".into(),
            url: Some("/a".into()),
            date: "2026-01-02T03:04:05.678Z".parse().unwrap(),
        };
        assert_eq!(
            serde_json::to_value(StreamView::stored(&stored, &tags)).unwrap(),
            serde_json::to_value(StreamMessage::stored(&stored, &tags)).unwrap()
        );
        let long = Message {
            message: "long enough ".repeat(40),
            ..stored.clone()
        };
        assert_eq!(
            serde_json::to_value(StreamView::stored(&long, &tags)).unwrap(),
            serde_json::to_value(StreamMessage::stored(&long, &tags)).unwrap()
        );
        let flash = NewMessage::new(Level::WARNING, "careful").unwrap();
        assert_eq!(
            serde_json::to_value(StreamView::flash(&flash, &tags)).unwrap(),
            serde_json::to_value(StreamMessage::flash(&flash, &tags)).unwrap()
        );
    }

    #[test]
    fn dates_are_written_as_chrono_formats_them() {
        use chrono::TimeZone;
        let check = |date: DateTime<Utc>| {
            assert_eq!(
                rfc3339(date),
                date.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
                "{date:?}"
            );
            assert_eq!(
                date_text(date),
                date.format("%Y-%m-%d %H:%M UTC").to_string(),
                "{date:?}"
            );
        };
        // Every day from 1900 to 2200 (leap years, century rules, month ends), at a time
        // that moves through the day, and the first and last instant of some days.
        let start = Utc.with_ymd_and_hms(1900, 1, 1, 0, 0, 0).unwrap();
        for day in 0..(300 * 366) {
            let midnight = start + chrono::Duration::days(day);
            check(midnight + chrono::Duration::microseconds(day * 7_919_999_977 % 86_400_000_000));
            if day % 97 == 0 {
                check(midnight);
                check(midnight + chrono::Duration::microseconds(86_399_999_999));
            }
        }
        for year in [0, 1, 4, 100, 400, 1969, 1970, 2000, 9_999] {
            check(Utc.with_ymd_and_hms(year, 1, 1, 0, 0, 0).unwrap());
            check(Utc.with_ymd_and_hms(year, 12, 31, 23, 59, 59).unwrap());
        }
        // Beyond four digits, the year carries its sign.
        let far = Utc.with_ymd_and_hms(10_000, 3, 1, 12, 0, 0).unwrap();
        assert_eq!(rfc3339(far), "+10000-03-01T12:00:00.000000Z");
        let before = Utc.with_ymd_and_hms(-1, 3, 1, 12, 0, 0).unwrap();
        assert_eq!(date_text(before), "-0001-03-01 12:00 UTC");
        // A leap second stays within the minute.
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_micro_opt(23, 59, 59, 1_500_000))
            .unwrap()
            .and_utc();
        assert_eq!(rfc3339(leap), "2016-12-31T23:59:59.999999Z");
    }

    #[test]
    fn dates_read_well() {
        let date = "2026-01-02T03:04:05.678Z".parse().unwrap();
        assert_eq!(date_text(date), "2026-01-02 03:04 UTC");
        let json = serde_json::to_value(StreamMessage::stored(
            &Message {
                id: MessageId(1),
                level: Level::STORED_INFO,
                message: "x".into(),
                extra_tags: String::new(),
                url: None,
                date: date + chrono::Duration::microseconds(7_000_042),
            },
            &LevelTags::default(),
        ))
        .unwrap();
        assert_eq!(json["date"], "2026-01-02T03:04:12.678042Z");
        let parsed: DateTime<Utc> = json["date"].as_str().unwrap().parse().unwrap();
        assert_eq!(parsed, date + chrono::Duration::microseconds(7_000_042));
    }
}
