//! The reference app's pages: home (the merged stream and a demo form), archive, health,
//! and the HTML catchers.

use rocket::form::{Contextual, Form};
use rocket::http::Status;
use rocket::response::Redirect;
use rocket::serde::Serialize;
use rocket::{Catcher, Request, Route};
use rocket_dyn_templates::context;

use crate::auth::CurrentUser;
use stored_messages::template::Page;
use stored_messages::{Level, Messages, MAX_TEXT_CHARS};

/// A level choice of the demo form.
#[derive(Serialize)]
struct LevelChoice {
    name: &'static str,
    /// `stored info (21)`.
    text: &'static str,
    selected: bool,
}

/// The demo form's level choices, with `chosen` selected. (What each shows is built once;
/// the page template then has one lookup less per option to make.)
fn level_choices(chosen: &str) -> Vec<LevelChoice> {
    static TEXTS: std::sync::OnceLock<Vec<(&'static str, String)>> = std::sync::OnceLock::new();
    TEXTS
        .get_or_init(|| {
            Level::NAMED
                .iter()
                .map(|(name, level)| (*name, format!("{} ({})", name.replace('_', " "), level.0)))
                .collect()
        })
        .iter()
        .map(|(name, text)| LevelChoice {
            name,
            text,
            selected: *name == chosen,
        })
        .collect()
}

/// What the demo form sent back, to re-render it.
#[derive(Debug, Default, Serialize)]
struct DemoValues {
    level: String,
    message: String,
    extra_tags: String,
    url: String,
}

#[derive(Debug, Default, Serialize)]
struct DemoErrors {
    level: Option<String>,
    message: Option<String>,
    extra_tags: Option<String>,
    url: Option<String>,
}

fn home(
    messages: &Messages<'_>,
    user: Option<&CurrentUser>,
    kept: bool,
    form: &DemoValues,
    errors: &DemoErrors,
) -> Page {
    // Serializing the guard shows the stream; `?keep=1` then takes that back.
    let page = Page::render(
        "index",
        context! {
            messages,
            user: user.map(|u| &u.0),
            kept,
            levels: level_choices(&form.level),
            max_len: MAX_TEXT_CHARS,
            form,
            errors,
        },
    );
    if kept {
        messages.set_used(false);
    }
    page
}

#[get("/?<keep>")]
fn index(messages: Messages<'_>, user: Option<CurrentUser>, keep: Option<&str>) -> Page {
    let kept = matches!(keep, Some("1" | "true" | "yes" | "on"));
    let form = DemoValues {
        level: "stored_info".into(),
        ..DemoValues::default()
    };
    home(
        &messages,
        user.as_ref(),
        kept,
        &form,
        &DemoErrors::default(),
    )
}

#[derive(Debug, FromForm)]
struct DemoForm<'r> {
    level: &'r str,
    message: &'r str,
    extra_tags: Option<&'r str>,
    url: Option<&'r str>,
}

/// Adds a message through the guard (stored or flash by level) and goes back home; bad
/// input re-renders the form with field errors and adds nothing.
#[post("/demo/message", data = "<form>")]
async fn demo_message(
    form: Form<Contextual<'_, DemoForm<'_>>>,
    messages: Messages<'_>,
    user: Option<CurrentUser>,
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
    let level_input = values.level.clone();
    let mut errors = DemoErrors::default();
    let level = match Level::parse(&level_input) {
        Ok(level) => Some(level),
        Err(e) => {
            errors.level = Some(e.to_string());
            None
        }
    };
    if values.message.trim().is_empty() {
        errors.message = Some("Enter a message.".into());
    }
    // Every field's error at once: the url is checked even when the text is missing.
    if !values.url.trim().is_empty() {
        if let Err(e) = stored_messages::parse_url(values.url.trim()) {
            errors.url = Some(e.to_string());
        }
    }
    if let (Some(level), None, None) = (level, &errors.message, &errors.url) {
        let url = Some(values.url.as_str()).filter(|u| !u.trim().is_empty());
        match messages
            .add_with(level, &values.message, &values.extra_tags, url)
            .await
        {
            Ok(()) => return Ok(Redirect::to("/")),
            Err(e) if e.is_bad_input() => {
                let text = e.to_string();
                match e {
                    stored_messages::Error::InvalidUrl { .. } => errors.url = Some(text),
                    stored_messages::Error::ExtraTagsTooLong { .. }
                    | stored_messages::Error::InvalidExtraTags(_) => errors.extra_tags = Some(text),
                    _ => errors.message = Some(text),
                }
            }
            Err(e) => {
                log::error!(
                    "reference app: adding a message failed: {}",
                    stored_messages::report(&e)
                );
                return Err(error_page(
                    e.status(),
                    &e.public_message(),
                    user.as_ref().map(|u| &u.0),
                )
                .status(e.status()));
            }
        }
    }
    Err(home(&messages, user.as_ref(), false, &values, &errors).status(Status::UnprocessableEntity))
}

#[get("/archive")]
fn archive(messages: Messages<'_>, user: CurrentUser) -> Page {
    Page::render("archive", context! { messages: &messages, user: &user.0 })
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
    routes![index, demo_message, archive, archive_login, health, ready]
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
