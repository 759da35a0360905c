//! Login, logout and the guards that tell pages who is logged in.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rocket::form::{Contextual, Form};
use rocket::http::{Cookie, CookieJar, Header, SameSite, Status};
use rocket::request::{FromRequest, Outcome};
use rocket::response::{Flash, Redirect};
use rocket::{Request, Route, State};
use rocket_dyn_templates::context;

use crate::throttle::LoginThrottle;
use crate::users::{User, UserError, Users, OTHER_SERVERS_WITHIN_A_MINUTE, SESSION_COOKIE};
use stored_messages::report;
use stored_messages::template::Page;
use stored_messages::{Messages, Store};

/// The logged-in user: the session the private session cookie names, if it has neither
/// ended (logout, `stored-messages endsessions`) nor expired. Forwards with 401 for anonymous
/// visitors, so a lower-ranked route (or the 401 catcher) can send them to the login page;
/// fails with 503 when the users database cannot say (never taken for anonymous).
/// Admin pages check the admin flag in the database (`AdminUser`).
#[derive(Debug, Clone)]
pub struct CurrentUser(pub User);

#[rocket::async_trait]
impl<'r> FromRequest<'r> for CurrentUser {
    type Error = Status;

    async fn from_request(request: &'r Request<'_>) -> Outcome<Self, Status> {
        match request_session_checked(request).await {
            Ok(Some(user)) => Outcome::Success(CurrentUser(user.clone())),
            Ok(None) => Outcome::Forward(Status::Unauthorized),
            Err(SessionUnreadable) => {
                Outcome::Error((Status::ServiceUnavailable, Status::ServiceUnavailable))
            }
        }
    }
}

/// How long a session lasts (`app.session_days`, default 14).
#[derive(Debug, Clone, Copy)]
pub struct SessionLifetime(pub Duration);

/// Sessions last this many days unless `app.session_days` says otherwise.
pub const DEFAULT_SESSION_DAYS: u64 = 14;

/// The session id that [`request_session`] read (decrypting the cookie once per request).
struct SessionId(Option<String>);

/// The id of the request's session, when [`request_session`] found a user for it.
pub(crate) async fn request_session_id<'r>(request: &'r Request<'_>) -> Option<&'r str> {
    request_session(request).await?;
    request.local_cache(|| SessionId(None)).0.as_deref()
}

/// The users database could not say whose session a request's cookie names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SessionUnreadable;

impl std::fmt::Display for SessionUnreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the users database could not be read")
    }
}

impl std::error::Error for SessionUnreadable {}

/// The request's session user, looked up once per request (one indexed query; an ended or
/// expired session is nobody). `Err` if the users database cannot answer (it is logged):
/// such a request is not anonymous, it cannot be answered.
pub(crate) async fn request_session_checked<'r>(
    request: &'r Request<'_>,
) -> Result<Option<&'r User>, SessionUnreadable> {
    request
        .local_cache_async(async {
            let Some(id) = request.cookies().get_private(SESSION_COOKIE) else {
                return Ok(None);
            };
            request.local_cache(|| SessionId(Some(id.value().to_string())));
            let Some(users) = request.rocket().state::<Arc<Users>>() else {
                return Ok(None);
            };
            let since = stored_messages::request_start(request);
            users
                .session_user_since(id.value(), since)
                .await
                .map_err(|e| {
                    log::error!("reference app: reading a session failed: {}", report(&e));
                    SessionUnreadable
                })
        })
        .await
        .as_ref()
        .map(Option::as_ref)
        .map_err(|e| *e)
}

/// As [`request_session_checked`], for callers to whom a session that cannot be read is
/// nobody's (an error page, the CSRF token's binding, which then keeps the cookie's token).
pub(crate) async fn request_session<'r>(request: &'r Request<'_>) -> Option<&'r User> {
    request_session_checked(request).await.ok().flatten()
}

/// Only a safe place to go back to after login: a site-relative path.
pub fn safe_next(next: &str) -> String {
    stored_messages::local_path(next).unwrap_or_else(|| "/".to_string())
}

#[derive(Debug, FromForm)]
struct LoginForm<'r> {
    #[field(validate = len(1..=64))]
    username: &'r str,
    // Bytes: 1,024 characters of up to 4 bytes each (see `MAX_PASSWORD_CHARS`).
    #[field(validate = len(1..=4096))]
    password: &'r str,
    next: Option<&'r str>,
}

// Redirect is large, but a handler's result is built once per request.
#[allow(clippy::result_large_err)]
#[get("/login?<next>")]
async fn login_page(
    user: Option<CurrentUser>,
    next: Option<&str>,
    jar: &CookieJar<'_>,
    users: &State<Arc<Users>>,
    messages: Messages<'_>,
) -> Result<Page, Redirect> {
    let next = safe_next(next.unwrap_or("/"));
    if user.is_some() {
        return Err(Redirect::to(next));
    }
    // A session cookie whose session is gone: logged out elsewhere (another device, a
    // password change, an admin) or expired. Say so, and forget the cookie; but not when
    // the database could not answer (the session may well be alive).
    let ended = match jar.get_private(SESSION_COOKIE) {
        Some(cookie) => matches!(users.session_user(cookie.value()).await, Ok(None)),
        None => false,
    };
    if ended {
        jar.remove_private(Cookie::build(SESSION_COOKIE).path("/"));
    }
    let notice = if ended {
        "Your session has ended (it expired, or you were logged out elsewhere). Please log in again."
    } else {
        ""
    };
    Ok(Page::render(
        "auth/login",
        context! { messages: messages.flash(), here: "login", next, username: "", error: "", notice },
    ))
}

/// Why a login did not log in: the form again (with its error and status), or the form with
/// `Retry-After` while the throttle holds this login back.
#[derive(Responder)]
enum Refused {
    Form(Page),
    Wait(Page, Header<'static>),
}

#[allow(clippy::too_many_arguments)]
#[post("/login", data = "<form>")]
async fn login(
    form: Form<Contextual<'_, LoginForm<'_>>>,
    users: &State<Arc<Users>>,
    throttle: &State<LoginThrottle>,
    lifetime: &State<SessionLifetime>,
    store: &State<Store>,
    address: Option<IpAddr>,
    jar: &CookieJar<'_>,
    messages: Messages<'_>,
) -> Result<Redirect, Refused> {
    let raw_name = form
        .context
        .field_value("username")
        .unwrap_or("")
        .to_string();
    let next = safe_next(form.context.field_value("next").unwrap_or("/"));
    let failed = |status: Status, error: &str| {
        Page::render(
            "auth/login",
            context! { messages: messages.flash(), here: "login", next: &next, username: &raw_name, error },
        )
        .status(status)
    };
    let Some(input) = &form.value else {
        let entered = |name: &str| {
            form.context
                .field_value(name)
                .is_some_and(|v| !v.is_empty())
        };
        // Both entered, but longer than any username or password can be: no account has
        // them, which is what a wrong password is told (and such a login can never succeed,
        // so there is nothing to throttle).
        if entered("username") && entered("password") {
            return Err(Refused::Form(failed(
                Status::Unauthorized,
                "Unknown username or wrong password.",
            )));
        }
        return Err(Refused::Form(failed(
            Status::UnprocessableEntity,
            "Enter a username and a password.",
        )));
    };
    let wait = |wait: Duration| {
        let seconds = wait.as_secs().max(1);
        let page = failed(
            Status::TooManyRequests,
            &format!("Too many failed attempts: try again in {seconds} s."),
        );
        Refused::Wait(page, Header::new("Retry-After", seconds.to_string()))
    };
    if let Some(left) = throttle.locked(input.username, address) {
        return Err(wait(left));
    }
    let Some(permit) = throttle.check_permit().await else {
        return Err(Refused::Wait(
            failed(
                Status::ServiceUnavailable,
                "Too many logins at once: try again in a moment.",
            ),
            Header::new("Retry-After", "1"),
        ));
    };
    // Checked again with the permit: attempts queued behind it while the failures that
    // lock this login out were recorded must not be checked any more.
    if let Some(left) = throttle.locked(input.username, address) {
        return Err(wait(left));
    }
    let verified = users.verify(input.username, input.password).await;
    drop(permit);
    match verified {
        Ok(Some(user)) => {
            throttle.succeeded(input.username, address);
            let session = match users.start_session(user.id, lifetime.0).await {
                Ok(id) => id,
                Err(e) => {
                    log::error!("reference app: starting a session failed: {}", report(&e));
                    return Err(Refused::Form(failed(
                        Status::ServiceUnavailable,
                        "Logging in is unavailable right now, try again shortly.",
                    )));
                }
            };
            let max_age = rocket::time::Duration::seconds(
                i64::try_from(lifetime.0.as_secs()).unwrap_or(i64::MAX),
            );
            let cookie = Cookie::build((SESSION_COOKIE, session))
                .path("/")
                .same_site(SameSite::Lax)
                .http_only(true)
                .max_age(max_age);
            if store.config().secure_cookies {
                jar.add_private(cookie.secure(true));
            } else {
                jar.add_private(cookie);
            }
            // The CSRF token is bound to the session (`AppHost::session_key`): the next page
            // gets a new one, and one from before the login is worth nothing after it.
            Ok(Redirect::to(safe_next(input.next.unwrap_or("/"))))
        }
        Ok(None) => match throttle.failed(input.username, address) {
            Some(locked) => Err(wait(locked)),
            None => Err(Refused::Form(failed(
                Status::Unauthorized,
                "Unknown username or wrong password.",
            ))),
        },
        Err(e) => {
            log::error!("reference app: login failed: {}", report(&e));
            Err(Refused::Form(failed(
                Status::ServiceUnavailable,
                "Logging in is unavailable right now, try again shortly.",
            )))
        }
    }
}

/// Where logging out goes, with its notice: through the message stream, or, when the message
/// store does not answer (Redis down while the users' database answers), in Rocket's own
/// flash cookie, which the stream shows once it can.
#[derive(Responder)]
enum LoggedOut {
    Plain(Redirect),
    Flashed(Flash<Redirect>),
}

/// Says `text` at `kind` ("success", "warning", "error" or "info") on the way to `to`.
async fn say(
    messages: Option<&Messages<'_>>,
    kind: &str,
    text: &str,
    to: &'static str,
) -> LoggedOut {
    let Some(messages) = messages else {
        return LoggedOut::Flashed(Flash::new(Redirect::to(to), kind, text));
    };
    let _ = match kind {
        "warning" => messages.warning(text).await,
        "error" => messages.error(text).await,
        _ => messages.info(text).await,
    };
    LoggedOut::Plain(Redirect::to(to))
}

/// Logging out needs only the users' database: the message store (the guard, for the notice)
/// is optional, so a session can end while Redis is down.
#[post("/logout")]
async fn logout(
    jar: &CookieJar<'_>,
    users: &State<Arc<Users>>,
    user: Option<CurrentUser>,
    messages: Option<Messages<'_>>,
) -> LoggedOut {
    // Ended in the database and announced to every instance, so a copy of the cookie is
    // worth nothing anywhere. If the database did not take it, the session and the cookie
    // stay, so that logging out again can finish it.
    let mut late = false;
    if let (Some(session), Some(user)) = (jar.get_private(SESSION_COOKIE), user) {
        match users.end_session(session.value(), user.0.id).await {
            Ok(()) => {}
            // Ended, and the announcement is being retried (see `Users::end_session`).
            Err(e @ UserError::Announce(_)) => {
                log::error!("reference app: ending a session: {}", report(&e));
                late = true;
            }
            Err(e) => {
                log::error!("reference app: ending a session failed: {}", report(&e));
                let text = "Logging out did not finish on the server. Try again.";
                return say(messages.as_ref(), "error", text, "/").await;
            }
        }
    }
    jar.remove_private(Cookie::build(SESSION_COOKIE).path("/"));
    if late {
        let text = format!("You are logged out. {OTHER_SERVERS_WITHIN_A_MINUTE}");
        say(messages.as_ref(), "warning", &text, "/login").await
    } else {
        say(messages.as_ref(), "info", "You are logged out.", "/login").await
    }
}

#[derive(Debug, FromForm)]
struct PasswordForm<'r> {
    #[field(default = "")]
    current: &'r str,
    #[field(default = "")]
    new: &'r str,
    #[field(default = "")]
    confirm: &'r str,
}

/// One problem of the password form, for the field it is about.
#[derive(Debug, serde::Serialize)]
struct FieldError {
    field: &'static str,
    text: String,
}

fn account_page(
    messages: &Messages<'_>,
    user: &User,
    errors: &[FieldError],
    status: Status,
) -> Page {
    let invalid: std::collections::BTreeMap<&str, &str> =
        errors.iter().map(|e| (e.field, e.text.as_str())).collect();
    let messages = messages.flash();
    Page::render(
        "auth/account",
        context! { messages, here: "account", user, errors, invalid },
    )
    .status(status)
}

#[get("/account")]
fn account(user: CurrentUser, messages: Messages<'_>) -> Page {
    account_page(&messages, &user.0, &[], Status::Ok)
}

#[get("/account", rank = 2)]
fn account_login() -> Redirect {
    Redirect::to("/login?next=/account")
}

/// The address bar shows the form's action after an error: reloading it goes back to the form.
#[get("/account/password")]
fn account_password_page() -> Redirect {
    Redirect::to("/account")
}

/// Changes the logged-in user's password: the current one is checked as a login is (same
/// throttle, same bounded pool of password checks), the new one as for a new user. Every
/// other session of the user ends; this one stays.
#[allow(clippy::too_many_arguments)]
#[post("/account/password", data = "<form>")]
async fn change_password(
    user: CurrentUser,
    form: Form<PasswordForm<'_>>,
    users: &State<Arc<Users>>,
    throttle: &State<LoginThrottle>,
    address: Option<IpAddr>,
    jar: &CookieJar<'_>,
    messages: Messages<'_>,
) -> Result<Redirect, Refused> {
    let user = user.0;
    let refuse = |errors: Vec<FieldError>, status: Status| {
        Refused::Form(account_page(&messages, &user, &errors, status))
    };
    let mut errors = Vec::new();
    if form.current.is_empty() {
        errors.push(FieldError {
            field: "current",
            text: "Enter your current password.".into(),
        });
    }
    if let Err(e) = crate::users::check_password(&user.username, form.new) {
        errors.push(FieldError {
            field: "new",
            text: capitalize(&e.to_string()),
        });
    } else if form.new == form.current {
        errors.push(FieldError {
            field: "new",
            text: "The new password must differ from the current one.".into(),
        });
    }
    // Said with the new password's own error, so that every error shows at once.
    if form.new != form.confirm {
        errors.push(FieldError {
            field: "confirm",
            text: "The two new passwords differ.".into(),
        });
    }
    // Without a current password there is nothing to check it against; otherwise it is
    // checked even when the new one was refused, so that every error shows at once.
    if form.current.is_empty() {
        return Err(refuse(errors, Status::UnprocessableEntity));
    }
    let wait = |left: Duration| {
        let seconds = left.as_secs().max(1);
        let error = FieldError {
            field: "current",
            text: format!("Too many wrong passwords: try again in {seconds} s."),
        };
        Refused::Wait(
            account_page(&messages, &user, &[error], Status::TooManyRequests),
            Header::new("Retry-After", seconds.to_string()),
        )
    };
    if let Some(left) = throttle.locked(&user.username, address) {
        return Err(wait(left));
    }
    let Some(permit) = throttle.check_permit().await else {
        let error = FieldError {
            field: "current",
            text: "Too many password checks at once: try again in a moment.".into(),
        };
        return Err(Refused::Wait(
            account_page(&messages, &user, &[error], Status::ServiceUnavailable),
            Header::new("Retry-After", "1"),
        ));
    };
    if let Some(left) = throttle.locked(&user.username, address) {
        return Err(wait(left));
    }
    let unavailable = |e: &crate::users::UserError| {
        log::error!("reference app: changing a password failed: {}", report(e));
        let error = FieldError {
            field: "current",
            text: "Changing passwords is unavailable right now, try again shortly.".into(),
        };
        Refused::Form(account_page(
            &messages,
            &user,
            &[error],
            Status::ServiceUnavailable,
        ))
    };
    match users.verify(&user.username, form.current).await {
        Ok(Some(checked)) if checked.id == user.id => {}
        Ok(_) => {
            drop(permit);
            if let Some(left) = throttle.failed(&user.username, address) {
                return Err(wait(left));
            }
            errors.insert(
                0,
                FieldError {
                    field: "current",
                    text: "The current password is wrong.".into(),
                },
            );
            return Err(refuse(errors, Status::UnprocessableEntity));
        }
        Err(e) => return Err(unavailable(&e)),
    }
    throttle.succeeded(&user.username, address);
    if !errors.is_empty() {
        return Err(refuse(errors, Status::UnprocessableEntity));
    }
    let session = jar
        .get_private(SESSION_COOKIE)
        .map(|c| c.value().to_string());
    let ended = users
        .change_password(&user, form.new, session.as_deref())
        .await;
    drop(permit);
    match ended {
        Ok(ended) => {
            let text = match ended {
                0 => "Your password was changed.".to_string(),
                1 => "Your password was changed, and your 1 other session was logged out.".into(),
                n => format!(
                    "Your password was changed, and your {n} other sessions were logged out."
                ),
            };
            let _ = messages.success(&text).await;
            Ok(Redirect::to("/account"))
        }
        // The password changed and the other sessions ended; only telling the other
        // instances is still being retried.
        Err(e @ UserError::Announce(_)) => {
            log::error!("reference app: changing a password: {}", report(&e));
            let text = format!(
                "Your password was changed and your other sessions ended. \
                 {OTHER_SERVERS_WITHIN_A_MINUTE}"
            );
            let _ = messages.warning(&text).await;
            Ok(Redirect::to("/account"))
        }
        Err(e @ UserError::Backend(_)) => Err(unavailable(&e)),
        Err(e) => Err(refuse(
            vec![FieldError {
                field: "new",
                text: capitalize(&e.to_string()),
            }],
            Status::UnprocessableEntity,
        )),
    }
}

/// `text` with its first letter in upper case (error texts start in lower case).
fn capitalize(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Login, logout and the account page.
pub fn routes() -> Vec<Route> {
    routes![
        login_page,
        login,
        logout,
        account,
        account_login,
        account_password_page,
        change_password
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stays_on_the_site() {
        assert_eq!(safe_next("/admin"), "/admin");
        assert_eq!(safe_next("//evil.example"), "/");
        assert_eq!(safe_next("https://evil.example"), "/");
        assert_eq!(safe_next("/\\evil"), "/");
        assert_eq!(safe_next(""), "/");
    }
}
