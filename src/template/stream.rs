//! The stream partial (`stored_messages/messages`), the crate's own written by Rust.
//!
//! Every page includes it, and Tera's interpreter is slow at what it does: a dozen
//! `{{ m.field }}` lookups per message, each through JSON values. When the host has no
//! override, the name `stored_messages/messages` holds [`FAST_SOURCE`] instead, which hands
//! the `messages` value to [`StreamPartial`], a Tera filter that writes exactly what
//! `messages.html.tera` renders in an escaping page (a test compares both byte for byte). The
//! template file stays the documentation and the starting point for an override.

use std::borrow::Cow;
use std::collections::HashMap;

use rocket_dyn_templates::tera::{self, Value};

use super::list::{push_escaped, push_message_text};

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
        Ok(Value::String(render(messages)?))
    }

    fn is_safe(&self) -> bool {
        true
    }
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
    out.push_str(
        "<div class=\"messages\" id=\"stored-messages\" tabindex=\"-1\" aria-live=\"polite\">",
    );
    let list: &[Value] = match messages {
        Value::Array(list) => list,
        _ => &[],
    };
    if truthy(Some(messages)) && !list.is_empty() {
        out.push_str("\n  <ul>");
        for m in list {
            let Value::Object(m) = m else {
                return Err(tera::Error::msg(
                    "stored_messages/messages: each message must be an object",
                ));
            };
            out.push_str("\n    <li class=\"message ");
            push_value(&mut out, m, "tags")?;
            out.push_str("\" ");
            if truthy(m.get("id")) {
                out.push_str("data-id=\"");
                push_value(&mut out, m, "id")?;
                out.push('"');
            }
            out.push_str(">\n      <span class=\"level\">");
            if m.contains_key("level_label") {
                push_value(&mut out, m, "level_label")?;
            } else {
                out.push_str("Message");
            }
            out.push_str("</span>\n      ");
            let head = truthy(m.get("head"))
                .then(|| text_of(m, "head"))
                .transpose()?;
            let url = truthy(m.get("url"))
                .then(|| text_of(m, "url"))
                .transpose()?;
            let text = text_of(m, "message")?;
            push_message_text(&mut out, head.as_deref(), url.as_deref(), &text);
            out.push_str("\n    </li>");
        }
        out.push_str("\n  </ul>");
    }
    out.push_str("\n</div>");
    Ok(out)
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
