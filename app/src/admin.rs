//! The admin area: broadcast form (with preview, background jobs and audit), message browser
//! with delete and cleanup. Admins only: a logged-in non-admin gets 403, an anonymous visitor
//! is sent to the login page and comes back after it.

use std::sync::Arc;
use std::time::Instant;

use rocket::form::{Contextual, Form};
use rocket::http::Status;
use rocket::request::{FromRequest, Outcome};
use rocket::response::Redirect;
use rocket::serde::json::{json, Json, Value};
use rocket::{Request, Route, State};
use rocket_dyn_templates::context;
use serde::Serialize;

use crate::auth::CurrentUser;
use crate::jobs::{Audit, Jobs};
use crate::users::{User, UserError, Users};
use stored_messages::backend::from_micros;
use stored_messages::report;
use stored_messages::template::Page;
use stored_messages::StreamMessage;
use stored_messages::{
    Level, MessageAdmin, MessageId, Messages, NewMessage, Store, UserId, MAX_TEXT_CHARS,
};

/// Broadcasts to more users than this run as background jobs (`admin.background_threshold`).
pub const DEFAULT_BACKGROUND_THRESHOLD: usize = 5_000;

/// How many users make a broadcast a background job.
#[derive(Debug, Clone, Copy)]
pub struct BackgroundThreshold(pub usize);

/// A logged-in admin. Anonymous: forwards (to the login redirect); not an admin: 403.
pub struct AdminUser(pub User);

#[rocket::async_trait]
impl<'r> FromRequest<'r> for AdminUser {
    type Error = Status;

    async fn from_request(request: &'r Request<'_>) -> Outcome<Self, Status> {
        let session = match request.guard::<CurrentUser>().await {
            Outcome::Success(CurrentUser(user)) => user,
            Outcome::Error(e) => return Outcome::Error(e),
            Outcome::Forward(status) => return Outcome::Forward(status),
        };
        // The cookie may be older than a change of the admin flag: ask the database.
        let Some(users) = request.rocket().state::<Arc<Users>>() else {
            return Outcome::Error((Status::InternalServerError, Status::InternalServerError));
        };
        match users.by_id(session.user_id()).await {
            Ok(Some(user)) if user.is_admin => Outcome::Success(AdminUser(user)),
            Ok(_) => Outcome::Error((Status::Forbidden, Status::Forbidden)),
            Err(e) => {
                log::error!(
                    "reference app: loading user {} failed: {}",
                    session.id,
                    report(&e)
                );
                Outcome::Error((Status::ServiceUnavailable, Status::ServiceUnavailable))
            }
        }
    }
}

#[derive(Serialize)]
struct LevelChoice {
    value: String,
    label: String,
}

fn stored_level_choices(store: &Store) -> Vec<LevelChoice> {
    let tags = store.level_tags();
    let mut choices: Vec<LevelChoice> = store
        .config()
        .store_levels
        .iter()
        .map(|l| {
            let tag = tags.tag(*l);
            LevelChoice {
                value: l.name().map_or_else(|| l.0.to_string(), str::to_string),
                label: if tag.is_empty() {
                    l.0.to_string()
                } else {
                    format!("{tag} ({})", l.0)
                },
            }
        })
        .collect();
    choices.push(LevelChoice {
        value: "custom".into(),
        label: "custom level…".into(),
    });
    choices
}

#[get("/admin")]
async fn dashboard(
    admin: AdminUser,
    messages: Messages<'_>,
    jobs: &State<Jobs>,
    users: &State<Arc<Users>>,
) -> Page {
    let recent = jobs.recent(5).await.unwrap_or_default();
    let user_count = users.count().await.unwrap_or(0);
    Page::render(
        "admin/index",
        context! { messages: &messages, user: &admin.0, jobs: recent, user_count },
    )
}

#[derive(Debug, Default, Serialize)]
struct BroadcastValues {
    level: String,
    custom_level: String,
    message: String,
    extra_tags: String,
    url: String,
    recipients: String,
    usernames: String,
}

#[derive(Debug, Default, Serialize)]
struct BroadcastErrors {
    level: Option<String>,
    message: Option<String>,
    extra_tags: Option<String>,
    url: Option<String>,
    usernames: Option<String>,
}

impl BroadcastErrors {
    fn any(&self) -> bool {
        self.level.is_some()
            || self.message.is_some()
            || self.extra_tags.is_some()
            || self.url.is_some()
            || self.usernames.is_some()
    }
}

fn broadcast_page(
    messages: &Messages<'_>,
    admin: &User,
    store: &Store,
    values: &BroadcastValues,
    errors: &BroadcastErrors,
    preview: Option<Vec<StreamMessage>>,
) -> Page {
    Page::render(
        "admin/broadcast",
        context! {
            messages,
            user: admin,
            levels: stored_level_choices(store),
            max_len: MAX_TEXT_CHARS,
            form: values,
            errors,
            preview,
            store_levels: store.config().store_levels.iter().map(|l| l.0).collect::<Vec<_>>(),
        },
    )
}

#[get("/admin/broadcast")]
fn broadcast_form(admin: AdminUser, messages: Messages<'_>, store: &State<Store>) -> Page {
    let values = BroadcastValues {
        level: "stored_info".into(),
        recipients: "everyone".into(),
        ..Default::default()
    };
    broadcast_page(
        &messages,
        &admin.0,
        store,
        &values,
        &BroadcastErrors::default(),
        None,
    )
}

#[derive(Debug, FromForm)]
struct BroadcastForm<'r> {
    level: &'r str,
    custom_level: Option<&'r str>,
    message: &'r str,
    extra_tags: Option<&'r str>,
    url: Option<&'r str>,
    recipients: &'r str,
    usernames: Option<&'r str>,
    action: Option<&'r str>,
}

/// Usernames separated by commas, spaces or new lines, without duplicates, in order.
fn parse_usernames(raw: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for name in raw
        .split([',', '\n', '\r', ' ', '\t'])
        .map(str::trim)
        .filter(|n| !n.is_empty())
    {
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    }
    names
}

#[allow(clippy::too_many_arguments)]
#[post("/admin/broadcast", data = "<form>")]
async fn broadcast_send(
    admin: AdminUser,
    form: Form<Contextual<'_, BroadcastForm<'_>>>,
    messages: Messages<'_>,
    store: &State<Store>,
    users: &State<Arc<Users>>,
    jobs: &State<Jobs>,
    threshold: &State<BackgroundThreshold>,
) -> Result<Redirect, Page> {
    let values = match &form.value {
        Some(f) => BroadcastValues {
            level: f.level.to_string(),
            custom_level: f.custom_level.unwrap_or("").to_string(),
            message: f.message.to_string(),
            extra_tags: f.extra_tags.unwrap_or("").to_string(),
            url: f.url.unwrap_or("").to_string(),
            recipients: f.recipients.to_string(),
            usernames: f.usernames.unwrap_or("").to_string(),
        },
        // Missing fields: keep whatever was sent, to show it again with the errors.
        None => {
            let field = |name: &str| form.context.field_value(name).unwrap_or("").to_string();
            BroadcastValues {
                level: field("level"),
                custom_level: field("custom_level"),
                message: field("message"),
                extra_tags: field("extra_tags"),
                url: field("url"),
                recipients: field("recipients"),
                usernames: field("usernames"),
            }
        }
    };
    let preview_only = form.value.as_ref().and_then(|f| f.action) == Some("preview");
    let mut errors = BroadcastErrors::default();

    // Level: a stored level by name, or a custom integer that is one of the store levels.
    let raw_level = if values.level == "custom" {
        values.custom_level.as_str()
    } else {
        values.level.as_str()
    };
    let level = match Level::parse(raw_level) {
        Ok(level) if store.config().is_store_level(level) => Some(level),
        Ok(level) => {
            errors.level = Some(format!("level {} is not a store level", level.0));
            None
        }
        Err(e) => {
            errors.level = Some(e.to_string());
            None
        }
    };
    // Every field is checked on its own, so all of their errors show at once.
    let url = Some(values.url.trim()).filter(|u| !u.is_empty());
    if let Err(e) = NewMessage::parse(Level::INFO, &values.message, "", None, None) {
        errors.message = Some(e.to_string());
    }
    if let Err(e) = stored_messages::parse_extra_tags(&values.extra_tags) {
        errors.extra_tags = Some(e.to_string());
    }
    if let Some(Err(e)) = url.map(stored_messages::parse_url) {
        errors.url = Some(e.to_string());
    }
    let new = match level {
        Some(l) if !errors.any() => {
            NewMessage::parse(l, &values.message, &values.extra_tags, url, None).ok()
        }
        _ => None,
    };

    // Audience: everyone, or named users that must all exist.
    let named = values.recipients == "list";
    let names = parse_usernames(&values.usernames);
    let mut audience: Option<Vec<UserId>> = None;
    if named {
        if names.is_empty() {
            errors.usernames = Some("enter at least one username".into());
        } else {
            match users.ids_by_names(&names).await {
                Ok(ids) => audience = Some(ids),
                Err(UserError::Unknown(e)) => errors.usernames = Some(e.to_string()),
                Err(e) => {
                    log::error!(
                        "reference app: looking up recipients failed: {}",
                        report(&e)
                    );
                    errors.usernames = Some("recipients could not be looked up right now".into());
                }
            }
        }
    } else if values.recipients != "everyone" {
        errors.usernames = Some("choose everyone or a list of usernames".into());
    }

    let status = if errors.any() {
        Status::UnprocessableEntity
    } else {
        Status::Ok
    };
    let Some(new) = new.filter(|_| !errors.any()) else {
        return Err(
            broadcast_page(&messages, &admin.0, store, &values, &errors, None).status(status),
        );
    };
    if preview_only {
        let shown =
            StreamMessage::stored(&new.clone().into_message(MessageId(0)), store.level_tags());
        return Err(broadcast_page(
            &messages,
            &admin.0,
            store,
            &values,
            &errors,
            Some(vec![shown]),
        )
        .status(Status::Ok));
    }

    let audience = match audience {
        Some(ids) => ids,
        None => match users.all_ids().await {
            Ok(ids) => ids,
            Err(e) => {
                log::error!("reference app: listing users failed: {}", report(&e));
                errors.usernames = Some("the user list is unavailable right now".into());
                return Err(
                    broadcast_page(&messages, &admin.0, store, &values, &errors, None)
                        .status(Status::ServiceUnavailable),
                );
            }
        },
    };
    let audience_label = if named {
        names.join(", ")
    } else {
        "everyone".to_string()
    };
    let size = audience.len() as i64;

    if audience.len() > threshold.0 {
        // Background: create the message once, then deliver it chunk by chunk.
        let message = match store.backend().create_message(&new).await {
            Ok(m) => m,
            Err(e) => return Err(failed(&messages, &admin.0, store, &values, e)),
        };
        let job = match jobs
            .queue(&message, admin.0.id, named.then_some(audience.as_slice()))
            .await
        {
            Ok(job) => job,
            Err(e) => {
                return Err(failed(
                    &messages,
                    &admin.0,
                    store,
                    &values,
                    stored_messages::backend::BackendError::Sql(e).into(),
                ))
            }
        };
        let audit = Audit {
            actor: &admin.0,
            message: &message,
            audience: &audience_label,
            audience_size: job.total,
            duration_ms: None,
            job_id: Some(job.id),
        };
        if let Err(e) = jobs.audit(audit).await {
            log::error!(
                "reference app: audit of job {} failed: {}",
                job.id,
                report(&e)
            );
        }
        jobs.start();
        return Ok(Redirect::to(format!("/admin/jobs/{}", job.id)));
    }

    let started = Instant::now();
    let delivery = match store.add_message_for(&audience, new).await {
        Ok(d) => d,
        Err(e) => return Err(failed(&messages, &admin.0, store, &values, e)),
    };
    let elapsed = started.elapsed();
    let took = elapsed.as_millis() as i64;
    let audit = Audit {
        actor: &admin.0,
        message: &delivery.message,
        audience: &audience_label,
        audience_size: size,
        duration_ms: Some(took),
        job_id: None,
    };
    if let Err(e) = jobs.audit(audit).await {
        log::error!("reference app: audit failed: {}", report(&e));
    }
    let text = format!(
        "Sent to {} user{} in {:.1} ms.",
        delivery.recipients,
        if delivery.recipients == 1 { "" } else { "s" },
        elapsed.as_secs_f64() * 1000.0
    );
    let _ = messages.success(&text).await;
    Ok(Redirect::to("/admin/broadcast"))
}

fn failed(
    messages: &Messages<'_>,
    admin: &User,
    store: &Store,
    values: &BroadcastValues,
    e: stored_messages::Error,
) -> Page {
    log::error!("reference app: broadcast failed: {}", report(&e));
    let errors = BroadcastErrors {
        message: Some(format!("nothing was sent: {}", e.public_message())),
        ..Default::default()
    };
    broadcast_page(messages, admin, store, values, &errors, None).status(e.status())
}

#[get("/admin/jobs/<id>")]
async fn job_page(
    admin: AdminUser,
    id: i64,
    messages: Messages<'_>,
    jobs: &State<Jobs>,
    store: &State<Store>,
) -> Result<Page, Status> {
    let job = jobs
        .get(id)
        .await
        .map_err(|_| Status::ServiceUnavailable)?
        .ok_or(Status::NotFound)?;
    // What is being sent, and to whom, from the job's own copy of the message.
    let message: Option<stored_messages::Message> = serde_json::from_str(&job.message).ok();
    let audience = if job.audience == "list" {
        "the users named in the form"
    } else {
        "everyone"
    };
    Ok(Page::render(
        "admin/job",
        context! {
            messages: &messages, user: &admin.0, job,
            text: message.as_ref().map(|m| m.message.as_str()),
            level_tag: message.as_ref().map(|m| store.level_tags().tag(m.level)),
            audience,
        },
    ))
}

#[get("/admin/jobs/<id>/status")]
async fn job_status(_admin: AdminUser, id: i64, jobs: &State<Jobs>) -> Result<Json<Value>, Status> {
    let job = jobs
        .get(id)
        .await
        .map_err(|_| Status::ServiceUnavailable)?
        .ok_or(Status::NotFound)?;
    Ok(Json(json!({
        "id": job.id, "status": job.status, "total": job.total, "delivered": job.delivered,
        "error": job.error,
    })))
}

#[post("/admin/jobs/<id>/resume")]
async fn job_resume(
    _admin: AdminUser,
    id: i64,
    jobs: &State<Jobs>,
    messages: Messages<'_>,
) -> Redirect {
    match jobs.resume(id).await {
        Ok(true) => {
            let _ = messages.info("The broadcast is running again.").await;
        }
        Ok(false) => {
            let _ = messages
                .warning("Only a failed broadcast can be resumed.")
                .await;
        }
        Err(e) => log::error!("reference app: resuming job {id} failed: {}", report(&e)),
    }
    Redirect::to(format!("/admin/jobs/{id}"))
}

#[get("/admin/audit")]
async fn audit(
    admin: AdminUser,
    messages: Messages<'_>,
    jobs: &State<Jobs>,
) -> Result<Page, Status> {
    let entries = jobs
        .audit_list(100)
        .await
        .map_err(|_| Status::ServiceUnavailable)?;
    let entries: Vec<Value> = entries
        .into_iter()
        .map(|e| {
            let at = from_micros(e.at_us).format("%Y-%m-%d %H:%M:%S UTC").to_string();
            json!({ "entry": e, "at": at, "level_name": Level(e.level as i32).name().unwrap_or("custom") })
        })
        .collect();
    Ok(Page::render(
        "admin/audit",
        context! { messages: &messages, user: &admin.0, entries },
    ))
}

/// Rows of the message browser.
const PAGE_SIZE: u32 = 25;

#[get("/admin/messages?<before>")]
async fn message_list(
    admin: AdminUser,
    before: Option<i64>,
    messages: Messages<'_>,
    store: &State<Store>,
) -> Result<Page, Status> {
    let before = before.filter(|b| *b > 0).map(MessageId);
    let listed = match message_admin(store) {
        Ok(admin) => admin.message_stats(PAGE_SIZE, before).await,
        Err(e) => Err(e),
    };
    let (stats, unsupported) = match listed {
        Ok(stats) => (stats, None),
        Err(e @ stored_messages::Error::Unsupported(_)) => (Vec::new(), Some(e.to_string())),
        Err(e) => {
            log::error!("reference app: message list failed: {}", report(&e));
            return Err(e.status());
        }
    };
    let cutoff =
        chrono::Utc::now() - chrono::Duration::days(i64::from(store.config().inbox_expire_days));
    let rows: Vec<Value> = stats
        .iter()
        .map(|s| {
            json!({
                "id": s.message.id, "message": s.message.message, "level": s.message.level.0,
                "level_tag": store.level_tags().tag(s.message.level),
                "date": s.message.date.format("%Y-%m-%d %H:%M").to_string(),
                "recipients": s.recipients, "unread": s.unread,
                "expired": s.unread > 0 && s.message.date < cutoff,
            })
        })
        .collect();
    let next = (stats.len() as u32 == PAGE_SIZE)
        .then(|| stats.last().map(|s| s.message.id.0))
        .flatten();
    Ok(Page::render(
        "admin/messages",
        context! {
            messages: &messages, user: &admin.0, rows, next, unsupported,
            inbox_expire_days: store.config().inbox_expire_days,
        },
    ))
}

#[get("/admin/messages/<id>/delete")]
async fn delete_confirm(
    admin: AdminUser,
    id: i64,
    messages: Messages<'_>,
    store: &State<Store>,
) -> Result<Page, Status> {
    let stats = message_admin(store)
        .map_err(|e| e.status())?
        .message_stats(1, Some(MessageId(id.saturating_add(1))))
        .await
        .map_err(|e| e.status())?;
    let Some(s) = stats.into_iter().find(|s| s.message.id == MessageId(id)) else {
        return Err(Status::NotFound);
    };
    Ok(Page::render(
        "admin/delete",
        context! { messages: &messages, user: &admin.0, m: s },
    ))
}

/// The backend's administration capability, or why there is none.
fn message_admin(store: &Store) -> Result<&dyn MessageAdmin, stored_messages::Error> {
    store
        .backend()
        .admin()
        .ok_or(stored_messages::Error::Unsupported(
            "listing and deleting messages",
        ))
}

#[post("/admin/messages/<id>/delete")]
async fn delete(
    _admin: AdminUser,
    id: i64,
    messages: Messages<'_>,
    store: &State<Store>,
) -> Result<Redirect, Status> {
    let deleted = match message_admin(store) {
        Ok(admin) => admin.message_delete(MessageId(id)).await,
        Err(e) => Err(e),
    };
    match deleted {
        Ok(n) => {
            let _ = messages
                .success(&format!(
                    "Message {id} deleted from {n} inboxes and archives."
                ))
                .await;
            Ok(Redirect::to("/admin/messages"))
        }
        Err(stored_messages::Error::MessageDoesNotExist(_)) => Err(Status::NotFound),
        Err(e) => {
            log::error!(
                "reference app: deleting message {id} failed: {}",
                report(&e)
            );
            Err(e.status())
        }
    }
}

#[post("/admin/cleanup")]
async fn cleanup(
    _admin: AdminUser,
    messages: Messages<'_>,
    store: &State<Store>,
) -> Result<Redirect, Status> {
    let c = store.cleanup().await.map_err(|e| e.status())?;
    let _ = messages
        .success(&format!(
            "Cleanup removed {} expired inbox entries and {} expired messages.",
            c.inbox_entries, c.messages
        ))
        .await;
    Ok(Redirect::to("/admin/messages"))
}

/// Anonymous visitors of any admin page (`/admin` included: a trailing `<_..>` also matches
/// no segment) go to the login page and come back after it. A logged-in user only gets here
/// when no admin route matched (`/admin/jobs/abc`, `/admin/nowhere`): that is a 404, not a
/// trip to the login page, which would send them straight back.
#[get("/admin/<_..>", rank = 20)]
fn login_first(
    request_uri: &rocket::http::uri::Origin<'_>,
    user: Option<CurrentUser>,
) -> Result<Redirect, Status> {
    if user.is_some() {
        return Err(Status::NotFound);
    }
    let next = crate::auth::safe_next(request_uri.path().as_str()).to_string();
    Ok(Redirect::to(format!("/login?next={}", url_escape(&next))))
}

fn url_escape(path: &str) -> String {
    url::form_urlencoded::byte_serialize(path.as_bytes())
        .collect::<String>()
        .replace("%2F", "/")
}

/// The admin routes.
pub fn routes() -> Vec<Route> {
    routes![
        dashboard,
        broadcast_form,
        broadcast_send,
        job_page,
        job_status,
        job_resume,
        audit,
        message_list,
        delete_confirm,
        delete,
        cleanup,
        login_first
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_split_on_commas_spaces_and_lines() {
        assert_eq!(
            parse_usernames("alice, bob\ncarol\r\n\n bob ,"),
            ["alice", "bob", "carol"]
        );
        assert!(parse_usernames(" , \n").is_empty());
    }
}
