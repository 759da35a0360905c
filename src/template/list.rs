//! The list partial: the crate's own (`list.html.tera`, rendered by Rust code that writes
//! exactly its markup), or the host's override of `stored_messages/list.html.tera`
//! (rendered by Tera).
//!
//! Why Rust for the crate's own: every page with the list helper renders it, and Tera's
//! interpreter spends most of a page's time there (each `{{ m.field }}` is a lookup through
//! JSON values). The template file stays the documentation and the starting point for an
//! override, and a test renders both and compares them byte for byte, so they cannot drift
//! apart.

use rocket_dyn_templates::tera::{self, Tera};
use serde::Serialize;

use crate::message::{LevelTags, Message};
use crate::request::{long_head, message_summary, push_date_text, push_rfc3339, StreamMessage};

/// The name hosts override, as rocket_dyn_templates names it.
pub const LIST_TEMPLATE: &str = "stored_messages/list";

/// The source of the crate's list partial: a starting point for an override.
pub const BUILTIN_SOURCE: &str = include_str!("list.html.tera");

/// Which list partial renders.
pub(crate) enum ListPartial {
    /// The crate's own.
    Builtin,
    /// The host's override, in a Tera of its own that escapes everything.
    Host(Box<Tera>),
}

/// What the list's forms need: the CSRF token, the page to come back to (`next`) and where
/// the API is (`None`: no API, no forms).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Forms<'a> {
    pub(crate) csrf: &'a str,
    pub(crate) next: &'a str,
    pub(crate) api: Option<&'a str>,
}

/// What the partial is given.
#[derive(Serialize)]
struct Context<'a> {
    messages: Vec<StreamMessage>,
    kind: &'a str,
    csrf: &'a str,
    next: &'a str,
    api: &'a str,
}

impl ListPartial {
    /// The host's override when its Tera has one, the crate's own otherwise. The override is
    /// rendered by a Tera holding a copy of the host's templates (so whatever it includes is
    /// there too) that escapes every template, whatever its name.
    pub(crate) fn from_host(host: &Tera) -> ListPartial {
        if host.get_template(LIST_TEMPLATE).is_err() {
            return ListPartial::Builtin;
        }
        let mut tera = Tera::default();
        tera.autoescape_on(vec![""]);
        match tera.extend(host) {
            Ok(()) => ListPartial::Host(Box::new(tera)),
            Err(e) => {
                log::error!(
                    "stored-messages: cannot use {LIST_TEMPLATE} from the templates directory ({e}); using the built-in one"
                );
                ListPartial::Builtin
            }
        }
    }

    /// The list of `messages` (`kind` is `"inbox"` or `"archive"`), with forms to the API
    /// carrying the CSRF token and `next`, the page to come back to.
    ///
    /// # Errors
    ///
    /// When the host's override fails to render.
    pub(crate) fn render(
        &self,
        kind: &str,
        messages: &[Message],
        tags: &LevelTags,
        forms: Forms<'_>,
    ) -> tera::Result<String> {
        match self {
            ListPartial::Builtin => Ok(builtin(kind, messages, tags, forms)),
            ListPartial::Host(tera) => {
                let context = Context {
                    messages: messages
                        .iter()
                        .map(|m| StreamMessage::stored(m, tags))
                        .collect(),
                    kind,
                    csrf: forms.csrf,
                    next: forms.next,
                    api: forms.api.unwrap_or(""),
                };
                tera.render(LIST_TEMPLATE, &tera::Context::from_serialize(context)?)
            }
        }
    }
}

/// Appends `text` escaped exactly as Tera's `escape_html` does (`& < > " ' /`), so the
/// bytes are the template's.
pub(crate) fn push_escaped(out: &mut String, text: &str) {
    let mut start = 0;
    for (i, byte) in text.bytes().enumerate() {
        let entity = match byte {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'"' => "&quot;",
            b'\'' => "&#x27;",
            b'/' => "&#x2F;",
            _ => continue,
        };
        out.push_str(&text[start..i]);
        out.push_str(entity);
        start = i + 1;
    }
    out.push_str(&text[start..]);
}

/// A message's text as both partials write it: a link when there is a url, behind "Show
/// more" when there is a head (the start of a long text), escaped.
pub(crate) fn push_message_text(
    out: &mut String,
    head: Option<&str>,
    url: Option<&str>,
    text: &str,
) {
    if let Some(head) = head {
        out.push_str("<details class=\"long\"><summary><span class=\"head\">");
        push_escaped(out, head);
        out.push_str("…</span> <span class=\"more\">Show more</span><span class=\"less\">Show less</span></summary>");
    }
    match url {
        Some(url) => {
            out.push_str("<a href=\"");
            push_escaped(out, url);
            out.push_str("\">");
            push_escaped(out, text);
            out.push_str("</a>");
        }
        None => {
            out.push_str("<span class=\"text\">");
            push_escaped(out, text);
            out.push_str("</span>");
        }
    }
    if head.is_some() {
        out.push_str("</details>");
    }
}

/// `list.html.tera`, written out into one buffer.
fn builtin(kind: &str, messages: &[Message], tags: &LevelTags, forms: Forms<'_>) -> String {
    let Forms { csrf, next, api } = forms;
    let api = api.unwrap_or("");
    let inbox = kind == "inbox";
    let buttons = inbox && !api.is_empty();
    let mut out = String::with_capacity(160 + messages.len() * if inbox { 720 } else { 240 });
    // The hidden fields of every form, escaped once.
    let mut fields = String::with_capacity(120 + csrf.len() + next.len());
    fields.push_str("<input type=\"hidden\" name=\"csrf_token\" value=\"");
    push_escaped(&mut fields, csrf);
    fields.push_str("\">\n");
    let indent = fields.len();
    fields.push_str("<input type=\"hidden\" name=\"next\" value=\"");
    push_escaped(&mut fields, next);
    fields.push_str("\">");
    let (csrf_field, next_field) = fields.split_at(indent);
    if buttons && !messages.is_empty() {
        out.push_str("\n<form method=\"post\" action=\"");
        out.push_str(api);
        out.push_str("/mark_all_read\" class=\"sm-mark-all-read\">\n  ");
        out.push_str(csrf_field);
        out.push_str("  ");
        out.push_str(next_field);
        out.push_str(
            "\n  <button type=\"submit\" class=\"secondary\">Mark all read</button>\n</form>",
        );
    }
    out.push_str("\n<ul class=\"stored-messages stored-messages-");
    push_escaped(&mut out, kind);
    out.push_str("\">");
    let mut id = String::with_capacity(20);
    for m in messages {
        let level_tag = tags.tag(m.level);
        id.clear();
        // Writing to a String cannot fail.
        let _ = std::fmt::Write::write_fmt(&mut id, format_args!("{}", m.id.0));
        out.push_str("\n  <li class=\"message ");
        match (m.extra_tags.is_empty(), level_tag.is_empty()) {
            (true, _) => push_escaped(&mut out, level_tag),
            (false, true) => push_escaped(&mut out, &m.extra_tags),
            (false, false) => {
                push_escaped(&mut out, &m.extra_tags);
                out.push(' ');
                push_escaped(&mut out, level_tag);
            }
        }
        out.push_str("\" data-id=\"");
        out.push_str(&id);
        out.push_str("\">\n    <span class=\"level\">");
        push_escaped(&mut out, m.level.label());
        out.push_str("</span>");
        push_message_text(
            &mut out,
            long_head(&m.message),
            m.url.as_deref(),
            &m.message,
        );
        out.push_str("\n    <time datetime=\"");
        push_rfc3339(&mut out, m.date);
        out.push_str("\">");
        push_date_text(&mut out, m.date);
        out.push_str("</time>");
        if buttons {
            out.push_str("\n    <form method=\"post\" action=\"");
            out.push_str(api);
            out.push_str("/inbox/");
            out.push_str(&id);
            out.push_str("/read\" class=\"sm-mark-read\">\n      ");
            out.push_str(csrf_field);
            out.push_str("      ");
            out.push_str(next_field);
            out.push_str(
                "\n      <button type=\"submit\" class=\"secondary\" aria-label=\"Mark read: ",
            );
            push_escaped(&mut out, &message_summary(&m.message));
            // With the date: the buttons of two messages of one text have different names.
            out.push_str(", ");
            push_date_text(&mut out, m.date);
            out.push_str("\">Mark read</button>\n    </form>");
        }
        out.push_str("\n  </li>");
    }
    if messages.is_empty() {
        out.push_str("\n  <li class=\"empty\">");
        out.push_str(if kind == "archive" {
            "No messages yet."
        } else {
            "No unread messages."
        });
        // (Tera keeps the newline before `{%- endfor %}` in a loop's `else` body.)
        out.push_str("</li>\n");
    }
    out.push_str("\n</ul>\n");
    out
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::level::Level;
    use crate::message::MessageId;

    fn message(id: i64, level: Level, text: &str, tags: &str, url: Option<&str>) -> Message {
        Message {
            id: MessageId(id),
            level,
            message: text.to_string(),
            extra_tags: tags.to_string(),
            url: url.map(str::to_string),
            date: Utc.timestamp_opt(1_764_000_000 + id, 123_456_000).unwrap(),
        }
    }

    /// The template file rendered by Tera, as an override would be.
    fn by_tera(kind: &str, messages: &[Message], tags: &LevelTags, forms: Forms<'_>) -> String {
        let mut host = Tera::default();
        host.add_raw_template(LIST_TEMPLATE, BUILTIN_SOURCE)
            .unwrap();
        ListPartial::from_host(&host)
            .render(kind, messages, tags, forms)
            .unwrap()
    }

    fn forms<'a>(csrf: &'a str, next: &'a str) -> Forms<'a> {
        Forms {
            csrf,
            next,
            api: Some("/messages"),
        }
    }

    #[test]
    fn the_rust_partial_writes_exactly_the_template() {
        let tags = LevelTags::new([(Level::STORED_WARNING, "careful".to_string())].into());
        let hostile = "<script>alert('x & y')</script> \"quoted\" / ❤ and a text long enough to be cut in the label";
        let messages = vec![
            message(1, Level::STORED_INFO, "hello", "", None),
            message(
                2,
                Level::STORED_WARNING,
                hostile,
                "ops \"urgent\"",
                Some("/status?a=1&b=<2>"),
            ),
            message(
                3,
                Level(77),
                "custom level",
                "x",
                Some("https://example.com/a'b"),
            ),
            message(
                4,
                Level::STORED_INFO,
                &"a <long> text ".repeat(30),
                "",
                None,
            ),
            message(
                5,
                Level::STORED_ERROR,
                &"linked & long ".repeat(30),
                "",
                Some("/a"),
            ),
        ];
        let nexts = ["/", "/?keep=1&x=\"y\"", "/archive"];
        for kind in ["inbox", "archive"] {
            for next in nexts {
                for api in [Some("/messages"), Some("/api/v1.2/my-messages"), None] {
                    for shown in [&messages[..], &messages[..1], &[]] {
                        let forms = Forms {
                            csrf: "tok-en_1",
                            next,
                            api,
                        };
                        let rust = builtin(kind, shown, &tags, forms);
                        let tera = by_tera(kind, shown, &tags, forms);
                        assert_eq!(
                            rust,
                            tera,
                            "kind {kind}, next {next}, api {api:?}, {} messages",
                            shown.len()
                        );
                    }
                }
            }
        }
        // and it escapes what it shows
        let html = builtin("inbox", &messages, &tags, forms("t", "/"));
        assert!(html.contains("&lt;script&gt;alert(&#x27;x &amp; y&#x27;)&lt;&#x2F;script&gt;"));
        assert!(!html.contains("<script>"));
    }

    #[test]
    fn a_host_without_the_partial_gets_the_builtin_one() {
        assert!(matches!(
            ListPartial::from_host(&Tera::default()),
            ListPartial::Builtin
        ));
        let mut host = Tera::default();
        host.add_raw_template(LIST_TEMPLATE, "<p>{{ messages | length }} {{ kind }}</p>")
            .unwrap();
        let partial = ListPartial::from_host(&host);
        let html = partial
            .render(
                "inbox",
                &[message(1, Level::STORED_INFO, "a", "", None)],
                &LevelTags::default(),
                forms("t", "/"),
            )
            .unwrap();
        assert_eq!(html, "<p>1 inbox</p>");
    }
}
