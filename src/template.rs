//! Tera helpers: `stored_messages_list(limit=10)`, `stored_messages_archive(limit=10)`,
//! `stored_messages_count()` and `csrf_token()`, for the current user of any page.
//!
//! Tera functions are synchronous and see only their arguments, so they cannot know whose
//! page is being rendered, and must never wait for a database. They therefore render a
//! marker: an HTML comment carrying a per-process random nonce. After the page is rendered,
//! the [`crate::StoredMessages`] fairing replaces each marker with that request's data,
//! fetched asynchronously for that request's user and rendered through the overridable
//! partial `stored_messages/list.html.tera`. Two users rendering at the same moment each get
//! their own data, because the data is joined to the response, never to a thread.
//!
//! Consequences worth knowing: the helpers print their value but are not values inside the
//! template (`{% if stored_messages_count() > 0 %}` compares a marker, not a number; use the
//! [`crate::Messages`] guard or the JSON API for logic), and markers are only filled in
//! `text/html` responses.
//!
//! # Rendering once
//!
//! Rendering with Tera costs far more than the rest of a request (an interpreter walking the
//! context as JSON values). A rendered template depends only on its name, its context and
//! the template files (unless it calls `now()`, `get_random()` or similar), and the helpers
//! print markers rather than per-user data, so
//! [`Page`] (a drop-in for `Template::render`) and the list partial keep their output in a
//! bounded memo ([`RenderMemo`]) keyed by exactly those: the same context renders once,
//! and any other context renders afresh. [`register`] runs whenever rocket_dyn_templates
//! (re)loads the templates, and a reload starts a new generation of the memo, so edited
//! templates show at once in development.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rocket::http::{ContentType, Status};
use rocket::response::{self, Responder};
use rocket::serde::json::json;
use rocket::{Orbit, Request, Response, Rocket};
use rocket_dyn_templates::tera::{self, Tera, Value};
use rocket_dyn_templates::{Metadata, Template};

use crate::backend::ListQuery;
use crate::csrf;
use crate::message::{Message, UserId};
use crate::ops::Store;
use crate::request::StreamMessage;

/// The partial that renders a list of messages; override it in your templates directory.
pub const LIST_TEMPLATE: &str = "stored_messages/list";
/// Largest `limit` the list helpers accept.
pub const MAX_HELPER_LIMIT: u32 = 200;

/// A per-process random prefix for markers, so text on a page can never forge one.
fn marker_prefix() -> &'static str {
    static PREFIX: OnceLock<String> = OnceLock::new();
    PREFIX.get_or_init(|| format!("<!--stored-messages:{}:", crate::flash::overflow::new_key()))
}

const MARKER_END: &str = "-->";

/// What one marker asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    List(u32),
    Archive(u32),
    Count,
    Csrf,
}

impl Slot {
    fn encode(self) -> String {
        let body = match self {
            Slot::List(n) => format!("list:{n}"),
            Slot::Archive(n) => format!("archive:{n}"),
            Slot::Count => "count".to_string(),
            Slot::Csrf => "csrf".to_string(),
        };
        format!("{}{body}{MARKER_END}", marker_prefix())
    }

    fn decode(body: &str) -> Option<Slot> {
        match body.split_once(':') {
            Some(("list", n)) => n.parse().ok().map(Slot::List),
            Some(("archive", n)) => n.parse().ok().map(Slot::Archive),
            None if body == "count" => Some(Slot::Count),
            None if body == "csrf" => Some(Slot::Csrf),
            _ => None,
        }
    }
}

/// A helper that renders a marker for `kind`; safe, so Tera does not escape the marker.
struct Helper {
    kind: fn(u32) -> Slot,
    takes_limit: bool,
}

impl tera::Function for Helper {
    fn call(&self, args: &HashMap<String, Value>) -> tera::Result<Value> {
        let limit = match args.get("limit") {
            None => 10,
            Some(value) if self.takes_limit => value
                .as_u64()
                .filter(|n| (1..=u64::from(MAX_HELPER_LIMIT)).contains(n))
                .map(|n| n as u32)
                .ok_or_else(|| {
                    tera::Error::msg(format!(
                        "limit must be an integer from 1 to {MAX_HELPER_LIMIT}, not {value}"
                    ))
                })?,
            Some(_) => return Err(tera::Error::msg("this helper takes no arguments")),
        };
        Ok(Value::String((self.kind)(limit).encode()))
    }

    fn is_safe(&self) -> bool {
        true
    }
}

/// Registers the helpers on a Tera instance: call it from `Template::custom`.
///
/// ```no_run
/// use rocket_dyn_templates::Template;
///
/// let templates = Template::custom(|engines| stored_messages::template::register(&mut engines.tera));
/// ```
pub fn register(tera: &mut Tera) {
    // Called again on every template reload: what was rendered before is out of date.
    GENERATION.fetch_add(1, Ordering::SeqCst);
    tera.register_function(
        "stored_messages_list",
        Helper {
            kind: Slot::List,
            takes_limit: true,
        },
    );
    tera.register_function(
        "stored_messages_archive",
        Helper {
            kind: Slot::Archive,
            takes_limit: true,
        },
    );
    tera.register_function(
        "stored_messages_count",
        Helper {
            kind: |_| Slot::Count,
            takes_limit: false,
        },
    );
    tera.register_function(
        "csrf_token",
        Helper {
            kind: |_| Slot::Csrf,
            takes_limit: false,
        },
    );
}

/// Replaces the markers of an HTML response with the data of its request's user. Called by
/// the fairing once the stream's read marks are settled, so counts are up to date.
///
/// `unread` is the user's inbox as the request left it, when the request loaded it (the
/// `Messages` guard): the count and list helpers then need no query.
pub(crate) async fn fill<'r>(
    request: &'r Request<'_>,
    response: &mut Response<'r>,
    store: &Store,
    user: Option<UserId>,
    unread: Option<Vec<Message>>,
) {
    if response.content_type() != Some(ContentType::HTML) {
        return;
    }
    let body = match response.body_mut().to_string().await {
        Ok(body) => body,
        Err(e) => {
            log::warn!("stored-messages: could not read the response body: {e}");
            return;
        }
    };
    if !body.contains(marker_prefix()) {
        response.set_sized_body(body.len(), std::io::Cursor::new(body));
        return;
    }
    let filled = replace_markers(&body, request, store, user, unread.as_deref()).await;
    response.set_sized_body(filled.len(), std::io::Cursor::new(filled));
}

async fn replace_markers(
    body: &str,
    request: &Request<'_>,
    store: &Store,
    user: Option<UserId>,
    unread: Option<&[Message]>,
) -> String {
    let prefix = marker_prefix();
    let mut out = String::with_capacity(body.len() + 1024);
    let mut rest = body;
    let mut cache: Vec<(Slot, String)> = Vec::new();
    while let Some(start) = rest.find(prefix) {
        out.push_str(&rest[..start]);
        let after = &rest[start + prefix.len()..];
        let Some(end) = after.find(MARKER_END) else {
            out.push_str(&rest[start..]);
            rest = "";
            break;
        };
        match Slot::decode(&after[..end]) {
            Some(slot) => {
                if let Some((_, html)) = cache.iter().find(|(s, _)| *s == slot) {
                    out.push_str(html);
                } else {
                    let html = render_slot(slot, request, store, user, unread).await;
                    out.push_str(&html);
                    cache.push((slot, html));
                }
            }
            None => out.push_str(&rest[start..start + prefix.len() + end + MARKER_END.len()]),
        }
        rest = &after[end + MARKER_END.len()..];
    }
    out.push_str(rest);
    out
}

async fn render_slot(
    slot: Slot,
    request: &Request<'_>,
    store: &Store,
    user: Option<UserId>,
    unread: Option<&[Message]>,
) -> String {
    let tags = store.level_tags();
    let backend = store.backend();
    let (kind, result) = match (slot, user) {
        (Slot::Csrf, _) => return csrf::ensure_token(request),
        (Slot::Count, None) => return "0".to_string(),
        (Slot::Count, Some(_)) if unread.is_some() => {
            return unread.map_or(0, <[Message]>::len).to_string();
        }
        (Slot::List(n), Some(_)) if unread.is_some() => {
            let unread = unread.unwrap_or_default();
            let first = &unread[..unread.len().min(n as usize)];
            ("inbox", Ok(Cow::Borrowed(first)))
        }
        (Slot::Count, Some(user)) => {
            return match backend.inbox_count(user).await {
                Ok(n) => n.to_string(),
                Err(e) => {
                    log::error!(
                        "stored-messages: count for user {user} failed: {}",
                        crate::report(&e)
                    );
                    "?".to_string()
                }
            }
        }
        (Slot::List(_), None) => ("inbox", Ok(Cow::Owned(Vec::new()))),
        (Slot::Archive(_), None) => ("archive", Ok(Cow::Owned(Vec::new()))),
        (Slot::List(n), Some(user)) => (
            "inbox",
            backend
                .inbox_list(user, ListQuery::first(n))
                .await
                .map(Cow::Owned),
        ),
        (Slot::Archive(n), Some(user)) => (
            "archive",
            backend
                .archive_list(user, ListQuery::first(n))
                .await
                .map(Cow::Owned),
        ),
    };
    let messages: Cow<'_, [Message]> = match result {
        Ok(messages) => messages,
        Err(e) => {
            log::error!(
                "stored-messages: {kind} helper failed: {}",
                crate::report(&e)
            );
            return "<p class=\"stored-messages-error\">Messages are unavailable right now.</p>"
                .to_string();
        }
    };
    let next = request.uri().to_string();
    let csrf = csrf::ensure_token(request);
    let stream = || -> Vec<StreamMessage> {
        messages
            .iter()
            .map(|m| StreamMessage::stored(m, tags))
            .collect()
    };
    let has_partial = match request.guard::<Metadata<'_>>().await {
        rocket::outcome::Outcome::Success(meta) => meta.contains_template(LIST_TEMPLATE),
        _ => false,
    };
    if !has_partial {
        return fallback_list(&stream(), kind);
    }
    // The memo key names what the partial shows without building its context: a stored
    // message never changes, and its id with its date identify it (ids are not reused; the
    // date guards against a store that lost its data and starts over).
    let mut key = format!("{kind}\n{csrf}\n{next}\n");
    for m in messages.iter() {
        // Writing to a String cannot fail.
        let _ = writeln!(
            key,
            "{}.{}.{}",
            m.id.0,
            m.date.timestamp_micros(),
            m.level.0
        );
    }
    let context =
        |_: &str| json!({ "messages": stream(), "kind": kind, "csrf": csrf, "next": next });
    match render_memo(request.rocket(), Cow::Borrowed(LIST_TEMPLATE), key, context) {
        Some(html) => html.to_string(),
        None => fallback_list(&stream(), kind),
    }
}

/// Bumped by [`register`], i.e. whenever the templates are (re)loaded.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Most bytes (contexts and output) the memo keeps.
const MEMO_BYTES: usize = 8 << 20;

#[derive(PartialEq, Eq, Hash)]
struct MemoKey {
    name: Cow<'static, str>,
    generation: u64,
    /// The context as JSON: exactly what the template sees.
    context: String,
}

#[derive(Default)]
struct MemoEntries {
    map: HashMap<MemoKey, Arc<str>>,
    bytes: usize,
}

/// Rendered templates by (name, context, template generation); see the module docs.
/// Managed by the [`crate::StoredMessages`] fairing.
#[derive(Default)]
pub struct RenderMemo {
    entries: Mutex<MemoEntries>,
}

impl RenderMemo {
    fn get(&self, key: &MemoKey) -> Option<Arc<str>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.map.get(key).cloned()
    }

    fn put(&self, key: MemoKey, html: Arc<str>) {
        let size = key.context.len() + html.len();
        if size > MEMO_BYTES / 8 {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        while entries.bytes + size > MEMO_BYTES && !entries.map.is_empty() {
            // HashMap order is effectively random: an arbitrary entry makes room.
            let victim = entries.map.keys().next().map(|k| MemoKey {
                name: k.name.clone(),
                generation: k.generation,
                context: k.context.clone(),
            });
            if let Some(old) = victim.and_then(|k| entries.map.remove_entry(&k)) {
                entries.bytes -= old.0.context.len() + old.1.len();
            }
        }
        entries.bytes += size;
        if let Some(old) = entries.map.insert(key, html) {
            entries.bytes -= size;
            let _ = old;
        }
    }
}

/// Renders template `name`, through the memo when the fairing manages one: `key` must
/// determine the output completely, and `context` builds what the template sees on a miss
/// (it is given the key).
/// `None` when the template does not exist or fails to render (Tera logs why).
fn render_memo(
    rocket: &Rocket<Orbit>,
    name: Cow<'static, str>,
    key: String,
    context: impl FnOnce(&str) -> serde_json::Value,
) -> Option<Arc<str>> {
    let memo = rocket.state::<RenderMemo>();
    let key = MemoKey {
        name,
        generation: GENERATION.load(Ordering::SeqCst),
        context: key,
    };
    if let Some(html) = memo.and_then(|memo| memo.get(&key)) {
        return Some(html);
    }
    let html: Arc<str> = Template::show(rocket, key.name.clone(), context(&key.context))?.into();
    if let Some(memo) = memo {
        memo.put(key, html.clone());
    }
    Some(html)
}

/// An HTML page rendered from a Tera template: a drop-in for `Template::render` that renders
/// each distinct context once (see the module docs). The context is serialized when the
/// page is made, like `Template::render` does, so a [`crate::Messages`] stream in it counts
/// as shown then.
///
/// The memo assumes the output depends on nothing but the context: keep `Template::render`
/// for templates that call Tera's `now()`, `get_random()` or `get_env()`, or functions and
/// filters of your own that read other state (a per-request nonce would be shared). The
/// answer is always `text/html`, whatever the template's extension.
///
/// ```no_run
/// # use rocket::get;
/// use rocket_dyn_templates::context;
/// use stored_messages::{template::Page, Messages};
///
/// #[get("/")]
/// fn index(messages: Messages<'_>) -> Page {
///     Page::render("index", context! { messages })
/// }
/// ```
pub struct Page {
    name: Cow<'static, str>,
    context: Result<String, serde_json::Error>,
}

impl Page {
    /// The page `name` (a template such as `"index"` for `index.html.tera`) with `context`.
    pub fn render(name: impl Into<Cow<'static, str>>, context: impl serde::Serialize) -> Page {
        Page {
            name: name.into(),
            context: serde_json::to_string(&context),
        }
    }
}

impl<'r> Responder<'r, 'static> for Page {
    fn respond_to(self, request: &'r Request<'_>) -> response::Result<'static> {
        let context = self.context.map_err(|e| {
            log::error!(
                "stored-messages: the context of page {} failed to serialize: {e}",
                self.name
            );
            Status::InternalServerError
        })?;
        // The key is the serialized context itself; a miss parses it back for Tera.
        let parsed = |json: &str| serde_json::from_str(json).unwrap_or_default();
        let html =
            render_memo(request.rocket(), self.name.clone(), context, parsed).ok_or_else(|| {
                log::error!("stored-messages: page {} failed to render", self.name);
                Status::InternalServerError
            })?;
        (ContentType::HTML, html.to_string()).respond_to(request)
    }
}

/// The list without a template (when the host has not copied the partial): same markup,
/// escaped here.
fn fallback_list(messages: &[StreamMessage], kind: &str) -> String {
    // Without the partial there are no buttons: the host renders its own controls.
    let mut html = format!("<ul class=\"stored-messages stored-messages-{kind}\">");
    for m in messages {
        let id = m.id.map(|id| id.to_string()).unwrap_or_default();
        html.push_str(&format!(
            "<li class=\"message {}\" data-id=\"{}\">",
            escape(&m.tags),
            escape(&id)
        ));
        match &m.url {
            Some(url) => html.push_str(&format!(
                "<a href=\"{}\">{}</a>",
                escape(url),
                escape(&m.message)
            )),
            None => html.push_str(&escape(&m.message)),
        }
        html.push_str("</li>");
    }
    html.push_str("</ul>");
    html
}

/// HTML-escapes text for element content and quoted attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#x27;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip() {
        for slot in [Slot::List(10), Slot::Archive(200), Slot::Count, Slot::Csrf] {
            let marker = slot.encode();
            let body = marker
                .strip_prefix(marker_prefix())
                .unwrap()
                .strip_suffix(MARKER_END)
                .unwrap();
            assert_eq!(Slot::decode(body), Some(slot));
        }
        assert_eq!(Slot::decode("list:x"), None);
        assert_eq!(Slot::decode("other"), None);
    }

    #[test]
    fn helpers_validate_their_limit() {
        let mut tera = Tera::default();
        register(&mut tera);
        tera.add_raw_template(
            "ok.html",
            "{{ stored_messages_list(limit=5) }}|{{ stored_messages_count() }}",
        )
        .unwrap();
        let out = tera.render("ok.html", &tera::Context::new()).unwrap();
        assert!(
            out.contains("list:5-->") && out.contains("count-->"),
            "{out}"
        );
        assert!(!out.contains("&lt;"), "markers are not escaped");
        tera.add_raw_template("bad.html", "{{ stored_messages_list(limit=0) }}")
            .unwrap();
        assert!(tera.render("bad.html", &tera::Context::new()).is_err());
        tera.add_raw_template("bad2.html", "{{ stored_messages_list(limit='x') }}")
            .unwrap();
        assert!(tera.render("bad2.html", &tera::Context::new()).is_err());
    }

    #[test]
    fn fallback_escapes_text_and_urls() {
        let m = StreamMessage {
            id: None,
            stored: true,
            level: crate::Level::INFO,
            level_tag: "info".into(),
            tags: "x\" onclick=\"y info".into(),
            extra_tags: String::new(),
            message: "<script>alert(1)</script>".into(),
            url: Some("/a?b=\"c\"".into()),
            date: chrono::Utc::now(),
            date_text: String::new(),
            summary: String::new(),
        };
        let html = fallback_list(&[m], "inbox");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!html.contains("<script>"));
        assert!(html.contains("x&quot; onclick=&quot;y info"));
    }
}
