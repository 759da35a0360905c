//! The audit log of broadcasts, the message browser with deletion, and cleanup.

use std::sync::Arc;

use rocket::http::Status;
use rocket::response::Redirect;
use rocket::serde::json::{json, Value};
use rocket::State;
use rocket_dyn_templates::context;
use stored_messages::backend::from_micros;
use stored_messages::report;
use stored_messages::template::Page;
use stored_messages::{Level, MessageAdmin, MessageId, Messages, Store, StreamMessage};

use super::AdminUser;
use crate::jobs::AuditEntry;
use crate::paging::Trail;
use crate::users::Users;

/// Audit entries a page.
const AUDIT_PAGE: i64 = 25;

/// One page of the audit log, newest first: the entries with ids below `before` (all when
/// `None`), at most `limit`. The jobs module writes the log; this only reads it, by its
/// primary key, so a page costs the same however deep it is.
async fn audit_page(
    users: &Users,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<AuditEntry>, sqlx::Error> {
    let sql = "select id, actor_id, actor, at_us, level, message, audience, audience_size, \
               message_id, duration_ms, job_id from app_audit where id < $1 \
               order by id desc limit $2";
    let before = before.unwrap_or(i64::MAX);
    Ok(
        with_pool!(users.pool(), pool => sqlx::query_as(sql).bind(before).bind(limit).fetch_all(pool).await?),
    )
}

/// Every broadcast, newest first, a page at a time both ways (`from`: the id the page
/// starts below; `back`: the pages before it).
#[get("/admin/audit?<from>&<back>")]
pub(super) async fn audit(
    admin: AdminUser,
    messages: Messages<'_>,
    users: &State<Arc<Users>>,
    from: Option<&str>,
    back: Option<&str>,
) -> Result<Page, Status> {
    let valid = |s: &str| s.parse::<i64>().is_ok_and(|id| id > 0);
    let trail = Trail::parse(from, back, valid).ok_or(Status::BadRequest)?;
    let before = trail.from.parse::<i64>().ok();
    let mut entries = audit_page(users, before, AUDIT_PAGE + 1)
        .await
        .map_err(|e| {
            log::error!(
                "reference app: reading the audit log failed: {}",
                report(&e)
            );
            Status::ServiceUnavailable
        })?;
    let more = entries.len() as i64 > AUDIT_PAGE;
    entries.truncate(AUDIT_PAGE as usize);
    let next = entries.last().filter(|_| more).map(|e| e.id.to_string());
    let entries: Vec<Value> = entries
        .into_iter()
        .map(|e| {
            let at = from_micros(e.at_us);
            json!({
                "entry": e,
                "at": at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "at_text": at.format("%Y-%m-%d %H:%M UTC").to_string(),
                "level_label": Level(e.level as i32).label(),
            })
        })
        .collect();
    Ok(Page::render(
        "admin/audit",
        context! {
            messages: messages.flash(), here: "admin", user: &admin.0, entries,
            first: trail.is_first(), pages: trail.links(next),
        },
    ))
}

/// Rows of the message browser.
const PAGE_SIZE: u32 = 25;

/// The newest messages, a page at a time both ways: `from` is the id the page starts
/// below (`before`, the older spelling, still works), `back` the pages before it.
#[get("/admin/messages?<before>&<from>&<back>")]
pub(super) async fn message_list(
    admin: AdminUser,
    before: Option<i64>,
    from: Option<&str>,
    back: Option<&str>,
    messages: Messages<'_>,
    store: &State<Store>,
) -> Result<Page, Status> {
    let before_text = before.filter(|b| *b > 0).map(|b| b.to_string());
    let from = from.or(before_text.as_deref());
    let valid = |s: &str| s.parse::<i64>().is_ok_and(|id| id > 0);
    let trail = Trail::parse(from, back, valid).ok_or(Status::BadRequest)?;
    let before = trail.from.parse::<i64>().ok().map(MessageId);
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
                "level_label": s.message.level.label(),
                "head": StreamMessage::stored(&s.message, store.level_tags()).head,
                "date": s.message.date.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "date_text": s.message.date.format("%Y-%m-%d %H:%M UTC").to_string(),
                "recipients": s.recipients, "unread": s.unread,
                "expired": s.unread > 0 && s.message.date < cutoff,
            })
        })
        .collect();
    let next = (stats.len() as u32 == PAGE_SIZE)
        .then(|| stats.last().map(|s| s.message.id.0.to_string()))
        .flatten();
    Ok(Page::render(
        "admin/messages",
        context! {
            messages: messages.flash(), here: "admin", user: &admin.0, rows, unsupported,
            pages: trail.links(next),
            inbox_expire_days: store.config().inbox_expire_days,
        },
    ))
}

#[get("/admin/messages/<id>/delete")]
pub(super) async fn delete_confirm(
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
        context! { messages: messages.flash(), here: "admin", user: &admin.0, m: s },
    ))
}

/// The backend's administration capability, or why there is none.
pub(super) fn message_admin(store: &Store) -> Result<&dyn MessageAdmin, stored_messages::Error> {
    store
        .backend()
        .admin()
        .ok_or(stored_messages::Error::Unsupported(
            "listing and deleting messages",
        ))
}

#[post("/admin/messages/<id>/delete")]
pub(super) async fn delete(
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
pub(super) async fn cleanup(
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
