//! CSRF protection for every state-changing request (POST, PUT, PATCH, DELETE).
//!
//! Each browser gets a random token in a private cookie (`sm_csrf`). The fairing checks every
//! state-changing request of the application, the host's routes as well as the library's,
//! before routing: the request must carry the same token
//!
//! - in the `X-CSRF-Token` header (scripts, the JSON API), or
//! - as the `csrf_token` field of a form, urlencoded or `multipart/form-data`, within the
//!   first 512 bytes of the body. That is all of a body a Rocket fairing can see
//!   ([`rocket::data::Data::peek`]); a form that puts the hidden field first always meets it.
//!
//! The token is bound to the session ([`crate::Host::session_key`], by default the current
//! user): the cookie records what it was issued for, and a request of another session gets
//! a new token instead, so a token issued to someone else (a cookie planted from a sibling
//! subdomain) passes nowhere but in that someone's session, and tokens change at login and
//! logout by themselves.
//!
//! A request whose `Origin` names another site than its `Host`, or that the browser marks
//! `Sec-Fetch-Site: cross-site`, is refused whatever its token (browsers send `Origin` with every POST; behind a proxy, pass `Host` on with its
//! port, nginx's `proxy_set_header Host $http_host`).
//!
//! A request without a valid token is rerouted, before any handler runs, to a route that
//! answers 403 (JSON under the API's base, the host's 403 catcher elsewhere): no handler can
//! forget the check, and nothing changes. Safe methods (GET, HEAD, OPTIONS) are never checked.
//!
//! Where that does not fit:
//! - **Paths the host exempts** ([`crate::StoredMessages::csrf_exempt`]: a webhook, a route
//!   authenticated by a signature) are not checked by the fairing. A route there that serves
//!   a browser form whose token may come anywhere in the body takes [`CsrfForm`] instead of
//!   Rocket's `Form`: it reads the whole form (up to the configured form limits) and answers
//!   403 unless its `csrf_token` field matches.
//! - **[`crate::StoredMessages::without_csrf`]** turns the check off entirely. The host must
//!   then protect every state-changing route of its own *and* the library's API
//!   (`POST <api>/inbox/<id>/read`, `POST <api>/mark_all_read`) itself, for instance with
//!   `SameSite=Strict` session cookies and an `Origin` check.
//!
//! Templates get the token from `{{ csrf_token() }}` (see [`crate::template`]); handlers
//! from the [`CsrfToken`] guard.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use rocket::data::Data;
use rocket::http::{Cookie, Method, Status};
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
/// Where rejected JSON API requests are rerouted, below the API's base (so the API's JSON
/// catchers answer).
pub const API_REJECTED: &str = "/__csrf-rejected";

/// What the fairing checks: everything state-changing but the exempt paths.
#[derive(Debug, Clone, Default)]
pub(crate) struct Policy {
    /// Where the API is mounted, if it is.
    pub(crate) api: Option<String>,
    /// Paths (and everything below them) the fairing does not check.
    pub(crate) exempt: Vec<String>,
}

/// The request's CSRF token (created on the request's way in when the browser had none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrfToken(pub String);

impl CsrfToken {
    /// The token text, for a hidden form field or a meta tag.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Drops this browser's token; its next page gets a new one. The token already changes
    /// whenever the session does (see [`crate::Host::session_key`]); this is for a host
    /// that wants a new one at some other moment. Answer such a request with a redirect: a
    /// page rendered in the same request would still print the old token.
    pub fn renew(jar: &rocket::http::CookieJar<'_>) {
        jar.remove_private(Cookie::build(CSRF_COOKIE).path("/"));
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

/// What the token of `request` is bound to: the host's session key, or else the current
/// user (`None` for an anonymous visitor). `Err` when the host cannot tell who the user is.
async fn binding(request: &Request<'_>) -> Result<Option<String>, crate::host::Unidentified> {
    let Some(store) = request.rocket().state::<crate::Store>() else {
        return Ok(None);
    };
    Ok(match store.host().session_key(request).await {
        Some(key) => Some(format!("s:{key}")),
        None => crate::host::current_user(request, store.host())
            .await?
            .map(|user| format!("u:{user}")),
    })
}

/// Splits a cookie value, `<token>` or `<token>.<binding>`.
fn parse_cookie(value: &str) -> Option<(&str, Option<&str>)> {
    let (token, binding) = match value.split_once('.') {
        Some((token, binding)) => (token, Some(binding)),
        None => (value, None),
    };
    (token.len() == 43).then_some((token, binding))
}

/// The token of this request, bound to its session (see [`crate::Host::session_key`]): the
/// cookie's when it was issued for this session, else a new one (set as a cookie). Resolved
/// once per request, by the fairing on the request's way in (before any handler, so the
/// cookie can still be set).
pub(crate) async fn resolve_token(request: &Request<'_>) -> String {
    if let Some(token) = slot(request).get() {
        return token.clone();
    }
    let binding = binding(request).await;
    slot(request)
        .get_or_init(|| {
            let jar = request.cookies();
            let existing = jar.get_private(CSRF_COOKIE).and_then(|c| {
                let (token, bound) = parse_cookie(c.value())?;
                // When the host cannot tell whose session this is (its store does not
                // answer), the cookie's token is kept as it is: replacing it would break
                // every open page of the session once the store is back. The request
                // itself gets 503 wherever it needs the user.
                let kept = match &binding {
                    Ok(binding) => bound == binding.as_deref(),
                    Err(_) => true,
                };
                kept.then(|| token.to_string())
            });
            existing.unwrap_or_else(|| {
                let token = new_token();
                let value = match &binding {
                    Ok(Some(binding)) => format!("{token}.{binding}"),
                    Ok(None) | Err(_) => token.clone(),
                };
                set_cookie(request, value);
                token
            })
        })
        .clone()
}

/// Where a request keeps its token once resolved.
#[derive(Default)]
struct TokenSlot(std::sync::OnceLock<String>);

fn slot<'a>(request: &'a Request<'_>) -> &'a std::sync::OnceLock<String> {
    &request.local_cache(TokenSlot::default).0
}

/// The token of this request where no `await` is possible (rendering): the one resolved on
/// the request's way in. Without the fairing's check (`without_csrf`, API paths) it is the
/// cookie's token, or a new unbound one.
pub(crate) fn ensure_token(request: &Request<'_>) -> String {
    slot(request)
        .get_or_init(|| {
            let jar = request.cookies();
            let existing = jar
                .get_private(CSRF_COOKIE)
                .and_then(|c| parse_cookie(c.value()).map(|(token, _)| token.to_string()));
            existing.unwrap_or_else(|| {
                let token = new_token();
                set_cookie(request, token.clone());
                token
            })
        })
        .clone()
}

fn set_cookie(request: &Request<'_>, value: String) {
    let secure = request
        .rocket()
        .state::<crate::Store>()
        .is_some_and(|store| store.config().secure_cookies);
    let mut cookie = crate::request::library_cookie(CSRF_COOKIE, value, secure);
    // It must outlive the session it is bound to, whatever the host's session lifetime:
    // Rocket's default for a private cookie (a week) would end it first, and every open
    // page of a still live session would then fail its forms. Bound to the session, a
    // token is worth nothing without it, so it may last as long as browsers keep cookies.
    cookie.set_expires(rocket::time::OffsetDateTime::now_utc() + CSRF_COOKIE_LIFETIME);
    request.cookies().add_private(cookie);
}

/// How long the CSRF cookie lasts: 400 days, the most browsers keep a cookie.
const CSRF_COOKIE_LIFETIME: rocket::time::Duration = rocket::time::Duration::days(400);

#[rocket::async_trait]
impl<'r> FromRequest<'r> for CsrfToken {
    type Error = std::convert::Infallible;

    async fn from_request(request: &'r Request<'_>) -> Outcome<Self, Self::Error> {
        Outcome::Success(CsrfToken(resolve_token(request).await))
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
    form_field(peeked, CSRF_FIELD, true)
}

/// The raw (still urlencoded) value of field `name` among the first bytes of a urlencoded
/// body. Unless `complete` (the whole body is in `peeked`), the last field may be cut, so it
/// is not taken.
pub(crate) fn form_field(peeked: &[u8], name: &str, complete: bool) -> Option<String> {
    let text = String::from_utf8_lossy(peeked);
    let mut pairs = text.split('&').peekable();
    while let Some(pair) = pairs.next() {
        let whole = complete || pairs.peek().is_some();
        if let Some((key, value)) = pair.split_once('=') {
            if key == name && whole {
                return Some(value.to_string());
            }
        }
    }
    None
}

/// The `csrf_token` part among the first bytes of a `multipart/form-data` body with
/// `boundary`, when the part is there complete.
fn multipart_token(peeked: &[u8], boundary: &str) -> Option<String> {
    let text = String::from_utf8_lossy(peeked);
    let delimiter = format!("--{boundary}");
    text.split(delimiter.as_str()).skip(1).find_map(|part| {
        // A complete part: CRLF, headers, a blank line, the value, CRLF (then the next
        // delimiter, which `split` removed). The last piece of a cut body has no final CRLF.
        let (headers, value) = part.strip_prefix("\r\n")?.split_once("\r\n\r\n")?;
        let value = value.strip_suffix("\r\n")?;
        headers
            .split("\r\n")
            .any(names_token)
            .then(|| value.to_string())
    })
}

/// Whether a part header is `Content-Disposition: form-data; name="csrf_token"`.
fn names_token(header: &str) -> bool {
    let Some((name, value)) = header.split_once(':') else {
        return false;
    };
    if !name.trim().eq_ignore_ascii_case("content-disposition") {
        return false;
    }
    let mut params = value.split(';').map(str::trim);
    params
        .next()
        .is_some_and(|kind| kind.eq_ignore_ascii_case("form-data"))
        && params.any(|param| {
            param.split_once('=').is_some_and(|(key, value)| {
                key.trim().eq_ignore_ascii_case("name")
                    && value.trim().trim_matches('"') == CSRF_FIELD
            })
        })
}

/// Whether `path` is `prefix` or below it.
pub(crate) fn is_below(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Checks the request's token; reroutes it to a 403 route when it is missing or wrong.
/// Called by the fairing's `on_request`.
pub(crate) async fn check(request: &mut Request<'_>, data: &mut Data<'_>, policy: &Policy) {
    let path = request.uri().path().as_str();
    let in_api = policy.api.as_deref().is_some_and(|api| is_below(path, api));
    let exempt = policy.exempt.iter().any(|prefix| is_below(path, prefix));
    if !is_state_changing(request.method()) {
        // Safe requests are not checked. Those for pages get their token now, while its
        // cookie can still be set: a page rendered with plain `Template::render` prints it
        // only after the response's cookies were fixed. Resolving it asks the host who the
        // session is, so JSON API reads (which never need one) and exempt paths (static
        // files, health checks) skip it.
        if !in_api && !exempt {
            resolve_token(request).await;
        }
        return;
    }
    if exempt {
        return;
    }
    let expected = resolve_token(request).await;
    if cross_origin(request) {
        log::info!(
            "stored-messages: {} {} refused: sent from another site ({})",
            request.method(),
            request.uri().path(),
            request.headers().get_one("Origin").unwrap_or("")
        );
        reject(request, policy, in_api);
        return;
    }
    let mut sent = request.headers().get_one(CSRF_HEADER).map(str::to_string);
    if sent.is_none() {
        if let Some(content_type) = request.content_type() {
            if content_type.is_form() {
                let peeked = data.peek(PEEK).await;
                sent = form_token(peeked);
                if in_api {
                    let complete = data.peek_complete();
                    crate::api::remember_next(request, data.peek(PEEK).await, complete);
                }
            } else if content_type.is_form_data() {
                if let Some(boundary) = content_type.param("boundary").map(str::to_string) {
                    sent = multipart_token(data.peek(PEEK).await, &boundary);
                }
            }
        }
    }
    if sent.is_some_and(|t| same(&t, &expected)) {
        return;
    }
    log::info!(
        "stored-messages: {} {} refused: missing or invalid CSRF token",
        request.method(),
        request.uri().path()
    );
    reject(request, policy, in_api);
}

/// Reroutes `request` to the 403 route of its side: the API's (a JSON error), or the host's
/// (its own 403 page). A plain HTML form posted to the API (the message list's buttons
/// without JavaScript) is a page's, so it gets the host's page: a browser shows JSON as text.
fn reject(request: &mut Request<'_>, policy: &Policy, in_api: bool) {
    let target = match policy.api.as_deref() {
        Some(api) if in_api && !is_page_form(request) => format!("{api}{API_REJECTED}"),
        _ => REJECTED_PATH.to_string(),
    };
    request.local_cache(|| CsrfRejected(true));
    if let Ok(uri) = rocket::http::uri::Origin::parse_owned(target) {
        request.set_uri(uri);
    }
}

/// Whether `request` is a browser submitting an HTML form as a page would: a urlencoded body,
/// and a navigation (`Sec-Fetch-Mode: navigate`, or without that header, an `Accept` that
/// asks for HTML). Scripts that post forms with `fetch` are not navigations.
pub(crate) fn is_page_form(request: &Request<'_>) -> bool {
    if !request.content_type().is_some_and(|ct| ct.is_form()) {
        return false;
    }
    match request.headers().get_one("Sec-Fetch-Mode") {
        Some(mode) => mode.eq_ignore_ascii_case("navigate"),
        None => request
            .headers()
            .get_one("Accept")
            .is_some_and(|accept| accept.contains("text/html")),
    }
}

/// Whether the request says it comes from another site: `Sec-Fetch-Site: cross-site`; or
/// browsers send `Origin` with every
/// cross-site POST (and with same-site ones), so an `Origin` whose host and port differ from
/// the `Host` the request was sent to, or the opaque `null`, is refused even with a valid
/// token. Without either header (old clients, scripts) the token alone decides. Behind a
/// proxy, the proxy must pass the browser's `Host` on, port included (nginx:
/// `proxy_set_header Host $http_host`).
fn cross_origin(request: &Request<'_>) -> bool {
    // Browsers say so themselves; a site's own pages send `same-origin` (or `none` when the
    // user typed the address).
    if request
        .headers()
        .get_one("Sec-Fetch-Site")
        .is_some_and(|site| site.eq_ignore_ascii_case("cross-site"))
    {
        return true;
    }
    // `Host` in HTTP/1.1, `:authority` in HTTP/2: Rocket reads either into `host()`
    // (a request built in code may only have the header).
    let host = request
        .host()
        .map(|host| host.to_string())
        .or_else(|| request.headers().get_one("Host").map(str::to_string));
    let (Some(origin), Some(host)) = (request.headers().get_one("Origin"), host.as_deref()) else {
        return false;
    };
    let Ok(origin) = url::Url::parse(origin) else {
        // `null` (a sandboxed frame, a privacy-sensitive redirect) or garbage.
        return true;
    };
    let (Some(origin_host), Some(origin_port)) =
        (origin.host_str(), origin.port_or_known_default())
    else {
        return true;
    };
    // `Host` is `name` or `name:port` (`[v6]:port` for IPv6); no port means the origin
    // scheme's default.
    let (host_name, host_port) = match host.rsplit_once(':') {
        Some((name, port)) if !port.contains(']') => (name, port.parse().ok()),
        _ => (host, None),
    };
    let default_port = match origin.scheme() {
        "https" => 443,
        _ => 80,
    };
    let host_port = host_port.unwrap_or(default_port);
    !(host_name.eq_ignore_ascii_case(origin_host) && host_port == origin_port)
}

/// How much of a body the fairing can see (Rocket's peek buffer holds at most 512 bytes).
const PEEK: usize = 512;

/// Answers every rerouted request with 403 (through the catchers of its base).
#[derive(Clone)]
struct Rejected;

#[rocket::async_trait]
impl Handler for Rejected {
    async fn handle<'r>(&self, _request: &'r Request<'_>, _data: Data<'r>) -> RouteOutcome<'r> {
        RouteOutcome::Error(Status::Forbidden)
    }
}

/// The 403 routes for rerouted requests, one per state-changing method, at `path`.
pub(crate) fn routes_at(path: &str) -> Vec<Route> {
    [Method::Post, Method::Put, Method::Patch, Method::Delete]
        .into_iter()
        .map(|method| Route::ranked(-100, method, path, Rejected))
        .collect()
}

/// The 403 routes of rerouted requests outside the API, to mount at `/`.
pub(crate) fn routes() -> Vec<Route> {
    routes_at(REJECTED_PATH)
}

/// Whether this request was refused for its CSRF token (for catchers to explain why).
pub fn was_rejected(request: &Request<'_>) -> bool {
    request.local_cache(|| CsrfRejected(false)).0
}

/// A form whose `csrf_token` field is checked wherever it is in the body, up to Rocket's
/// form limits: the data guard for a route on a path exempt from the fairing's check
/// ([`crate::StoredMessages::csrf_exempt`]) that serves browser forms (a large upload whose
/// token field comes after the file). Use it as Rocket's `Form`:
///
/// ```
/// # use rocket::post;
/// use rocket::fs::TempFile;
/// use stored_messages::csrf::CsrfForm;
///
/// #[derive(rocket::FromForm)]
/// struct Upload<'r> {
///     title: &'r str,
///     file: TempFile<'r>,
/// }
///
/// #[post("/uploads", data = "<upload>")]
/// fn upload(upload: CsrfForm<Upload<'_>>) -> String {
///     format!("{} ({} bytes)", upload.title, upload.file.len())
/// }
/// ```
///
/// A missing or wrong token fails the guard with 403 (the host's catcher answers); the
/// `csrf_token` field is not passed on to `T`.
#[derive(Debug)]
pub struct CsrfForm<T>(pub T);

impl<T> CsrfForm<T> {
    /// The form.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> std::ops::Deref for CsrfForm<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> std::ops::DerefMut for CsrfForm<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

/// `T` with the `csrf_token` field taken out.
struct WithToken<T> {
    token: Option<String>,
    form: T,
}

/// The parsing state of [`WithToken`].
struct WithTokenContext<'r, T: rocket::form::FromForm<'r>> {
    token: Option<String>,
    form: T::Context,
}

#[rocket::async_trait]
impl<'r, T: rocket::form::FromForm<'r>> rocket::form::FromForm<'r> for WithToken<T> {
    type Context = WithTokenContext<'r, T>;

    fn init(options: rocket::form::Options) -> Self::Context {
        WithTokenContext {
            token: None,
            form: T::init(options),
        }
    }

    fn push_value(context: &mut Self::Context, field: rocket::form::ValueField<'r>) {
        if field.name == CSRF_FIELD {
            context.token = Some(field.value.to_string());
        } else {
            T::push_value(&mut context.form, field);
        }
    }

    async fn push_data(context: &mut Self::Context, field: rocket::form::DataField<'r, '_>) {
        T::push_data(&mut context.form, field).await;
    }

    fn finalize(context: Self::Context) -> rocket::form::Result<'r, Self> {
        Ok(WithToken {
            token: context.token,
            form: T::finalize(context.form)?,
        })
    }
}

#[rocket::async_trait]
impl<'r, T: rocket::form::FromForm<'r>> rocket::data::FromData<'r> for CsrfForm<T> {
    type Error = rocket::form::Errors<'r>;

    async fn from_data(
        request: &'r Request<'_>,
        data: Data<'r>,
    ) -> rocket::data::Outcome<'r, Self> {
        use rocket::data::Outcome as DataOutcome;
        let expected = resolve_token(request).await;
        match rocket::form::Form::<WithToken<T>>::from_data(request, data).await {
            DataOutcome::Success(form) => {
                let form = form.into_inner();
                if form.token.is_some_and(|t| same(&t, &expected)) {
                    DataOutcome::Success(CsrfForm(form.form))
                } else {
                    log::info!(
                        "stored-messages: {} {} refused: missing or invalid CSRF token",
                        request.method(),
                        request.uri().path()
                    );
                    request.local_cache(|| CsrfRejected(true));
                    DataOutcome::Error((
                        Status::Forbidden,
                        rocket::form::Error::validation("missing or invalid CSRF token").into(),
                    ))
                }
            }
            DataOutcome::Error(e) => DataOutcome::Error(e),
            DataOutcome::Forward(f) => DataOutcome::Forward(f),
        }
    }
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
    fn multipart_tokens_are_found_in_complete_parts() {
        let body = "--XyZ\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nhi\r\n\
                    --XyZ\r\ncontent-disposition: form-data; name=csrf_token\r\n\r\nabc\r\n\
                    --XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n";
        assert_eq!(
            multipart_token(body.as_bytes(), "XyZ").as_deref(),
            Some("abc")
        );
        // Cut inside the token's part: no value is trusted.
        let cut = "--XyZ\r\nContent-Disposition: form-data; name=\"csrf_token\"\r\n\r\nab";
        assert_eq!(multipart_token(cut.as_bytes(), "XyZ"), None);
        // A file named csrf_token is not the field.
        let other =
            "--XyZ\r\nContent-Disposition: form-data; name=\"csrf_tokens\"\r\n\r\nabc\r\n--XyZ--";
        assert_eq!(multipart_token(other.as_bytes(), "XyZ"), None);
    }

    #[test]
    fn exempt_paths_cover_what_is_below_them_only() {
        assert!(is_below("/hooks", "/hooks"));
        assert!(is_below("/hooks/github", "/hooks/"));
        assert!(!is_below("/hooksmith", "/hooks"));
        assert!(is_below("/anything", "/"));
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
