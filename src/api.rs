//! The JSON API: inbox, archive, count, mark read; its JSON catchers and its OpenAPI
//! document. The fairing mounts it at [`BASE`] (`/messages`) unless the host chooses
//! another base ([`crate::StoredMessages::api_at`]) or leaves it out
//! ([`crate::StoredMessages::without_api`]); [`ApiBase`] tells where it is.
//!
//! Authentication is the host's (the same session as pages); anonymous requests get 401.
//! Every error, Rocket's own 404/422/413 included, has the shape of [`crate::error_body`].
//! The two POST routes also accept plain HTML forms (with a `csrf_token` field and an
//! optional site-relative `next`): they then redirect back instead of answering JSON, with a
//! one-time notice (a flash message) that says what was done, with the page's message area
//! as the redirect's fragment ([`NOTICE_ANCHOR`]),
//! so the buttons of the message list work without JavaScript.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rocket::data::{self, Data, FromData};
use rocket::form::Form;
use rocket::http::uri::Origin;
use rocket::http::Status;
use rocket::request::{FromRequest, Outcome};
use rocket::response::content::RawHtml;
use rocket::response::{Redirect, Responder};
use rocket::serde::json::{json, Json, Value};
use rocket::{Catcher, Request, Route, State};
use serde::Serialize;

use crate::backend::cache::Listed;
use crate::backend::{Cursor, ListQuery};
use crate::error::{error_body, report, Error};
use crate::live::PageSession;
use crate::message::{LevelTags, Message, MessageId, UserId};
use crate::ops::Store;
use crate::request::Messages;

/// Where the API is mounted unless the host says otherwise.
pub const BASE: &str = "/messages";

/// Where the fairing mounted the API (managed state): the message list's buttons, the
/// CSRF check and the API's own links follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiBase(Option<String>);

impl ApiBase {
    /// The API mounted at `base`, which must be a path (`/api/messages`); a trailing slash
    /// is dropped.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when `base` is not a plain absolute path: letters, digits and
    /// `/ - _ . ~`, no empty, `.` or `..` segments, not `/` itself.
    pub fn at(base: &str) -> Result<ApiBase, Error> {
        let bad = |why: &str| Error::Config(vec![format!("API base {base:?}: {why}")]);
        if !base.starts_with('/') {
            return Err(bad("must start with '/'"));
        }
        // Plain characters only: the base is written into pages and scripts as it is.
        if !base
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-_.~".contains(&b))
        {
            return Err(bad("may only hold letters, digits and / - _ . ~"));
        }
        if base.contains("//") || base.split('/').any(|s| s == "." || s == "..") {
            return Err(bad("must not hold empty, '.' or '..' segments"));
        }
        let base = base.trim_end_matches('/');
        if base.is_empty() {
            return Err(bad("the API needs a path of its own, not '/'"));
        }
        Ok(ApiBase(Some(base.to_string())))
    }

    /// No API: the host left it out.
    pub fn none() -> ApiBase {
        ApiBase(None)
    }

    /// The base path (`/messages`), or `None` without an API.
    pub fn get(&self) -> Option<&str> {
        self.0.as_deref()
    }

    /// Where the API of `rocket` is (the default before the fairing ran).
    pub fn of<P: rocket::Phase>(rocket: &rocket::Rocket<P>) -> Option<&str> {
        match rocket.state::<ApiBase>() {
            Some(base) => base.get(),
            None => Some(BASE),
        }
    }

    /// Whether `path` is the API's or under it.
    pub(crate) fn contains(base: Option<&str>, path: &str) -> bool {
        base.is_some_and(|base| {
            path.strip_prefix(base)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
    }
}

impl Default for ApiBase {
    fn default() -> ApiBase {
        ApiBase(Some(BASE.to_string()))
    }
}
/// Page size when `limit` is not given.
pub const DEFAULT_LIMIT: u32 = 50;
/// Largest accepted `limit`.
pub const MAX_LIMIT: u32 = 200;

/// A message as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ApiMessage {
    /// The id, a string.
    pub id: MessageId,
    /// The text.
    pub message: String,
    /// The level (integer).
    pub level: i32,
    /// The level tag.
    pub level_tag: String,
    /// Extra tags then the level tag.
    pub tags: String,
    /// Extra tags.
    pub extra_tags: String,
    /// RFC 3339, UTC.
    pub date: String,
    /// The url, or null.
    pub url: Option<String>,
}

impl ApiMessage {
    /// The API form of `m`.
    pub fn new(m: &Message, tags: &LevelTags) -> ApiMessage {
        ApiMessage {
            id: m.id,
            message: m.message.clone(),
            level: m.level.0,
            level_tag: m.level_tag(tags).to_string(),
            tags: m.tags(tags),
            extra_tags: m.extra_tags.clone(),
            date: crate::request::rfc3339(m.date),
            url: m.url.clone(),
        }
    }
}

/// Appends `text` as a JSON string, escaped as serde_json escapes it.
fn push_json_str(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    push_json_chars(out, text);
    out.push(b'"');
}

/// Appends `text` escaped for the inside of a JSON string. Runs that need no escape (all
/// of a usual message) are found eight bytes at a time and copied whole.
fn push_json_chars(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    let mut start = 0;
    while let Some(i) = next_escape(bytes, start) {
        let byte = bytes[i];
        out.extend_from_slice(&bytes[start..i]);
        let escape: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            _ => b"",
        };
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(byte >> 4)]);
            out.push(HEX[usize::from(byte & 0xf)]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// Whether JSON must escape `byte`: a control character, `"` or `\`.
fn must_escape(byte: u8) -> bool {
    byte < 0x20 || byte == b'"' || byte == b'\\'
}

/// The first byte from `from` on that JSON must escape. Eight bytes are tested at once: a
/// word has a byte below `n` when `(word - n·0x01…01) & !word & 0x80…80` is not zero (a
/// borrow may mark more bytes after the first, so a marked word is searched byte by byte).
fn next_escape(bytes: &[u8], from: usize) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGH;
    let mut at = from;
    for chunk in bytes[from..].chunks_exact(8) {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_ne_bytes(word);
        let marked = below(word, 0x20)
            | below(word ^ (ONES * u64::from(b'"')), 1)
            | below(word ^ (ONES * u64::from(b'\\')), 1);
        if marked != 0 {
            break;
        }
        at += 8;
    }
    bytes[at..]
        .iter()
        .position(|&b| must_escape(b))
        .map(|i| at + i)
}

/// Appends `n` in decimal.
fn push_int(out: &mut Vec<u8>, n: i64) {
    let mut digits = [0u8; 20];
    let mut rest = n.unsigned_abs();
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if n < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[at..]);
}

fn push_json_opt(out: &mut Vec<u8>, text: Option<&str>) {
    match text {
        Some(text) => push_json_str(out, text),
        None => out.extend_from_slice(b"null"),
    }
}

/// Appends `m` as an [`ApiMessage`] object: the same fields, written straight from the
/// stored message into the answer (or into an inbox cache entry, which keeps it).
fn push_message(out: &mut Vec<u8>, m: &Message, tags: &LevelTags) {
    let level_tag = m.level_tag(tags);
    out.extend_from_slice(b"{\"id\":\"");
    push_int(out, m.id.0);
    out.extend_from_slice(b"\",\"message\":");
    push_json_str(out, &m.message);
    out.extend_from_slice(b",\"level\":");
    push_int(out, m.level.0.into());
    out.extend_from_slice(b",\"level_tag\":");
    push_json_str(out, level_tag);
    // `tags` is the extra tags then the level tag, space-separated (`Message::tags`).
    out.extend_from_slice(b",\"tags\":\"");
    push_json_chars(out, &m.extra_tags);
    if !m.extra_tags.is_empty() && !level_tag.is_empty() {
        out.push(b' ');
    }
    push_json_chars(out, level_tag);
    out.extend_from_slice(b"\",\"extra_tags\":");
    push_json_str(out, &m.extra_tags);
    out.extend_from_slice(b",\"date\":\"");
    crate::request::push_rfc3339(out, m.date);
    out.extend_from_slice(b"\",\"url\":");
    push_json_opt(out, m.url.as_deref());
    out.push(b'}');
}

/// A page as handlers answer it: [`Page`]'s JSON, written from the stored messages.
struct PageView<'a> {
    messages: Listed,
    tags: &'a LevelTags,
    next_cursor: Option<String>,
    next: Option<String>,
}

impl PageView<'_> {
    fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.messages.len() * 320);
        out.extend_from_slice(b"{\"messages\":[");
        let kept = match &self.messages {
            // An entry of the inbox cache keeps its messages' JSON once written.
            Listed::Shared(window, picked) => window
                .json(self.tags, |out, m| push_message(out, m, self.tags))
                .map(|json| (json, picked)),
            Listed::Owned(_) => None,
        };
        // `iter` yields the picked messages in order: the k-th is entry `picked[k]`.
        for (k, m) in self.messages.iter().enumerate() {
            if k > 0 {
                out.push(b',');
            }
            match kept {
                Some((json, picked)) => out.extend_from_slice(json.message(picked[k])),
                None => push_message(&mut out, m, self.tags),
            }
        }
        out.extend_from_slice(b"],\"next_cursor\":");
        push_json_opt(&mut out, self.next_cursor.as_deref());
        out.extend_from_slice(b",\"next\":");
        push_json_opt(&mut out, self.next.as_deref());
        out.push(b'}');
        out
    }
}

impl<'r> Responder<'r, 'static> for PageView<'_> {
    fn respond_to(self, _: &'r Request<'_>) -> rocket::response::Result<'static> {
        let body = self.to_json();
        rocket::Response::build()
            .header(rocket::http::ContentType::JSON)
            .sized_body(body.len(), std::io::Cursor::new(body))
            .ok()
    }
}

/// One page of a listing.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Page {
    /// The messages of this page.
    pub messages: Vec<ApiMessage>,
    /// The cursor for the next page, or null when this page is the last.
    pub next_cursor: Option<String>,
    /// The path of the next page (same limit), or null.
    pub next: Option<String>,
}

/// An API error: a status and a message, answered in the one JSON shape.
#[derive(Debug)]
pub struct ApiError {
    status: Status,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: Status, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// Its status and message, for an answer written by hand (the stream listener's).
    pub(crate) fn parts(&self) -> (Status, &str) {
        (self.status, &self.message)
    }
}

impl From<crate::message::InvalidMessage> for ApiError {
    fn from(e: crate::message::InvalidMessage) -> ApiError {
        Error::from(e).into()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        if !e.is_bad_input() {
            log::error!("stored-messages api: {}", report(&e));
        }
        ApiError::new(e.status(), e.public_message())
    }
}

impl<'r> Responder<'r, 'static> for ApiError {
    fn respond_to(self, request: &'r Request<'_>) -> rocket::response::Result<'static> {
        let answer = if crate::csrf::is_page_form(request) {
            error_page(&self.message, request).respond_to(request)?
        } else {
            Json(error_body(self.status, &self.message)).respond_to(request)?
        };
        rocket::response::Response::build_from(answer)
            .status(self.status)
            .ok()
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// The user of an API request; 401 (JSON) for anonymous requests.
pub struct ApiUser(pub UserId);

#[rocket::async_trait]
impl<'r> FromRequest<'r> for ApiUser {
    type Error = ();

    async fn from_request(request: &'r Request<'_>) -> Outcome<Self, ()> {
        let Some(store) = request.rocket().state::<Store>() else {
            return Outcome::Error((Status::InternalServerError, ()));
        };
        match crate::host::current_user(request, store.host()).await {
            Ok(Some(user)) => Outcome::Success(ApiUser(user)),
            Ok(None) => Outcome::Error((Status::Unauthorized, ())),
            Err(_) => Outcome::Error((Status::ServiceUnavailable, ())),
        }
    }
}

fn encode_cursor(c: &Cursor) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{}", c.date.timestamp_micros(), c.id.0))
}

fn decode_cursor(raw: &str) -> Option<Cursor> {
    let bytes = URL_SAFE_NO_PAD.decode(raw).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (date, id) = text.split_once(':')?;
    let date = chrono::DateTime::from_timestamp_micros(date.parse().ok()?)?;
    Some(Cursor {
        date,
        id: MessageId(id.parse().ok()?),
    })
}

/// Whether `raw` is a decimal integer, of any size, with an optional sign.
fn is_integer(raw: &str) -> bool {
    let digits = raw.strip_prefix(['-', '+']).unwrap_or(raw);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// Parses `limit` and `cursor` query values.
fn list_query(limit: Option<&str>, cursor: Option<&str>) -> ApiResult<ListQuery> {
    let limit = match limit {
        None => DEFAULT_LIMIT,
        Some(raw) => match raw.parse::<u32>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            Err(_) if !is_integer(raw) => {
                return Err(ApiError::new(
                    Status::BadRequest,
                    format!(
                        "limit \"{}\" is not an integer",
                        crate::request::summary(raw)
                    ),
                ))
            }
            // An integer all the same (zero, negative, or too large for any limit).
            _ => {
                return Err(ApiError::new(
                    Status::UnprocessableEntity,
                    format!(
                        "limit must be from 1 to {MAX_LIMIT}, not {}",
                        crate::request::summary(raw)
                    ),
                ))
            }
        },
    };
    let after = match cursor {
        None | Some("") => None,
        Some(raw) => Some(
            decode_cursor(raw)
                .ok_or_else(|| ApiError::new(Status::BadRequest, "malformed cursor"))?,
        ),
    };
    Ok(ListQuery {
        limit: Some(limit),
        after,
    })
}

/// Builds a page; asks for one more message than the limit to know whether a next page
/// exists.
fn page<'a>(
    base: &ApiBase,
    path: &str,
    mut messages: Listed,
    limit: u32,
    tags: &'a LevelTags,
) -> PageView<'a> {
    let more = messages.len() > limit as usize;
    messages.truncate(limit as usize);
    let next_cursor = more
        .then(|| messages.last().map(|m| encode_cursor(&Cursor::after(m))))
        .flatten();
    let next = next_cursor.as_ref().map(|c| {
        let base = base.get().unwrap_or(BASE);
        format!("{base}/{path}?limit={limit}&cursor={c}")
    });
    PageView {
        messages,
        tags,
        next_cursor,
        next,
    }
}

fn one_more(query: ListQuery) -> ListQuery {
    ListQuery {
        limit: query.limit.map(|l| l + 1),
        after: query.after,
    }
}

/// When the request began ([`crate::request_start`]): what its reads must be fresh for.
struct Since(std::time::Instant);

#[rocket::async_trait]
impl<'r> rocket::request::FromRequest<'r> for Since {
    type Error = std::convert::Infallible;

    async fn from_request(
        request: &'r rocket::Request<'_>,
    ) -> rocket::request::Outcome<Since, Self::Error> {
        rocket::request::Outcome::Success(Since(crate::request_start(request)))
    }
}

#[get("/inbox?<limit>&<cursor>")]
async fn inbox_list<'r>(
    user: ApiUser,
    from_page: PageSession,
    since: Since,
    store: &'r State<Store>,
    base: &State<ApiBase>,
    limit: Option<&str>,
    cursor: Option<&str>,
) -> ApiResult<PageView<'r>> {
    from_page.check()?;
    let query = list_query(limit, cursor)?;
    let messages = store
        .inbox_listed_since(user.0, one_more(query), since.0)
        .await?;
    Ok(page(
        base,
        "inbox",
        messages,
        query.limit.unwrap_or(DEFAULT_LIMIT),
        store.level_tags(),
    ))
}

#[get("/archive?<limit>&<cursor>")]
async fn archive_list<'r>(
    user: ApiUser,
    store: &'r State<Store>,
    base: &State<ApiBase>,
    limit: Option<&str>,
    cursor: Option<&str>,
) -> ApiResult<PageView<'r>> {
    let query = list_query(limit, cursor)?;
    let messages = store
        .backend()
        .archive_list(user.0, one_more(query))
        .await?;
    Ok(page(
        base,
        "archive",
        Listed::all(messages),
        query.limit.unwrap_or(DEFAULT_LIMIT),
        store.level_tags(),
    ))
}

#[get("/inbox/<id>")]
async fn inbox_get(user: ApiUser, store: &State<Store>, id: &str) -> ApiResult<Json<ApiMessage>> {
    let id: MessageId = id.parse()?;
    let message = store
        .backend()
        .inbox_get(user.0, id)
        .await
        .map_err(not_in_inbox)?;
    Ok(Json(ApiMessage::new(&message, store.level_tags())))
}

/// The API's 404 for a message that is not in the user's inbox: it may be unknown, another
/// user's, or read (and still in the archive), so the answer says only what holds for all
/// three, and tells nothing about other users' messages.
fn not_in_inbox(e: Error) -> ApiError {
    match e {
        Error::MessageDoesNotExist(id) => ApiError::new(
            Status::NotFound,
            format!("message {id} is not in your inbox"),
        ),
        e => e.into(),
    }
}

#[get("/count")]
async fn count(
    user: ApiUser,
    from_page: PageSession,
    since: Since,
    store: &State<Store>,
) -> ApiResult<Json<Value>> {
    from_page.check()?;
    let unread = store.inbox_count_since(user.0, since.0).await?;
    Ok(Json(json!({ "unread": unread })))
}

/// The answer of a POST: JSON for scripts, a redirect back for plain forms.
#[derive(Responder)]
enum Done {
    Json(Json<Value>),
    Back(Box<Redirect>),
}

/// The form fields a plain-HTML button sends (the token is checked before routing).
#[derive(FromForm)]
struct BackForm<'r> {
    next: Option<&'r str>,
}

/// How a POST wants its answer: a urlencoded form body means a plain HTML button (redirect
/// back to its `next`, with a notice in the message stream saying what was done, since the
/// page that comes back cannot say it otherwise); anything else is a script (JSON). A form
/// body that cannot be read (too large, malformed) fails with its status, answered by the
/// JSON catchers.
enum Reply<'r> {
    Json,
    Back(String, Messages<'r>),
}

#[rocket::async_trait]
impl<'r> FromData<'r> for Reply<'r> {
    type Error = ();

    async fn from_data(request: &'r Request<'_>, data: Data<'r>) -> data::Outcome<'r, Self, ()> {
        if !request.content_type().is_some_and(|ct| ct.is_form()) {
            return data::Outcome::Success(Reply::Json);
        }
        let next = match Form::<BackForm<'r>>::from_data(request, data).await {
            data::Outcome::Success(form) => safe_next(form.next),
            data::Outcome::Error((status, _)) => return data::Outcome::Error((status, ())),
            data::Outcome::Forward(forward) => return data::Outcome::Forward(forward),
        };
        // Only plain buttons load the stream, for their notice: scripts do not pay for it.
        match request.guard::<Messages<'r>>().await {
            Outcome::Success(messages) => data::Outcome::Success(Reply::Back(next, messages)),
            Outcome::Error((status, _)) => data::Outcome::Error((status, ())),
            Outcome::Forward(status) => data::Outcome::Error((status, ())),
        }
    }
}

/// The id of the crate's message area (`stored_messages/messages`): a plain button's answer
/// goes back to it, so the page opens with focus on the notice that says what the button did
/// (a screen reader reads it; the next Tab goes on from there), not at the top of the page.
pub const NOTICE_ANCHOR: &str = "stored-messages";

/// `next` with [`NOTICE_ANCHOR`] as its fragment, unless it has one of its own.
fn with_anchor(next: String) -> String {
    if next.contains('#') {
        next
    } else {
        format!("{next}#{NOTICE_ANCHOR}")
    }
}

/// A text quoted in a notice: isolated, so right-to-left or override characters in it do
/// not reorder the words around it.
fn quoted(text: &str) -> String {
    format!("\u{201c}\u{2068}{text}\u{2069}\u{201d}")
}

/// A site-relative `next`, or `/`.
fn safe_next(next: Option<&str>) -> String {
    next.and_then(crate::local_path)
        .unwrap_or_else(|| "/".to_string())
}

impl Reply<'_> {
    fn is_back(&self) -> bool {
        matches!(self, Reply::Back(..))
    }

    /// The answer: `json` for a script; for a plain button, `notice` (a one-time message at
    /// `level`) and the redirect back, to the message area of the page (see
    /// [`NOTICE_ANCHOR`]).
    fn answer(self, json: Value, level: crate::Level, notice: &str) -> Done {
        match self {
            Reply::Json => Done::Json(Json(json)),
            Reply::Back(next, messages) => {
                // Always a flash message, even where the host stores the success level (a
                // stored notice would wait in the inbox to be marked read in turn). One the
                // host's `min_level` refuses is dropped, which is its choice.
                if let Err(e) = messages.add_flash(level, notice) {
                    log::warn!(
                        "stored-messages: a button's notice was not kept: {}",
                        report(&e)
                    );
                }
                Done::Back(Box::new(Redirect::to(with_anchor(next))))
            }
        }
    }
}

#[post("/inbox/<id>/read", data = "<reply>")]
async fn inbox_mark_read(
    user: ApiUser,
    store: &State<Store>,
    id: &str,
    reply: Reply<'_>,
) -> ApiResult<Done> {
    let id: MessageId = id.parse()?;
    // A plain button's notice names the message: read before it leaves the inbox.
    let text = match reply.is_back() {
        true => store
            .backend()
            .inbox_get(user.0, id)
            .await
            .ok()
            .map(|m| crate::request::message_summary(&m.message)),
        false => None,
    };
    if !store.mark_read(user.0, id).await? {
        // A plain button of a message read meanwhile (in another tab): what it asked for
        // holds, so back to the page, which shows the inbox as it is. Scripts get the 404.
        if reply.is_back() {
            let notice =
                "This message was no longer unread: read in another tab or window, or expired.";
            return Ok(reply.answer(Value::Null, crate::Level::INFO, notice));
        }
        return Err(not_in_inbox(Error::MessageDoesNotExist(id)));
    }
    let unread = store.backend().inbox_count(user.0).await?;
    let notice = match text {
        Some(text) => format!("Marked read: {}.", quoted(&text)),
        None => "Marked read.".to_string(),
    };
    let json = json!({ "id": id, "read": true, "unread": unread });
    Ok(reply.answer(json, crate::Level::SUCCESS, &notice))
}

#[post("/mark_all_read", data = "<reply>")]
async fn mark_all_read(user: ApiUser, store: &State<Store>, reply: Reply<'_>) -> ApiResult<Done> {
    let marked = store.mark_all_read(user.0).await?;
    // Counted again: a message may have arrived meanwhile.
    let unread = store.backend().inbox_count(user.0).await?;
    // The words stored-messages.js says for the same button.
    let (level, notice) = match marked {
        0 => (
            crate::Level::INFO,
            "There was nothing to mark read.".to_string(),
        ),
        1 => (crate::Level::SUCCESS, "1 message marked read.".to_string()),
        n => (
            crate::Level::SUCCESS,
            format!("All {n} messages marked read."),
        ),
    };
    let json = json!({ "marked": marked, "unread": unread });
    Ok(reply.answer(json, level, &notice))
}

#[get("/openapi.json")]
fn openapi(base: &State<ApiBase>) -> Json<Value> {
    Json(openapi_document_at(base.get().unwrap_or(BASE)))
}

/// The API routes, to mount at the API's base ([`BASE`] by default).
pub fn routes() -> Vec<Route> {
    routes![
        inbox_list,
        archive_list,
        inbox_get,
        count,
        inbox_mark_read,
        mark_all_read,
        openapi,
        crate::live::stream
    ]
}

/// What the API's catchers answer: the JSON error, or a short page for a plain HTML form.
#[derive(Responder)]
enum Failed {
    Json(Json<Value>),
    Page(RawHtml<String>),
}

#[catch(default)]
fn json_error(status: Status, request: &Request<'_>) -> Failed {
    let message = match status.code {
        401 => "authentication required: log in first",
        403 if crate::csrf::was_rejected(request) => {
            "missing or invalid CSRF token (send it in the X-CSRF-Token header)"
        }
        403 => "forbidden",
        404 => "not found",
        405 => "method not allowed",
        413 => "request body too large",
        422 => "the request could not be processed",
        400 => "bad request",
        503 => "message storage is unavailable, try again shortly",
        _ => "internal error",
    };
    if crate::csrf::is_page_form(request) {
        return Failed::Page(error_page(message, request));
    }
    Failed::Json(Json(error_body(status, message)))
}

/// The answer to a plain HTML form posted to the API that failed (the list's buttons without
/// JavaScript, during a store outage, say): a short page a browser shows, with a link back to
/// the page the form was on (its `next`, else its same-site `Referer`, else `/`), instead of
/// JSON shown as text. (A refused CSRF token gets the host's own 403 page instead, see
/// [`crate::csrf`].)
fn error_page(message: &str, request: &Request<'_>) -> RawHtml<String> {
    let back = request
        .local_cache(|| FormNext(None))
        .0
        .clone()
        .or_else(|| referer_path(request))
        .unwrap_or_else(|| "/".to_string());
    let mut text = message.to_string();
    if let Some(first) = text.get(..1) {
        text.replace_range(..1, &first.to_uppercase());
    }
    let mut html = String::from(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>Not done</title>\n</head>\n<body>\n<main>\n<h1>Not done</h1>\n<p>",
    );
    crate::template::push_escaped(&mut html, &text);
    html.push_str(".</p>\n<p><a href=\"");
    crate::template::push_escaped(&mut html, &back);
    html.push_str("\">Back to the page</a></p>\n</main>\n</body>\n</html>\n");
    RawHtml(html)
}

/// The `next` field of a plain HTML form posted to the API, as a safe local path: the CSRF
/// check reads it from the body's first bytes, so the "Not done" page links back to it even
/// when the request failed before its body was read (a session that ended, say).
struct FormNext(Option<String>);

/// Keeps the `next` field among `peeked`, the first bytes of a urlencoded body (`complete`:
/// the whole body), for the "Not done" page. Called by the CSRF check.
pub(crate) fn remember_next(request: &Request<'_>, peeked: &[u8], complete: bool) {
    let next = crate::csrf::form_field(peeked, "next", complete)
        .and_then(|raw| {
            rocket::http::RawStr::new(&raw)
                .url_decode()
                .ok()
                .map(|decoded| decoded.into_owned())
        })
        .and_then(|next| crate::local_path(&next));
    request.local_cache(|| FormNext(next));
}

/// The path of the page a form was sent from (its `Referer`, when that is this site), as a
/// safe local path: where the "Not done" page links back to when the form sent no `next`.
fn referer_path(request: &Request<'_>) -> Option<String> {
    let referer = rocket::http::uri::Absolute::parse(request.headers().get_one("Referer")?).ok()?;
    let host = request.headers().get_one("Host")?;
    let authority = referer.authority()?;
    let same_site = match authority.port() {
        Some(port) => format!("{}:{port}", authority.host()),
        None => authority.host().to_string(),
    };
    if !same_site.eq_ignore_ascii_case(host) {
        return None;
    }
    let path = match referer.query() {
        Some(query) => format!("{}?{query}", referer.path()),
        None => referer.path().to_string(),
    };
    crate::local_path(&path)
}

/// JSON catchers for everything under the API's base.
pub fn catchers() -> Vec<Catcher> {
    catchers![json_error]
}

/// Rewrites `/messages/inbox/` to `/messages/inbox` (keeping the query): the trailing slash
/// is optional on every API path. Called by the fairing's `on_request`.
pub(crate) fn normalize_trailing_slash(request: &mut Request<'_>, base: Option<&str>) {
    let path = request.uri().path().as_str();
    let Some(base) = base else { return };
    if path.len() > base.len() + 1 && path.ends_with('/') && ApiBase::contains(Some(base), path) {
        let trimmed = path.trim_end_matches('/');
        let uri = match request.uri().query() {
            Some(q) => format!("{trimmed}?{q}"),
            None => trimmed.to_string(),
        };
        if let Ok(origin) = Origin::parse_owned(uri) {
            request.set_uri(origin);
        }
    }
}

/// The OpenAPI 3 description of the routes above, mounted at [`BASE`].
pub fn openapi_document() -> Value {
    openapi_document_at(BASE)
}

/// The OpenAPI 3 description of the routes above, mounted at `base`.
pub fn openapi_document_at(base: &str) -> Value {
    let message_ref = json!({ "$ref": "#/components/schemas/Message" });
    let page_ref = json!({ "$ref": "#/components/schemas/Page" });
    let error = json!({ "description": "error", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } });
    let paging = json!([
        { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT } },
        { "name": "cursor", "in": "query", "schema": { "type": "string" }, "description": "next_cursor of the previous page" }
    ]);
    let session = json!({ "name": "session", "in": "query", "schema": { "type": "string" },
        "description": "the session a page was drawn for (live::page_tag of its CSRF token): 401 if that session ended" });
    let inbox_params = json!([paging[0].clone(), paging[1].clone(), session.clone()]);
    let id_param =
        json!([{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } }]);
    let csrf = json!([{ "name": "X-CSRF-Token", "in": "header", "required": true, "schema": { "type": "string" } }]);
    let ok = |schema: Value| json!({ "description": "ok", "content": { "application/json": { "schema": schema } } });
    let mut document = json!({
        "openapi": "3.0.3",
        "info": { "title": "stored-messages", "version": env!("CARGO_PKG_VERSION"),
                  "description": "Stored messages of the logged-in user (session cookie). State-changing requests need the X-CSRF-Token header." },
        "paths": {
            "/messages/inbox": { "get": { "summary": "Unread messages, oldest first", "parameters": inbox_params,
                "responses": { "200": ok(page_ref.clone()), "400": error, "401": error, "422": error } } },
            "/messages/inbox/{id}": { "get": { "summary": "One unread message", "parameters": id_param,
                "responses": { "200": ok(message_ref.clone()), "401": error, "404": error } } },
            "/messages/inbox/{id}/read": { "post": { "summary": "Mark one message read",
                "parameters": [id_param[0].clone(), csrf[0].clone()],
                "responses": { "200": ok(json!({ "type": "object", "properties": { "id": { "type": "string" }, "read": { "type": "boolean" }, "unread": { "type": "integer" } } })),
                               "401": error, "403": error, "404": error } } },
            "/messages/mark_all_read": { "post": { "summary": "Mark every unread message read", "parameters": csrf,
                "responses": { "200": ok(json!({ "type": "object", "properties": { "marked": { "type": "integer" }, "unread": { "type": "integer" } } })),
                               "401": error, "403": error } } },
            "/messages/archive": { "get": { "summary": "Every message received, newest first", "parameters": paging,
                "responses": { "200": ok(page_ref), "400": error, "401": error, "422": error } } },
            "/messages/count": { "get": { "summary": "Number of unread messages", "parameters": [session.clone()],
                "responses": { "200": ok(json!({ "type": "object", "properties": { "unread": { "type": "integer" } } })), "401": error } } },
            "/messages/stream": { "get": { "summary": "Server-sent events of the inbox: message, read, count, resync (see the crate's `live` module)",
                "parameters": [
                    { "name": "Last-Event-ID", "in": "header", "schema": { "type": "string" }, "description": "the id of the last event received: missed messages are replayed, or resync is sent" },
                    { "name": "since", "in": "query", "schema": { "type": "string" }, "description": "the same, for a first connection (an event id a page was rendered with)" },
                    session
                ],
                "responses": { "200": { "description": "text/event-stream", "content": { "text/event-stream": { "schema": { "type": "string" } } } }, "401": error, "429": error } } },
            "/messages/openapi.json": { "get": { "summary": "This document", "responses": { "200": { "description": "OpenAPI 3 document" } } } }
        },
        "components": { "schemas": {
            "Message": { "type": "object", "required": ["id", "message", "level", "level_tag", "tags", "extra_tags", "date", "url"],
                "properties": {
                    "id": { "type": "string" }, "message": { "type": "string" }, "level": { "type": "integer" },
                    "level_tag": { "type": "string" }, "tags": { "type": "string" }, "extra_tags": { "type": "string" },
                    "date": { "type": "string", "format": "date-time" }, "url": { "type": "string", "nullable": true } } },
            "Page": { "type": "object", "required": ["messages", "next_cursor", "next"], "properties": {
                "messages": { "type": "array", "items": message_ref },
                "next_cursor": { "type": "string", "nullable": true }, "next": { "type": "string", "nullable": true } } },
            "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "object",
                "required": ["status", "code", "message"], "properties": {
                    "status": { "type": "integer" }, "code": { "type": "string" }, "message": { "type": "string" } } } } }
        } }
    });
    // The paths above are written at the default base; move them to the real one.
    if base != BASE {
        if let Some(paths) = document.get_mut("paths").and_then(Value::as_object_mut) {
            *paths = std::mem::take(paths)
                .into_iter()
                .map(|(path, item)| (format!("{base}{}", &path[BASE.len()..]), item))
                .collect();
        }
    }
    document
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = Cursor {
            date: chrono::DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            id: MessageId(42),
        };
        assert_eq!(decode_cursor(&encode_cursor(&c)), Some(c));
        for bad in ["", "!!", "bm9wZQ", "MTox"] {
            let _ = decode_cursor(bad);
        }
        assert_eq!(decode_cursor("bm9wZQ"), None);
    }

    #[test]
    fn limits_are_checked() {
        assert_eq!(list_query(None, None).unwrap().limit, Some(DEFAULT_LIMIT));
        assert_eq!(list_query(Some("200"), None).unwrap().limit, Some(200));
        assert_eq!(
            list_query(Some("0"), None).unwrap_err().status,
            Status::UnprocessableEntity
        );
        assert_eq!(
            list_query(Some("201"), None).unwrap_err().status,
            Status::UnprocessableEntity
        );
        assert_eq!(
            list_query(Some("x"), None).unwrap_err().status,
            Status::BadRequest
        );
        assert_eq!(
            list_query(None, Some("%%")).unwrap_err().status,
            Status::BadRequest
        );
    }

    #[test]
    fn pages_are_written_exactly_as_serde_json_writes_them() {
        use crate::level::Level;
        let tags = LevelTags::new([(Level(77), "custom".to_string())].into());
        let message = |id: i64, text: &str, extra: &str, url: Option<&str>, level: Level| Message {
            id: MessageId(id),
            level,
            message: text.to_string(),
            extra_tags: extra.to_string(),
            url: url.map(str::to_string),
            date: chrono::DateTime::from_timestamp_micros(1_764_000_000_123_456 + id).unwrap(),
        };
        let messages = vec![
            message(1, "plain", "", None, Level::STORED_INFO),
            message(
                2,
                "quote \" backslash \\ newline \n tab \t bell \u{7} ❤ </script>",
                "a b",
                Some("/x?y=\"z\""),
                Level(77),
            ),
            message(3, "", "", Some("https://example.com"), Level(5)),
            message(-4, "tagged", "urgent \"x\"", None, Level::STORED_INFO),
        ];
        for (next_cursor, next) in [
            (None, None),
            (
                Some("abc".to_string()),
                Some("/messages/inbox?limit=2&cursor=abc".to_string()),
            ),
        ] {
            let view = PageView {
                messages: Listed::all(messages.clone()),
                tags: &tags,
                next_cursor: next_cursor.clone(),
                next: next.clone(),
            };
            let expected = serde_json::to_string(&Page {
                messages: messages.iter().map(|m| ApiMessage::new(m, &tags)).collect(),
                next_cursor,
                next,
            })
            .unwrap();
            assert_eq!(String::from_utf8(view.to_json()).unwrap(), expected);
        }
    }

    #[test]
    fn pages_from_a_cache_entry_are_written_as_pages_from_the_backend() {
        use crate::backend::cache::Window;
        use crate::level::Level;
        let message = |id: i64, text: &str, level: Level| Message {
            id: MessageId(id),
            level,
            message: text.to_string(),
            extra_tags: if id % 2 == 0 {
                "a \"b\"".into()
            } else {
                String::new()
            },
            url: (id == 3).then(|| "/x".to_string()),
            date: chrono::DateTime::from_timestamp_micros(1_764_000_000_000_000 + id).unwrap(),
        };
        let messages: Vec<Message> = (1..=5)
            .map(|id| message(id, &format!("message {id} \u{1} ❤"), Level(70 + id as i32)))
            .collect();
        let window = std::sync::Arc::new(Window::new(messages.clone()));
        let custom = LevelTags::new([(Level(72), "custom".to_string())].into());
        let default = LevelTags::default();
        // The first write keeps the JSON; the next ones copy it; a store with other tags
        // sharing the cache writes its own.
        for tags in [&custom, &custom, &default, &custom] {
            for picked in [vec![], vec![0, 1, 2, 3, 4], vec![1, 4], vec![4]] {
                let view = PageView {
                    messages: Listed::Shared(window.clone(), picked.clone()),
                    tags,
                    next_cursor: None,
                    next: None,
                };
                let owned = PageView {
                    messages: Listed::all(picked.iter().map(|&i| messages[i].clone()).collect()),
                    tags,
                    next_cursor: None,
                    next: None,
                };
                assert_eq!(
                    String::from_utf8(view.to_json()).unwrap(),
                    String::from_utf8(owned.to_json()).unwrap(),
                    "{picked:?}"
                );
            }
        }
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let pieces = [
            "", "a", "é", "❤", "\"", "\\", "\n", "\r", "\t", "\u{8}", "\u{c}", "\u{1}", "\u{1f}",
            " ", "!", "#", "[", "]", "\u{7f}", "\u{80}", "\u{ff}", "\u{2028}", "0123456", "😀",
        ];
        // Every triple of pieces, after every padding 0..=9 (so each piece is tested at
        // every place in an eight-byte word and across words).
        for pad in 0..=9 {
            for a in pieces {
                for b in pieces {
                    for c in pieces {
                        let text = format!("{}{a}{}{b}{c}", "x".repeat(pad), "y".repeat(pad % 4));
                        let mut out = Vec::new();
                        push_json_str(&mut out, &text);
                        let out = String::from_utf8(out).unwrap();
                        assert_eq!(out, serde_json::to_string(&text).unwrap(), "{text:?}");
                    }
                }
            }
        }
        let every_char: String = (0..=0x3000).filter_map(char::from_u32).collect();
        let mut out = Vec::new();
        push_json_str(&mut out, &every_char);
        assert_eq!(out, serde_json::to_string(&every_char).unwrap().as_bytes());
    }

    #[test]
    fn integers_are_written_in_decimal() {
        for n in [
            i64::MIN,
            -1_000_000_007,
            -10,
            -9,
            -1,
            0,
            1,
            9,
            10,
            99,
            100,
            12_345,
            i64::MAX,
        ] {
            let mut out = b"x".to_vec();
            push_int(&mut out, n);
            assert_eq!(out, format!("x{n}").as_bytes());
        }
    }
}
