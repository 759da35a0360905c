//! CSRF protection for every state-changing request (POST, PUT, PATCH, DELETE).
//!
//! Each browser gets a random token in a private cookie. A state-changing request must
//! carry the same token, either in the `X-CSRF-Token` header (scripts, the JSON API) or as
//! the `csrf_token` field of a urlencoded form, within its first 512 bytes (forms put it
//! first). A request without a valid token is rerouted before any handler runs to a route
//! that answers 403, so no handler can forget the check and nothing changes.
//!
//! Templates get the token from `{{ csrf_token() }}` (see [`crate::template`]); handlers
//! from the [`CsrfToken`] guard.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use rocket::data::Data;
use rocket::http::{Cookie, Method, SameSite, Status};
use rocket::request::{FromRequest, Outcome};
use rocket::route::{Handler, Outcome as RouteOutcome, Route};
use rocket::Request;

/// The private cookie holding the token.
pub const CSRF_COOKIE: &str = "sm_csrf";
/// The header scripts send the token in.
pub const CSRF_HEADER: &str = "X-CSRF-Token";
/// The form field forms send the token in.
pub const CSRF_FIELD: &str = "csrf_token";
/// Where rejected requests outside the JSON API are rerouted.
pub const REJECTED_PATH: &str = "/__stored_messages/csrf-rejected";
/// Where rejected JSON API requests are rerouted (inside `/messages`, so JSON catchers
/// answer).
pub const API_REJECTED_PATH: &str = "/messages/__csrf-rejected";

/// The request's CSRF token (created on the request's way in when the browser had none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrfToken(pub String);

impl CsrfToken {
    /// The token text, for a hidden form field or a meta tag.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Marks a request that was rerouted because its token was missing or wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CsrfRejected(pub bool);

fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The token of this request: from its cookie, or a new one (set as a cookie) when absent.
pub(crate) fn ensure_token(request: &Request<'_>) -> String {
    request
        .local_cache(|| {
            let jar = request.cookies();
            let existing = jar
                .get_private(CSRF_COOKIE)
                .map(|c| c.value().to_string())
                .filter(|t| t.len() == 43);
            CsrfToken(existing.unwrap_or_else(|| {
                let token = new_token();
                let cookie = Cookie::build((CSRF_COOKIE, token.clone()))
                    .path("/")
                    .same_site(SameSite::Lax)
                    .http_only(true);
                jar.add_private(cookie);
                token
            }))
        })
        .0
        .clone()
}

#[rocket::async_trait]
impl<'r> FromRequest<'r> for CsrfToken {
    type Error = std::convert::Infallible;

    async fn from_request(request: &'r Request<'_>) -> Outcome<Self, Self::Error> {
        Outcome::Success(CsrfToken(ensure_token(request)))
    }
}

/// Compares in time independent of where the strings differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn is_state_changing(method: Method) -> bool {
    matches!(
        method,
        Method::Post | Method::Put | Method::Patch | Method::Delete
    )
}

/// The `csrf_token` field among the first bytes of a urlencoded body.
fn form_token(peeked: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(peeked);
    text.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == CSRF_FIELD).then(|| value.to_string())
    })
}

/// Checks the request's token; reroutes it to a 403 route when it is missing or wrong.
/// Called by the fairing's `on_request`.
pub(crate) async fn check(request: &mut Request<'_>, data: &mut Data<'_>) {
    if !is_state_changing(request.method()) {
        // Safe requests are not checked. Those for pages get their token now, while its
        // cookie can still be set: a page rendered with plain `Template::render` prints it
        // only after the response's cookies were fixed. (JSON API reads never need one.)
        if !request.uri().path().starts_with(crate::api::BASE) {
            ensure_token(request);
        }
        return;
    }
    let expected = ensure_token(request);
    let mut sent = request.headers().get_one(CSRF_HEADER).map(str::to_string);
    if sent.is_none() && request.content_type().is_some_and(|ct| ct.is_form()) {
        let peeked = data.peek(512).await;
        sent = form_token(peeked);
    }
    if sent.is_some_and(|t| same(&t, &expected)) {
        return;
    }
    log::info!(
        "stored-messages: {} {} refused: missing or invalid CSRF token",
        request.method(),
        request.uri().path()
    );
    let target = if request.uri().path().starts_with("/messages") {
        API_REJECTED_PATH
    } else {
        REJECTED_PATH
    };
    request.local_cache(|| CsrfRejected(true));
    if let Ok(uri) = rocket::http::uri::Origin::parse(target) {
        request.set_uri(uri);
    }
}

/// Answers every rerouted request with 403 (through the catchers of its base).
#[derive(Clone)]
struct Rejected;

#[rocket::async_trait]
impl Handler for Rejected {
    async fn handle<'r>(&self, _request: &'r Request<'_>, _data: Data<'r>) -> RouteOutcome<'r> {
        RouteOutcome::Error(Status::Forbidden)
    }
}

/// The 403 routes for rerouted requests, one per state-changing method and path.
pub(crate) fn routes() -> Vec<Route> {
    let mut routes = Vec::new();
    for path in [REJECTED_PATH, API_REJECTED_PATH] {
        for method in [Method::Post, Method::Put, Method::Patch, Method::Delete] {
            routes.push(Route::ranked(-100, method, path, Rejected));
        }
    }
    routes
}

/// Whether this request was refused for its CSRF token (for catchers to explain why).
pub fn was_rejected(request: &Request<'_>) -> bool {
    request.local_cache(|| CsrfRejected(false)).0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_tokens_are_found_in_the_body_prefix() {
        assert_eq!(form_token(b"csrf_token=abc&x=1").as_deref(), Some("abc"));
        assert_eq!(form_token(b"x=1&csrf_token=abc").as_deref(), Some("abc"));
        assert_eq!(form_token(b"x=1"), None);
    }

    #[test]
    fn comparison_needs_equal_strings() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
        assert!(!same("", "a"));
    }

    #[test]
    fn tokens_are_43_url_safe_characters() {
        let t = new_token();
        assert_eq!(t.len(), 43);
        assert_ne!(t, new_token());
    }
}
