//! The reference app's pages: home (the merged stream and a demo form), inbox, archive,
//! health, and the HTML catchers.
//!
//! Only the home page shows the stored stream and so marks it read (the original's rule);
//! every other page shows one-time notices alone (`Messages::flash`), so reading the inbox
//! or the archive uses nothing up.

use rocket::form::{Contextual, Form};
use rocket::http::Status;
use rocket::response::Redirect;
use rocket::serde::Serialize;
use rocket::{Catcher, Request, Route, State};
use rocket_dyn_templates::context;
use rocket_dyn_templates::tera::escape_html;
use stored_messages::template::Page;
use stored_messages::{
    Cursor, Level, ListQuery, MessageId, Messages, NewMessage, Store, StreamMessage,
    MAX_STREAM_STORED, MAX_TEXT_CHARS,
};

use crate::auth::CurrentUser;
use crate::paging::{cut_page, Trail};

/// The demo form's level `<option>`s, with `chosen` selected, in words: what happens to a
/// message of that level here (saved to the inbox of a logged-in user, shown once, or
/// dropped below `min_level`).
///
/// Written here, not by a Tera loop: each `{{ l.field }}` in a loop costs Tera about 1,900
/// instructions (it walks a JSON value per path segment), and the loop's 30 lookups were a
/// tenth of every home page. The options are escaped once, when first used; a request only
/// picks and joins them. The markup is what the loop wrote (a test compares them).
fn level_options(chosen: &str, logged_in: bool, config: &stored_messages::Config) -> String {
    const SAVED: usize = 0;
    const ONCE: usize = 1;
    const DROPPED: usize = 2;
    const ONCE_UNTIL_LOGIN: usize = 3;
    /// Per level: its name, the level, and each way of showing it as `<option>` markup,
    /// without and with `selected`.
    type Options = Vec<(&'static str, Level, [[String; 2]; 4])>;
    static OPTIONS: std::sync::OnceLock<Options> = std::sync::OnceLock::new();
    let options = OPTIONS.get_or_init(|| {
        Level::NAMED
            .iter()
            .map(|(name, level)| {
                // "Info" and "Stored info": no two options read the same.
                let label = if level.is_stored() {
                    format!("Stored {}", level.label().to_lowercase())
                } else {
                    level.label().to_string()
                };
                let option = |text: String| {
                    let (name, text) = (escape_html(name), escape_html(&text));
                    [
                        format!("\n    <option value=\"{name}\">{text}</option>"),
                        format!("\n    <option value=\"{name}\" selected>{text}</option>"),
                    ]
                };
                let options = [
                    option(format!("{label}: saved to your inbox")),
                    option(format!("{label}: shown once, not saved")),
                    option(format!("{label}: below the minimum level, dropped")),
                    option(format!(
                        "{label}: shown once (saved only for a logged-in user)"
                    )),
                ];
                (*name, *level, options)
            })
            .collect()
    });
    // A level the form does not offer (a crafted request, refused with its error) leaves the
    // select on the form's usual choice, not on its first option.
    let chosen = if options.iter().any(|(name, _, _)| *name == chosen) {
        chosen
    } else {
        DEFAULT_LEVEL
    };
    let mut out = String::with_capacity(90 * options.len());
    for (name, level, options) in options {
        let what = if *level < config.min_level {
            DROPPED
        } else if config.is_store_level(*level) {
            if logged_in {
                SAVED
            } else {
                ONCE_UNTIL_LOGIN
            }
        } else {
            ONCE
        };
        out.push_str(&options[what][usize::from(*name == chosen)]);
    }
    out
}

/// The level the home form starts on.
const DEFAULT_LEVEL: &str = "stored_info";

/// What the demo form sent back, to re-render it.
#[derive(Debug, Default, Serialize)]
struct DemoValues {
    level: String,
    message: String,
    extra_tags: String,
    url: String,
}

/// One problem of a form, for the field it is about (the error summary links to it).
#[derive(Debug, Serialize)]
pub(crate) struct FieldError {
    pub(crate) field: &'static str,
    pub(crate) text: String,
}

/// A short random reference for an error: the log line carries it with the detail, the
/// page shows it, so a report from a user finds the log line (and the page shows no
/// database's words).
pub(crate) fn error_reference() -> String {
    use rand::Rng;
    format!("{:08x}", rand::thread_rng().gen::<u32>())
}

/// What a page says about a failure the user cannot fix: the library's public words, and
/// for a server-side error a reference to the log line that has the detail.
pub(crate) fn failure_words(e: &stored_messages::Error, what: &str) -> String {
    let reference = error_reference();
    log::error!(
        "reference app: {what} failed (reference {reference}): {}",
        stored_messages::report(e)
    );
    match e.status().code {
        503 => sentence(&e.public_message()),
        code if code >= 500 => format!(
            "Something went wrong on our side. If it happens again, give an administrator this reference: {reference}."
        ),
        _ => sentence(&e.public_message()),
    }
}

/// `unknown level "x"` → `Unknown level "x".`: the library's error texts as sentences.
pub(crate) fn sentence(text: &str) -> String {
    let mut chars = text.chars();
    let mut out: String = match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => return String::new(),
    };
    if !out.ends_with(['.', '!', '?']) {
        out.push('.');
    }
    out
}

fn home(
    config: &stored_messages::Config,
    messages: &Messages<'_>,
    user: Option<&CurrentUser>,
    kept: bool,
    form: &DemoValues,
    errors: &[FieldError],
) -> Page {
    // Serializing the guard shows the stream; `?keep=1` then takes that back.
    // Each field's error under a name of its own (empty when valid): the form looks each
    // one up three times, and Tera finds a plain name in one step where `invalid.level`
    // costs it a walk through a JSON value.
    let invalid = |field: &str| {
        errors
            .iter()
            .find(|e| e.field == field)
            .map_or("", |e| e.text.as_str())
    };
    let page = Page::render(
        "index",
        context! {
            // Counted here: a `filter` in the template would copy the whole stream.
            stored: messages.stored_len(),
            messages,
            here: "home",
            user: user.map(|u| &u.0),
            kept,
            // A page that fails (a form with errors) marks nothing read.
            marks_read: !kept && errors.is_empty(),
            level_options: level_options(&form.level, user.is_some(), config),
            max_len: MAX_TEXT_CHARS,
            form,
            errors,
            level_error: invalid("level"),
            message_error: invalid("message"),
            extra_tags_error: invalid("extra_tags"),
            url_error: invalid("url"),
        },
    );
    if kept {
        messages.set_used(false);
    }
    page
}

#[get("/?<keep>")]
fn index(
    messages: Messages<'_>,
    user: Option<CurrentUser>,
    keep: Option<&str>,
    store: &State<Store>,
) -> Page {
    let kept = matches!(keep, Some("1" | "true" | "yes" | "on"));
    let form = DemoValues {
        level: DEFAULT_LEVEL.into(),
        ..DemoValues::default()
    };
    home(store.config(), &messages, user.as_ref(), kept, &form, &[])
}

#[derive(Debug, FromForm)]
struct DemoForm<'r> {
    level: &'r str,
    message: &'r str,
    extra_tags: Option<&'r str>,
    url: Option<&'r str>,
}

/// Every problem of the demo form at once, in the order of its fields.
fn demo_errors(values: &DemoValues) -> (Option<Level>, Vec<FieldError>) {
    let mut errors = Vec::new();
    let level = match Level::parse(&values.level) {
        Ok(level) => Some(level),
        Err(_) if values.level.trim().is_empty() => {
            errors.push(FieldError {
                field: "level",
                text: "Choose a level.".into(),
            });
            None
        }
        Err(e) => {
            errors.push(FieldError {
                field: "level",
                text: sentence(&e.to_string()),
            });
            None
        }
    };
    // The text alone (a plain level, no tags, no url): its own problems only.
    if values.message.trim().is_empty() {
        errors.push(FieldError {
            field: "message",
            text: "Enter a message.".into(),
        });
    } else if let Err(e) = NewMessage::parse(Level::INFO, &values.message, "", None, None) {
        errors.push(FieldError {
            field: "message",
            text: sentence(&e.to_string()),
        });
    }
    if let Err(e) = stored_messages::parse_extra_tags(&values.extra_tags) {
        errors.push(FieldError {
            field: "extra_tags",
            text: sentence(&e.to_string()),
        });
    }
    if !values.url.trim().is_empty() {
        if let Err(e) = stored_messages::parse_url(values.url.trim()) {
            errors.push(FieldError {
                field: "url",
                text: sentence(&e.to_string()),
            });
        }
    }
    (level, errors)
}

/// Adds a message through the guard (stored or flash by level) and goes back home; bad
/// input re-renders the form with every field's error at once and adds nothing.
#[post("/demo/message", data = "<form>")]
async fn demo_message(
    form: Form<Contextual<'_, DemoForm<'_>>>,
    messages: Messages<'_>,
    user: Option<CurrentUser>,
    store: &State<Store>,
) -> Result<Redirect, Page> {
    let values = match &form.value {
        Some(f) => DemoValues {
            level: f.level.to_string(),
            message: f.message.to_string(),
            extra_tags: f.extra_tags.unwrap_or("").to_string(),
            url: f.url.unwrap_or("").to_string(),
        },
        // Missing fields: keep whatever was sent, to show it again with the errors.
        None => {
            let field = |name: &str| form.context.field_value(name).unwrap_or("").to_string();
            DemoValues {
                level: field("level"),
                message: field("message"),
                extra_tags: field("extra_tags"),
                url: field("url"),
            }
        }
    };
    let (level, mut errors) = demo_errors(&values);
    if let (Some(level), true) = (level, errors.is_empty()) {
        let url = Some(values.url.as_str()).filter(|u| !u.trim().is_empty());
        match messages
            .add_with(level, &values.message, &values.extra_tags, url)
            .await
        {
            Ok(()) => return Ok(Redirect::to("/")),
            Err(e) if e.is_bad_input() => {
                let field = match e {
                    stored_messages::Error::InvalidUrl { .. } => "url",
                    stored_messages::Error::ExtraTagsTooLong { .. }
                    | stored_messages::Error::InvalidExtraTags(_) => "extra_tags",
                    _ => "message",
                };
                errors.push(FieldError {
                    field,
                    text: sentence(&e.to_string()),
                });
            }
            Err(e) => {
                let words = failure_words(&e, "adding a message");
                return Err(
                    error_page(e.status(), &words, user.as_ref().map(|u| &u.0)).status(e.status())
                );
            }
        }
    }
    Err(home(
        store.config(),
        &messages,
        user.as_ref(),
        false,
        &values,
        &errors,
    )
    .status(Status::UnprocessableEntity))
}

/// The unread inbox, listed without using it up: nothing here is marked read unless the
/// reader says so (Mark read, Mark all read). One-time notices still show.
#[get("/inbox")]
fn inbox(messages: Messages<'_>, user: CurrentUser) -> Page {
    // The guard loads at most MAX_STREAM_STORED unread messages: past that, the page says
    // that more are waiting.
    let queued = messages.len();
    let flash = messages.flash();
    let stored = queued.saturating_sub(flash.len());
    Page::render(
        "inbox",
        context! {
            messages: flash, here: "inbox", user: &user.0, limit: MAX_STREAM_STORED,
            more: stored >= MAX_STREAM_STORED as usize,
        },
    )
}

#[get("/inbox", rank = 2)]
fn inbox_login() -> Redirect {
    Redirect::to("/login?next=/inbox")
}

/// Rows of an archive page.
const ARCHIVE_PAGE: u32 = 25;

/// An archive position as a link carries it: `MICROS_ID` (the date in microseconds since
/// the epoch and the id of the last message seen).
pub(crate) fn cursor_text(cursor: &Cursor) -> String {
    format!("{}_{}", cursor.date.timestamp_micros(), cursor.id.0)
}

/// The position [`cursor_text`] wrote; `None` for anything else.
pub(crate) fn parse_cursor(text: &str) -> Option<Cursor> {
    let (micros, id) = text.split_once('_')?;
    let date = chrono::DateTime::from_timestamp_micros(micros.parse().ok()?)?;
    let id = id.parse().ok().filter(|id| *id > 0)?;
    Some(Cursor {
        date,
        id: MessageId(id),
    })
}

/// Every stored message the user received, newest first, a page at a time (both ways);
/// looking at it marks nothing read.
#[get("/archive?<from>&<back>")]
async fn archive(
    messages: Messages<'_>,
    user: CurrentUser,
    store: &State<Store>,
    from: Option<&str>,
    back: Option<&str>,
) -> Page {
    let Some(trail) = Trail::parse(from, back, |s| parse_cursor(s).is_some()) else {
        return error_page(
            Status::BadRequest,
            "This page link is not valid: open the archive from its first page.",
            Some(&user.0),
        );
    };
    let query = ListQuery {
        limit: Some(ARCHIVE_PAGE + 1),
        after: parse_cursor(&trail.from),
    };
    let mut rows = match store.backend().archive_list(user.0.user_id(), query).await {
        Ok(rows) => rows,
        Err(e) => {
            let words = failure_words(&e, &format!("the archive of user {}", user.0.id));
            return error_page(e.status(), &words, Some(&user.0));
        }
    };
    let next = cut_page(&mut rows, ARCHIVE_PAGE as usize, |m| {
        cursor_text(&Cursor::after(m))
    });
    let tags = store.level_tags();
    let rows: Vec<StreamMessage> = rows
        .iter()
        .map(|m| StreamMessage::stored(m, tags))
        .collect();
    Page::render(
        "archive",
        context! {
            messages: messages.flash(), here: "archive", user: &user.0, rows,
            first: trail.is_first(), pages: trail.links(next),
        },
    )
}

#[get("/archive", rank = 2)]
fn archive_login() -> Redirect {
    Redirect::to("/login?next=/archive")
}

/// A trivial route, for health checks and as the benchmarks' baseline.
#[get("/health")]
fn health() -> &'static str {
    "ok"
}

/// For load balancers: `200 ready` when the store (messages, and the users database)
/// answers, `503` naming what does not. Two small queries; cheap enough every second.
/// (`/health` stays trivial: it is the benchmarks' baseline.)
#[get("/health/ready")]
async fn ready(
    store: &rocket::State<stored_messages::Store>,
    users: &rocket::State<std::sync::Arc<crate::users::Users>>,
) -> (Status, &'static str) {
    if let Err(e) = store.ping().await {
        log::warn!(
            "reference app: not ready, the message store does not answer: {}",
            stored_messages::report(&e)
        );
        return (Status::ServiceUnavailable, "message store unavailable");
    }
    if let Err(e) = users.ping().await {
        log::warn!(
            "reference app: not ready, the users database does not answer: {}",
            stored_messages::report(&e)
        );
        return (Status::ServiceUnavailable, "users database unavailable");
    }
    (Status::Ok, "ready")
}

/// The home page, the demo form, the archive and the health checks.
pub fn routes() -> Vec<Route> {
    routes![
        index,
        demo_message,
        inbox,
        inbox_login,
        archive,
        archive_login,
        health,
        ready
    ]
}

/// An error page; the header shows who is logged in, on error pages too.
fn error_page(status: Status, message: &str, user: Option<&crate::users::User>) -> Page {
    Page::render(
        "error",
        context! { status: status.code, reason: status.reason().unwrap_or(""), message, user },
    )
    .status(status)
}

#[catch(default)]
async fn html_error(status: Status, request: &Request<'_>) -> Page {
    let message = match status.code {
        403 if stored_messages::csrf::was_rejected(request) => {
            "The form was missing its security token or it had expired. Go back, reload the page and try again."
        }
        401 => "Please log in first.",
        403 => "You are not allowed to see this page.",
        404 => "There is nothing here.",
        413 => "What you sent is too large.",
        422 | 400 => "What you sent could not be understood.",
        503 => "The service is unavailable right now; try again shortly.",
        _ => "Something went wrong on our side.",
    };
    error_page(status, message, crate::auth::request_session(request).await)
}

/// HTML error pages for everything outside the JSON API.
pub fn catchers() -> Vec<Catcher> {
    catchers![html_error]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_options_select_the_chosen_level_or_the_usual_one() {
        let config = stored_messages::Config::default();
        let selected = |html: &str| -> Vec<String> {
            html.split("<option ")
                .filter(|o| o.contains("\" selected>"))
                .map(|o| o.split('"').nth(1).unwrap_or_default().to_string())
                .collect()
        };
        let html = level_options("warning", true, &config);
        assert_eq!(
            html.matches("\n    <option value=\"").count(),
            Level::NAMED.len()
        );
        assert_eq!(selected(&html), ["warning"]);
        assert_eq!(
            selected(&level_options("<b>nope</b>", false, &config)),
            [DEFAULT_LEVEL]
        );
        assert!(html.ends_with("</option>"), "{html}");
    }

    /// The markup Tera's loop wrote before the options were written here, over the same
    /// choices: byte for byte the same.
    #[test]
    fn level_options_are_what_the_tera_loop_wrote() {
        use rocket_dyn_templates::tera::{Context, Tera};
        for logged_in in [false, true] {
            let html = level_options("warning", logged_in, &stored_messages::Config::default());
            let levels: Vec<serde_json::Value> = html
                .split("<option value=\"")
                .skip(1)
                .map(|option| {
                    let (name, rest) = option.split_once('"').unwrap();
                    let (_, text) = rest.split_once('>').unwrap();
                    let (text, _) = text.split_once("</option>").unwrap();
                    serde_json::json!({
                        "name": name,
                        "selected": rest.starts_with(" selected>"),
                        "text": text,
                    })
                })
                .collect();
            assert_eq!(levels.len(), Level::NAMED.len());
            let mut tera = Tera::default();
            tera.add_raw_template(
                "select.html",
                "<select>\n    {%- for l in levels %}\n    <option value=\"{{ l.name }}\"\
                 {% if l.selected %} selected{% endif %}>{{ l.text }}</option>\n    \
                 {%- endfor %}\n  </select>",
            )
            .unwrap();
            let context = Context::from_serialize(serde_json::json!({ "levels": levels })).unwrap();
            assert_eq!(
                tera.render("select.html", &context).unwrap(),
                format!("<select>{html}\n  </select>")
            );
        }
    }

    #[test]
    fn library_errors_read_as_sentences() {
        assert_eq!(sentence("unknown level \"x\""), "Unknown level \"x\".");
        assert_eq!(sentence("Enter a message."), "Enter a message.");
        assert_eq!(sentence(""), "");
    }

    #[test]
    fn a_failure_shows_a_reference_not_its_detail() {
        let e = stored_messages::Error::Config(vec!["database error: code 1811 at row 7".into()]);
        let words = failure_words(&e, "a test");
        assert!(
            words.starts_with("Something went wrong on our side."),
            "{words}"
        );
        assert!(
            !words.contains("1811") && !words.contains("database"),
            "{words}"
        );
        let reference = words.rsplit(' ').next().unwrap().trim_end_matches('.');
        assert_eq!(reference.len(), 8, "{words}");
        // bad input says what is wrong
        let e = stored_messages::Error::UnknownLevel("loud".into());
        assert_eq!(failure_words(&e, "a test"), "Unknown level \"loud\".");
    }
}
