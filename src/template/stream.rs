//! The stream partial (`stored_messages/messages`), the crate's own written by Rust.
//!
//! Every page includes it, and Tera's interpreter is slow at what it does: a dozen
//! `{{ m.field }}` lookups per message, each through JSON values. When the host has no
//! override, the name `stored_messages/messages` holds [`FAST_SOURCE`] instead, which hands
//! the `messages` value to [`StreamPartial`], a Tera filter that writes exactly what
//! `messages.html.tera` renders in an escaping page (a test compares both byte for byte). The
//! template file stays the documentation and the starting point for an override.
//!
//! Most pages never look inside the stream: they include the partial and count the
//! messages. For them, turning each message into a Tera map of 13 fields, reading the fields
//! back in the filter and freeing them all was a third of a page's cost. So [`Page`] defers
//! it: while `Page::render` serializes the context, a [`Messages`] stream in it leaves a
//! [`StreamSnapshot`] here and puts a stand-in in the context, an array of as many numbers as
//! there are messages (see [`serialize_placeholder`]). If the page's templates use that name
//! only in ways the stand-in answers alike (its length, whether it is empty, or this
//! filter; see [`super::uses`]), the stand-in stays and the filter writes the partial from
//! the snapshot. Anywhere else, the page replaces the stand-in with the stream's JSON before
//! rendering, so a template sees exactly what it saw before.
//!
//! [`Page`]: super::Page
//! [`Messages`]: crate::Messages

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use rocket_dyn_templates::tera::{self, Value};
use serde::ser::Serializer;

use super::helpers::page_stream;
use super::list::{push_escaped, push_message_text};
use crate::request::{long_head, StreamSnapshot};

/// The Tera filter [`FAST_SOURCE`] applies. A filter, not a function: Tera hands a filter
/// the value it filters by reference, but copies every argument of a function call (the
/// whole stream, on every page).
pub(crate) const FILTER: &str = "stored_messages_stream_partial";

/// What `stored_messages/messages` holds when the host has no override: the partial's
/// output for an empty or missing `messages`, and the filter for the rest (the line
/// breaks around them are the template's own).
pub(crate) const FAST_SOURCE: &str = "\n{% if messages %}{{ messages | stored_messages_stream_partial }}{% else %}<div class=\"messages\" id=\"stored-messages\" tabindex=\"-1\" aria-live=\"polite\">\n</div>{% endif %}\n";

/// Renders `messages` as `messages.html.tera` does.
pub(crate) struct StreamPartial;

impl tera::Filter for StreamPartial {
    fn filter(&self, messages: &Value, _: &HashMap<String, Value>) -> tera::Result<Value> {
        if is_placeholder(messages) {
            let stream = page_stream().ok_or_else(|| {
                tera::Error::msg(
                    "stored_messages/messages: the stream's stand-in reached a page that has \
                     no stream",
                )
            })?;
            return Ok(Value::String(render_snapshot(&stream)));
        }
        Ok(Value::String(render(messages)?))
    }

    fn is_safe(&self) -> bool {
        true
    }
}

/// What `Page::render` caught of a stream while it serialized its context.
enum Capture {
    /// Not in `Page::render`: streams serialize in full.
    Off,
    /// In `Page::render`, no stream deferred yet.
    Open,
    /// A stream was deferred; a second one in the same context serializes in full.
    Taken(Arc<StreamSnapshot>),
}

thread_local! {
    static CAPTURE: RefCell<Capture> = const { RefCell::new(Capture::Off) };
}

/// Runs `serialize` (a page's context being serialized), and returns its result with the
/// stream it deferred, if any. Nothing is deferred outside of it.
pub(crate) fn capture<T>(serialize: impl FnOnce() -> T) -> (T, Option<Arc<StreamSnapshot>>) {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            CAPTURE.with(|c| *c.borrow_mut() = Capture::Off);
        }
    }
    CAPTURE.with(|c| *c.borrow_mut() = Capture::Open);
    // Closed however `serialize` ends, even by a panic.
    let _reset = Reset;
    let result = serialize();
    let taken = CAPTURE.with(|c| std::mem::replace(&mut *c.borrow_mut(), Capture::Off));
    let stream = match taken {
        Capture::Taken(stream) => Some(stream),
        Capture::Off | Capture::Open => None,
    };
    (result, stream)
}

/// Called by a stream as it serializes: when a page's context is being serialized and no
/// stream was deferred yet, keeps `snapshot()` for the page and returns its length (the
/// stream then serializes as [`serialize_placeholder`]). `None`: serialize in full.
pub(crate) fn defer(snapshot: impl FnOnce() -> StreamSnapshot) -> Option<usize> {
    CAPTURE.with(|c| {
        let mut c = c.borrow_mut();
        if !matches!(*c, Capture::Open) {
            return None;
        }
        let snapshot = snapshot();
        let len = snapshot.len();
        *c = Capture::Taken(Arc::new(snapshot));
        Some(len)
    })
}

/// The number each element of a stand-in is: random per process, so no value a host puts in
/// a context is taken for one.
fn placeholder_number() -> u64 {
    static NUMBER: OnceLock<u64> = OnceLock::new();
    // Below 2^53, where every JSON reader keeps integers exact.
    *NUMBER.get_or_init(|| rand::random::<u64>() >> 11)
}

/// A deferred stream of `len` messages: an array of `len` copies of [`placeholder_number`],
/// which has the stream's length and truthiness.
pub(crate) fn serialize_placeholder<S: Serializer>(
    serializer: S,
    len: usize,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(std::iter::repeat(placeholder_number()).take(len))
}

/// Whether `value` is a deferred stream's stand-in. An empty array is not: an empty stream's
/// JSON is the same empty array.
pub(crate) fn is_placeholder(value: &Value) -> bool {
    match value {
        Value::Array(items) => {
            !items.is_empty()
                && items
                    .iter()
                    .all(|v| v.as_u64() == Some(placeholder_number()))
        }
        _ => false,
    }
}

/// Replaces every stand-in in `value` with `stream`'s JSON.
pub(crate) fn materialize(
    value: &mut Value,
    stream: &StreamSnapshot,
) -> Result<(), serde_json::Error> {
    match value {
        v if is_placeholder(v) => *v = serde_json::to_value(stream)?,
        Value::Array(items) => {
            for item in items {
                materialize(item, stream)?;
            }
        }
        Value::Object(map) => {
            for item in map.values_mut() {
                materialize(item, stream)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Tera's truthiness.
fn truthy(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    }
}

/// What `{{ m.field }}` prints, before escaping: strings as they are, null as nothing,
/// anything else as Tera prints it. A missing field is an error, as in Tera.
fn text_of<'a>(m: &'a serde_json::Map<String, Value>, field: &str) -> tera::Result<Cow<'a, str>> {
    match m.get(field) {
        Some(Value::String(s)) => Ok(Cow::Borrowed(s)),
        Some(Value::Null) => Ok(Cow::Borrowed("")),
        Some(other) => Ok(Cow::Owned(other.to_string())),
        None => Err(tera::Error::msg(format!(
            "Variable `m.{field}` not found in context while rendering 'stored_messages/messages'"
        ))),
    }
}

/// `{{ m.field }}` in an escaping template.
fn push_value(
    out: &mut String,
    m: &serde_json::Map<String, Value>,
    field: &str,
) -> tera::Result<()> {
    push_escaped(out, &text_of(m, field)?);
    Ok(())
}

fn render(messages: &Value) -> tera::Result<String> {
    let mut out = String::with_capacity(64 + 320 * messages.as_array().map_or(0, Vec::len));
    out.push_str(STREAM_START);
    let list: &[Value] = match messages {
        Value::Array(list) => list,
        _ => &[],
    };
    if truthy(Some(messages)) && !list.is_empty() {
        out.push_str(LIST_START);
        for m in list {
            let Value::Object(m) = m else {
                return Err(tera::Error::msg(
                    "stored_messages/messages: each message must be an object",
                ));
            };
            out.push_str(ITEM_START);
            push_value(&mut out, m, "tags")?;
            out.push_str("\" ");
            if truthy(m.get("id")) {
                out.push_str("data-id=\"");
                push_value(&mut out, m, "id")?;
                out.push('"');
            }
            out.push_str(LEVEL_START);
            if m.contains_key("level_label") {
                push_value(&mut out, m, "level_label")?;
            } else {
                out.push_str("Message");
            }
            out.push_str(LEVEL_END);
            let head = truthy(m.get("head"))
                .then(|| text_of(m, "head"))
                .transpose()?;
            let url = truthy(m.get("url"))
                .then(|| text_of(m, "url"))
                .transpose()?;
            let text = text_of(m, "message")?;
            push_message_text(&mut out, head.as_deref(), url.as_deref(), &text);
            out.push_str(ITEM_END);
        }
        out.push_str(LIST_END);
    }
    out.push_str(STREAM_END);
    Ok(out)
}

const STREAM_START: &str =
    "<div class=\"messages\" id=\"stored-messages\" tabindex=\"-1\" aria-live=\"polite\">";
const LIST_START: &str = "\n  <ul>";
const ITEM_START: &str = "\n    <li class=\"message ";
const LEVEL_START: &str = ">\n      <span class=\"level\">";
const LEVEL_END: &str = "</span>\n      ";
const ITEM_END: &str = "\n    </li>";
const LIST_END: &str = "\n  </ul>";
const STREAM_END: &str = "\n</div>";

/// Renders a deferred stream as [`render`] renders its JSON: the same fields, from the
/// messages themselves.
fn render_snapshot(stream: &StreamSnapshot) -> String {
    let mut out = String::with_capacity(64 + 320 * stream.len());
    out.push_str(STREAM_START);
    if !stream.is_empty() {
        out.push_str(LIST_START);
        for m in stream.iter() {
            out.push_str(ITEM_START);
            // `tags` is the extra tags and the level tag joined by a space; escaping each
            // part is escaping the whole.
            let level_tag = m.tags.tag(m.level);
            push_escaped(&mut out, m.extra_tags);
            if !m.extra_tags.is_empty() && !level_tag.is_empty() {
                out.push(' ');
            }
            push_escaped(&mut out, level_tag);
            out.push_str("\" ");
            if let Some(id) = m.id {
                // Digits: nothing to escape.
                out.push_str("data-id=\"");
                out.push_str(itoa::Buffer::new().format(id.0));
                out.push('"');
            }
            out.push_str(LEVEL_START);
            push_escaped(&mut out, m.level.label());
            out.push_str(LEVEL_END);
            // An empty head or url is false in the template, as here.
            let head = long_head(m.message).filter(|h| !h.is_empty());
            let url = m.url.filter(|u| !u.is_empty());
            push_message_text(&mut out, head, url, m.message);
            out.push_str(ITEM_END);
        }
        out.push_str(LIST_END);
    }
    out.push_str(STREAM_END);
    out
}

#[cfg(test)]
mod tests {
    use rocket_dyn_templates::tera::{Context, Tera};
    use serde_json::json;

    use super::*;
    use crate::template::BUILTIN_MESSAGES_SOURCE;

    /// A page that includes the partial, rendered with the template and with the filter.
    fn both(context: &Value) -> (String, String) {
        let page = "<main>{% include \"stored_messages/messages\" %}</main>";
        let mut template = Tera::default();
        template
            .add_raw_templates(vec![
                ("stored_messages/messages", BUILTIN_MESSAGES_SOURCE),
                ("page.html", page),
            ])
            .unwrap();
        let mut fast = Tera::default();
        fast.register_filter(FILTER, StreamPartial);
        fast.add_raw_templates(vec![
            ("stored_messages/messages", FAST_SOURCE),
            ("page.html", page),
        ])
        .unwrap();
        let context = Context::from_value(context.clone()).unwrap();
        (
            template.render("page.html", &context).unwrap(),
            fast.render("page.html", &context).unwrap(),
        )
    }

    fn message(id: Option<&str>, text: &str, url: Option<&str>, head: Option<&str>) -> Value {
        json!({
            "id": id, "stored": id.is_some(), "level": 21, "level_tag": "stored info",
            "level_label": "Info", "tags": "urgent <b> stored info", "extra_tags": "urgent <b>",
            "message": text, "url": url, "date": "2026-12-06T10:00:00.000000Z",
            "date_text": "2026-12-06 10:00 UTC", "summary": text, "head": head,
        })
    }

    #[test]
    fn the_filter_writes_what_the_template_renders() {
        let long = "a long text & more ".repeat(20);
        let contexts = [
            json!({}),
            json!({ "messages": [] }),
            json!({ "messages": null }),
            json!({ "messages": [
                message(Some("7"), "<script>alert('x')</script> & \"q\" / done", None, None),
                message(None, "flash, no id", Some("/archive?a=1&b=2"), None),
                message(Some("8"), &long, Some("https://example.com/\"x\""), Some("a long text &")),
                message(Some("9"), "", None, Some("")),
            ] }),
            json!({ "messages": [{
                "id": 12, "tags": "", "message": "no label", "url": "", "head": null,
            }] }),
        ];
        for context in contexts {
            let (template, fast) = both(&context);
            assert_eq!(fast, template, "{context}");
        }
    }
}
