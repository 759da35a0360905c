//! The admin area: broadcast form (with preview, background jobs and audit), message browser
//! with delete and cleanup. Admins only: a logged-in non-admin gets 403, an anonymous visitor
//! is sent to the login page and comes back after it.
//!
//! - `broadcast.rs`: the broadcast form, its validation and the two ways of sending;
//! - `jobs.rs`: the background broadcasts: their list, a page each, status and resumption;
//! - `messages.rs`: the audit log, the message browser (paged, searchable), deletion and
//!   cleanup.

use std::sync::Arc;

use rocket::http::Status;
use rocket::request::{FromRequest, Outcome};
use rocket::response::Redirect;
use rocket::{Request, Route, State};
use rocket_dyn_templates::context;
use stored_messages::api::NOTICE_ANCHOR;
use stored_messages::template::Page;
use stored_messages::Messages;

use crate::auth::CurrentUser;
use crate::jobs::Jobs;
use crate::users::{User, Users};

mod broadcast;
mod jobs;
mod messages;

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
        // The session lookup reads the user's row (admin flag included) on every request,
        // so a revoked admin flag takes effect at once without a second query.
        match request.guard::<CurrentUser>().await {
            Outcome::Success(CurrentUser(user)) if user.is_admin => {
                Outcome::Success(AdminUser(user))
            }
            Outcome::Success(_) => Outcome::Error((Status::Forbidden, Status::Forbidden)),
            Outcome::Error(e) => Outcome::Error(e),
            Outcome::Forward(status) => Outcome::Forward(status),
        }
    }
}

#[get("/admin")]
async fn dashboard(
    admin: AdminUser,
    messages: Messages<'_>,
    jobs: &State<Jobs>,
    users: &State<Arc<Users>>,
) -> Page {
    dashboard_page(&admin, &messages, jobs, users, "", "").await
}

async fn dashboard_page(
    admin: &AdminUser,
    messages: &Messages<'_>,
    jobs: &Jobs,
    users: &Users,
    session_user: &str,
    session_error: &str,
) -> Page {
    let recent: Vec<serde_json::Value> = jobs
        .recent(5)
        .await
        .unwrap_or_default()
        .iter()
        .map(jobs::job_row)
        .collect();
    let user_count = users.count().await.unwrap_or(0);
    Page::render(
        "admin/index",
        context! {
            messages: messages.flash(), here: "admin-home", user: &admin.0, jobs: recent, user_count,
            session_user, session_error,
        },
    )
}

/// The address bar shows the form's action after an error: reloading it goes back to `/admin`.
#[get("/admin/sessions/end")]
fn end_sessions_page(_admin: AdminUser) -> Redirect {
    Redirect::to("/admin")
}

#[derive(Debug, FromForm)]
struct EndSessionsForm<'r> {
    #[field(default = "")]
    username: &'r str,
}

/// Ends every session of a user (as `stored-messages endsessions NAME` does).
#[post("/admin/sessions/end", data = "<form>")]
async fn end_sessions(
    admin: AdminUser,
    form: rocket::form::Form<EndSessionsForm<'_>>,
    messages: Messages<'_>,
    jobs: &State<Jobs>,
    users: &State<Arc<Users>>,
) -> Result<Redirect, Page> {
    let name = form.username.trim();
    let (admin, messages) = (&admin, &messages);
    let refuse = |error: String, status: Status| async move {
        dashboard_page(admin, messages, jobs, users, name, &error)
            .await
            .status(status)
    };
    if name.is_empty() {
        return Err(refuse("Enter a username.".into(), Status::UnprocessableEntity).await);
    }
    let user = match users.by_name(name).await {
        Ok(Some(user)) => user,
        Ok(None) => {
            let error = format!("There is no user named “{name}”.");
            return Err(refuse(error, Status::UnprocessableEntity).await);
        }
        Err(e) => {
            log::error!(
                "reference app: looking up a user failed: {}",
                stored_messages::report(&e)
            );
            let error = "Users are unavailable right now, try again shortly.".to_string();
            return Err(refuse(error, Status::ServiceUnavailable).await);
        }
    };
    match users.end_sessions(user.id).await {
        Ok(n) => {
            let text = match n {
                1 => format!("Ended 1 session of {}.", user.username),
                n => format!("Ended {n} sessions of {}.", user.username),
            };
            let _ = messages.success(&text).await;
            Ok(Redirect::to(format!("/admin#{NOTICE_ANCHOR}")))
        }
        // Ended; only telling the other instances is still being retried.
        Err(e @ crate::users::UserError::Announce(_)) => {
            log::error!(
                "reference app: ending sessions: {}",
                stored_messages::report(&e)
            );
            let text = format!(
                "Ended the sessions of {}. {}",
                user.username,
                crate::users::OTHER_SERVERS_WITHIN_A_MINUTE
            );
            let _ = messages.warning(&text).await;
            Ok(Redirect::to(format!("/admin#{NOTICE_ANCHOR}")))
        }
        Err(e) => {
            log::error!(
                "reference app: ending sessions failed: {}",
                stored_messages::report(&e)
            );
            let error = "Sessions are unavailable right now, try again shortly.".to_string();
            Err(refuse(error, Status::ServiceUnavailable).await)
        }
    }
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
    // With its query: a search of /admin/messages comes back as it was.
    let next = crate::auth::safe_next(&request_uri.to_string());
    Ok(Redirect::to(format!("/login?next={}", url_escape(&next))))
}

/// A POST no admin route took (`/admin/messages/abc/delete`: Rocket would answer the id it
/// could not read with 422): 404, as for a page; 401 for a visitor who is not logged in.
#[post("/admin/<_..>", rank = 20)]
fn no_such_action(user: Option<CurrentUser>) -> Status {
    if user.is_some() {
        Status::NotFound
    } else {
        Status::Unauthorized
    }
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
        end_sessions,
        end_sessions_page,
        broadcast::broadcast_form,
        broadcast::broadcast_send,
        jobs::job_page,
        jobs::job_list,
        jobs::job_status,
        jobs::job_resume,
        messages::audit,
        messages::message_list,
        messages::delete_confirm,
        messages::delete,
        messages::cleanup,
        login_first,
        no_such_action
    ]
}
