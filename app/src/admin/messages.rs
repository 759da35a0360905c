//! The audit log of broadcasts, the message browser (pages both ways, search) with deletion,
//! and cleanup.

use std::sync::Arc;

use rocket::http::Status;
use rocket::response::Redirect;
use rocket::serde::json::{json, Value};
use rocket::State;
use rocket_dyn_templates::context;
use stored_messages::api::NOTICE_ANCHOR;
use stored_messages::backend::from_micros;
use stored_messages::report;
use stored_messages::template::Page;
use stored_messages::{
    Cursor, Level, ListQuery, MessageAdmin, MessageId, MessageStats, Messages, Store,
    StreamMessage, UserId,
};

use super::AdminUser;
use crate::jobs::Jobs;
use crate::paging::{cut_page, is_id, Trail};
use crate::users::Users;

/// Audit entries a page.
const AUDIT_PAGE: i64 = 25;

/// Every broadcast, newest first, a page at a time both ways (`from`: the id the page
/// starts below; `back`: the pages before it).
#[get("/admin/audit?<from>&<back>")]
pub(super) async fn audit(
    admin: AdminUser,
    messages: Messages<'_>,
    jobs: &State<Jobs>,
    from: Option<&str>,
    back: Option<&str>,
) -> Result<Page, Status> {
    let trail = Trail::parse(from, back, is_id).ok_or(Status::BadRequest)?;
    let before = trail.from.parse::<i64>().ok();
    let mut entries = jobs.audit_page(before, AUDIT_PAGE + 1).await.map_err(|e| {
        log::error!(
            "reference app: reading the audit log failed: {}",
            report(&e)
        );
        Status::ServiceUnavailable
    })?;
    let next = cut_page(&mut entries, AUDIT_PAGE as usize, |e| e.id.to_string());
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

/// The most messages one search request looks through; past that it stops and offers
/// to go on from there ("Older"), so a search costs the same however long the list is.
const SEARCH_SCAN: usize = 1000;

/// What the browser lists: a page of the newest messages, or of a search (text, and/or a
/// recipient, whose archive is then what is searched).
struct Listing {
    stats: Vec<MessageStats>,
    /// Where the next page starts, when there is more.
    next: Option<String>,
    /// How many messages this page looked through (for a search).
    scanned: usize,
}

/// Whether `text` contains `needle` (already lowercased), ignoring case.
fn matches(text: &str, needle: &str) -> bool {
    needle.is_empty() || text.to_lowercase().contains(needle)
}

/// The newest messages below `before` whose text contains `needle`: pages of the
/// browser's listing, until a page of matches or [`SEARCH_SCAN`] messages.
async fn search_all(
    admin: &dyn MessageAdmin,
    before: Option<MessageId>,
    needle: &str,
) -> stored_messages::Result<Listing> {
    let mut found = Vec::new();
    let mut before = before;
    let mut scanned = 0;
    loop {
        let page = admin.message_stats(100, before).await?;
        let full = page.len() == 100;
        for s in page {
            scanned += 1;
            before = Some(s.message.id);
            if matches(&s.message.message, needle) {
                found.push(s);
                if found.len() == PAGE_SIZE as usize {
                    // There may be more: go on from here.
                    let next = before.map(|id| id.0.to_string());
                    return Ok(Listing {
                        stats: found,
                        next,
                        scanned,
                    });
                }
            }
        }
        if !full {
            return Ok(Listing {
                stats: found,
                next: None,
                scanned,
            });
        }
        if scanned >= SEARCH_SCAN {
            let next = before.map(|id| id.0.to_string());
            return Ok(Listing {
                stats: found,
                next,
                scanned,
            });
        }
    }
}

/// The messages `user` received (their archive, newest first) after `after`, whose text
/// contains `needle`, with each one's counts.
async fn search_recipient(
    store: &Store,
    admin: &dyn MessageAdmin,
    user: UserId,
    after: Option<Cursor>,
    needle: &str,
) -> stored_messages::Result<Listing> {
    let mut found = Vec::new();
    let mut after = after;
    let mut scanned = 0;
    let next = loop {
        let query = ListQuery {
            limit: Some(100),
            after,
        };
        let page = store.backend().archive_list(user, query).await?;
        let full = page.len() == 100;
        let mut stop = None;
        for m in page {
            scanned += 1;
            after = Some(Cursor::after(&m));
            if matches(&m.message, needle) {
                found.push(m);
                if found.len() == PAGE_SIZE as usize {
                    stop = Some(after.map(|c| crate::pages::cursor_text(&c)));
                    break;
                }
            }
        }
        if let Some(next) = stop {
            break next;
        }
        if !full {
            break None;
        }
        if scanned >= SEARCH_SCAN {
            break after.map(|c| crate::pages::cursor_text(&c));
        }
    };
    // Each message's counts (one small query per row, at most a page of them).
    let mut stats = Vec::with_capacity(found.len());
    for m in found {
        let counted = admin
            .message_stats(1, Some(MessageId(m.id.0.saturating_add(1))))
            .await?
            .into_iter()
            .find(|s| s.message.id == m.id);
        stats.push(counted.unwrap_or(MessageStats {
            message: m,
            recipients: 0,
            unread: 0,
        }));
    }
    Ok(Listing {
        stats,
        next,
        scanned,
    })
}

/// The newest messages, a page at a time both ways (`from`: where the page starts;
/// `back`: the pages before it; `before`, the older spelling of `from`, still works), or
/// a search: `q` (text contained, any case) and/or `recipient` (a username).
#[allow(clippy::too_many_arguments)]
#[get("/admin/messages?<before>&<from>&<back>&<q>&<recipient>")]
pub(super) async fn message_list(
    admin: AdminUser,
    before: Option<i64>,
    from: Option<&str>,
    back: Option<&str>,
    q: Option<&str>,
    recipient: Option<&str>,
    messages: Messages<'_>,
    store: &State<Store>,
    users: &State<Arc<Users>>,
) -> Result<Page, Status> {
    let q = q.map(str::trim).unwrap_or("");
    let recipient = recipient.map(str::trim).unwrap_or("");
    let searching = !q.is_empty() || !recipient.is_empty();
    let before_text = before.filter(|b| *b > 0).map(|b| b.to_string());
    let from = from.or(before_text.as_deref());
    let trail = if recipient.is_empty() {
        Trail::parse(from, back, is_id)
    } else {
        Trail::parse(from, back, |s| crate::pages::parse_cursor(s).is_some())
    }
    .ok_or(Status::BadRequest)?;
    let needle = q.to_lowercase();
    let mut recipient_error = None;
    let listed = match message_admin(store) {
        Err(e) => Err(e),
        Ok(admin) if !recipient.is_empty() => match users.by_name(recipient).await {
            Ok(Some(user)) => {
                let after = crate::pages::parse_cursor(&trail.from);
                search_recipient(store, admin, user.user_id(), after, &needle).await
            }
            Ok(None) => {
                recipient_error = Some(format!("There is no user named “{recipient}”."));
                Ok(Listing {
                    stats: Vec::new(),
                    next: None,
                    scanned: 0,
                })
            }
            Err(e) => {
                log::error!(
                    "reference app: looking up a recipient failed: {}",
                    report(&e)
                );
                return Err(Status::ServiceUnavailable);
            }
        },
        Ok(admin) => {
            let before = trail.from.parse::<i64>().ok().map(MessageId);
            if searching {
                search_all(admin, before, &needle).await
            } else {
                admin.message_stats(PAGE_SIZE, before).await.map(|stats| {
                    let next = (stats.len() as u32 == PAGE_SIZE)
                        .then(|| stats.last().map(|s| s.message.id.0.to_string()))
                        .flatten();
                    Listing {
                        stats,
                        next,
                        scanned: 0,
                    }
                })
            }
        }
    };
    let (listing, unsupported) = match listed {
        Ok(listing) => (listing, None),
        Err(e @ stored_messages::Error::Unsupported(_)) => (
            Listing {
                stats: Vec::new(),
                next: None,
                scanned: 0,
            },
            Some(e.to_string()),
        ),
        Err(e) => {
            log::error!("reference app: message list failed: {}", report(&e));
            return Err(e.status());
        }
    };
    let cutoff =
        chrono::Utc::now() - chrono::Duration::days(i64::from(store.config().inbox_expire_days));
    let rows: Vec<Value> = listing
        .stats
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
    // The search travels with the page links.
    let search: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("q", q)
        .append_pair("recipient", recipient)
        .finish();
    let pages = trail.links(listing.next);
    let pages = if searching {
        pages.with_params(&search)
    } else {
        pages
    };
    let status = if recipient_error.is_some() {
        Status::UnprocessableEntity
    } else {
        Status::Ok
    };
    Ok(Page::render(
        "admin/messages",
        context! {
            messages: messages.flash(), here: "admin", user: &admin.0, rows, unsupported,
            pages, searching, q, recipient, recipient_error,
            scanned: listing.scanned, scan_limit: SEARCH_SCAN,
            inbox_expire_days: store.config().inbox_expire_days,
        },
    )
    .status(status))
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
            Ok(Redirect::to(format!("/admin/messages#{NOTICE_ANCHOR}")))
        }
        // Deleted already (a second click, another admin, a page left open): said so.
        Err(stored_messages::Error::MessageDoesNotExist(_)) => {
            let _ = messages
                .info(&format!(
                    "Message {id} no longer exists: it was deleted already."
                ))
                .await;
            Ok(Redirect::to(format!("/admin/messages#{NOTICE_ANCHOR}")))
        }
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
    Ok(Redirect::to(format!("/admin/messages#{NOTICE_ANCHOR}")))
}
