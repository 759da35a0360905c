//! Login, logout and the guards that tell pages who is logged in.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rocket::form::{Contextual, Form};
use rocket::http::{Cookie, CookieJar, Header, SameSite, Status};
use rocket::request::{FromRequest, Outcome};
use rocket::response::Redirect;
use rocket::{Request, Route, State};
use rocket_dyn_templates::context;

use crate::throttle::LoginThrottle;
use crate::users::{User, Users, SESSION_COOKIE};
use stored_messages::report;
use stored_messages::template::Page;
use stored_messages::{CsrfToken, Messages, Store};

/// The logged-in user: the session the private session cookie names, if it has neither
/// ended (logout, `stored-messages endsessions`) nor expired. Forwards with 401 for anonymous
/// visitors, so a lower-ranked route (or the 401 catcher) can send them to the login page.
/// Admin pages check the admin flag in the database (`AdminUser`).
#[derive(Debug, Clone)]
pub struct CurrentUser(pub User);

#[rocket::async_trait]
impl<'r> FromRequest<'r> for CurrentUser {
    type Error = Status;

    async fn from_request(request: &'r Request<'_>) -> Outcome<Self, Status> {
        match request_session(request).await {
            Some(user) => Outcome::Success(CurrentUser(user.clone())),
            None => Outcome::Forward(Status::Unauthorized),
        }
    }
}

/// How long a session lasts (`app.session_days`, default 14).
#[derive(Debug, Clone, Copy)]
pub struct SessionLifetime(pub Duration);

/// Sessions last this many days unless `app.session_days` says otherwise.
pub const DEFAULT_SESSION_DAYS: u64 = 14;

/// The request's session user, looked up once per request (one indexed query; an ended or
/// expired session is nobody). If the users database cannot answer, nobody is logged in for
/// this request (and it is logged).
pub(crate) async fn request_session<'r>(request: &'r Request<'_>) -> Option<&'r User> {
    request
        .local_cache_async(async {
            let id = request.cookies().get_private(SESSION_COOKIE)?;
            let users = request.rocket().state::<Arc<Users>>()?;
            match users.session_user(id.value()).await {
                Ok(user) => user,
                Err(e) => {
                    log::error!("reference app: reading a session failed: {}", report(&e));
                    None
                }
            }
        })
        .await
        .as_ref()
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
fn login_page(
    user: Option<CurrentUser>,
    next: Option<&str>,
    messages: Messages<'_>,
) -> Result<Page, Redirect> {
    let next = safe_next(next.unwrap_or("/"));
    if user.is_some() {
        return Err(Redirect::to(next));
    }
    Ok(Page::render(
        "auth/login",
        context! { messages: &messages, next, username: "", error: "" },
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
            context! { messages: &messages, next: &next, username: &raw_name, error },
        )
        .status(status)
    };
    let Some(input) = &form.value else {
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
            // A token from before the login is worth nothing after it.
            CsrfToken::renew(jar);
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

#[post("/logout")]
async fn logout(
    jar: &CookieJar<'_>,
    users: &State<Arc<Users>>,
    messages: Messages<'_>,
) -> Redirect {
    // Ended in the database, so a copy of the cookie is worth nothing on any instance.
    if let Some(session) = jar.get_private(SESSION_COOKIE) {
        if let Err(e) = users.end_session(session.value()).await {
            log::error!("reference app: ending a session failed: {}", report(&e));
        }
    }
    jar.remove_private(Cookie::build(SESSION_COOKIE).path("/"));
    CsrfToken::renew(jar);
    let _ = messages.info("You are logged out.").await;
    Redirect::to("/login")
}

/// Login and logout.
pub fn routes() -> Vec<Route> {
    routes![login_page, login, logout]
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
