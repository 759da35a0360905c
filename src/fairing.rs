//! The [`StoredMessages`] fairing: the one call that attaches the library to a Rocket app.
//!
//! - **ignite**: reads and validates `[stored_messages]`, connects the backend, applies its
//!   migrations and manages the [`Store`]; a problem fails launch with a readable reason.
//!   Also mounts the JSON API at its base (`/messages` unless the host chose another or
//!   none, see [`StoredMessages::api_at`]) with its JSON catchers, and the CSRF rejection
//!   routes.
//! - **liftoff**: one summary line, and the periodic cleanup task (ended by shutdown).
//! - **request**: CSRF check of state-changing requests (see [`crate::csrf`]).
//! - **response**: writes the flash spill, marks read exactly the stored messages the
//!   request showed (only when the response succeeded), and fills the markers of template
//!   helpers that could not answer while the page rendered (see [`crate::template`]). When
//!   the store refuses the spill or the marks, the response becomes a 503 that keeps the
//!   browser's flash cookies: a page never says messages were read that were not.

use std::sync::Arc;
use std::time::Duration;

use rocket::data::Data;
use rocket::fairing::{Fairing, Info, Kind};
use rocket::http::{ContentType, Status};
use rocket::{Build, Orbit, Request, Response, Rocket};

use crate::api::ApiBase;
use crate::error::report;
use crate::flash::cookie::{FLASH_COOKIE, SPILL_COOKIE};
use crate::flash::overflow::{spill_lifetime, ANONYMOUS_SPILL_LIFETIME};
use crate::host::Host;
use crate::ops::Store;
use crate::request::{is_named, request_state};
use crate::template;
use crate::{api, csrf};

/// The `Cache-Control` of what belongs to one user or one browser (API answers, pages that
/// loaded the message stream): no cache, shared or private, may keep it.
pub(crate) const PRIVATE: &str = "private, no-store";

/// Attaches stored messages to a Rocket application.
///
/// ```no_run
/// # use stored_messages::{StoredMessages, Host};
/// # fn app(host: impl Host) -> rocket::Rocket<rocket::Build> {
/// rocket::build()
///     .attach(
///         StoredMessages::fairing(host)
///             .api_at("/api/messages") // the JSON API's base; `/messages` by default
///             .csrf_exempt("/hooks"), // paths the CSRF check leaves alone
///     )
///     .attach(stored_messages::template::fairing())
/// # }
/// ```
pub struct StoredMessages {
    host: Arc<dyn Host>,
    store: Option<Store>,
    csrf: bool,
    api: Result<ApiBase, String>,
    exempt: Vec<String>,
}

impl StoredMessages {
    /// The fairing for `host`, with the backend chosen by configuration.
    pub fn fairing(host: impl Host) -> StoredMessages {
        StoredMessages {
            host: Arc::new(host),
            store: None,
            csrf: true,
            api: Ok(ApiBase::default()),
            exempt: Vec::new(),
        }
    }

    /// The fairing over a store built by the caller (a custom backend, a shared store).
    pub fn with_store(store: Store) -> StoredMessages {
        StoredMessages {
            host: Arc::clone(store.host_arc()),
            store: Some(store),
            csrf: true,
            api: Ok(ApiBase::default()),
            exempt: Vec::new(),
        }
    }

    /// Mounts the JSON API at `base` (`/api/messages`) instead of `/messages`. The message
    /// list's buttons, the CSRF check and the API's links follow. A base that is not a plain
    /// path fails launch with the reason.
    pub fn api_at(mut self, base: &str) -> StoredMessages {
        self.api = ApiBase::at(base).map_err(|e| e.to_string());
        self
    }

    /// Leaves the JSON API out. The message list then has no "Mark read" buttons (they post
    /// to the API); everything else works.
    pub fn without_api(mut self) -> StoredMessages {
        self.api = Ok(ApiBase::none());
        self
    }

    /// Exempts `path` and every path below it (`/hooks` covers `/hooks/github`, not
    /// `/hooksmith`) from the CSRF check: for requests that do not come from the app's
    /// pages (webhooks, routes authenticated by a signature), or for a route that checks
    /// its form itself with [`crate::csrf::CsrfForm`]. May be called several times.
    ///
    /// Safe requests below an exempt path do not resolve the session's token either (which
    /// asks the host who the session is): exempt static files and health checks that way.
    /// A page there that prints `csrf_token()` gets the browser's cookie token as it is,
    /// unchecked against the session, so keep pages with forms outside exempt paths.
    pub fn csrf_exempt(mut self, path: &str) -> StoredMessages {
        self.exempt.push(path.to_string());
        self
    }

    /// Turns the built-in CSRF check off. The host must then protect every state-changing
    /// request itself, its own and the JSON API's (see [`crate::csrf`] for what the check
    /// does).
    pub fn without_csrf(mut self) -> StoredMessages {
        self.csrf = false;
        self
    }

    /// The CSRF policy: where the API is and what is exempt.
    fn policy(&self) -> csrf::Policy {
        csrf::Policy {
            api: self
                .api
                .as_ref()
                .ok()
                .and_then(|a| a.get().map(str::to_string)),
            exempt: self.exempt.clone(),
        }
    }
}

#[rocket::async_trait]
impl Fairing for StoredMessages {
    fn info(&self) -> Info {
        Info {
            name: "stored-messages",
            kind: Kind::Ignite | Kind::Liftoff | Kind::Request | Kind::Response,
        }
    }

    async fn on_ignite(&self, rocket: Rocket<Build>) -> rocket::fairing::Result {
        let api = match &self.api {
            Ok(api) => api.clone(),
            Err(e) => {
                log::error!("stored-messages: cannot start: {e}");
                return Err(rocket);
            }
        };
        if let Some(bad) = self.exempt.iter().find(|p| !p.starts_with('/')) {
            log::error!(
                "stored-messages: cannot start: CSRF exempt path {bad:?} must start with '/'"
            );
            return Err(rocket);
        }
        let store = match &self.store {
            Some(store) => store.clone(),
            None => match Store::connect(rocket.figment(), self.host.clone()).await {
                Ok(store) => store,
                Err(e) => {
                    log::error!("stored-messages: cannot start: {}", report(&e));
                    return Err(rocket);
                }
            },
        };
        let listener = match store.config().stream_address {
            Some(address) => {
                let url = store.config().stream_url.clone();
                match crate::live::listener::StreamListener::bind(address, url, rocket.figment()) {
                    Ok(listener) => Some(listener),
                    Err(e) => {
                        log::error!(
                            "stored-messages: cannot start: the stream listener cannot listen on {address}: {e}"
                        );
                        return Err(rocket);
                    }
                }
            }
            None => None,
        };
        let mut rocket = rocket.manage(store).manage(api.clone());
        if let Some(listener) = listener {
            rocket = rocket.manage(listener);
        }
        if let Some(base) = api.get() {
            rocket = rocket
                .mount(base, api::routes())
                .register(base, api::catchers());
            if self.csrf {
                rocket = rocket.mount(base, csrf::routes_at(csrf::API_REJECTED));
            }
        }
        Ok(if self.csrf {
            rocket.mount("/", csrf::routes())
        } else {
            rocket
        })
    }

    async fn on_liftoff(&self, rocket: &Rocket<Orbit>) {
        let Some(store) = rocket.state::<Store>() else {
            return;
        };
        if let Some(listener) = rocket.state::<crate::live::listener::StreamListener>() {
            listener.start(store.clone(), rocket.shutdown());
        }
        let config = store.config();
        let levels: Vec<String> = config
            .store_levels
            .iter()
            .map(|l| l.0.to_string())
            .collect();
        let interval = config.cleanup_interval_secs;
        log::info!(
            "stored-messages: backend {}, store levels [{}], min level {}, cleanup {}",
            store.backend().name(),
            levels.join(", "),
            config.min_level.0,
            if interval == 0 {
                "off".to_string()
            } else {
                format!("every {interval}s")
            }
        );
        if interval > 0 {
            let store = store.clone();
            let mut shutdown = rocket.shutdown();
            rocket::tokio::spawn(async move {
                let mut ticker = rocket::tokio::time::interval(Duration::from_secs(interval));
                loop {
                    rocket::tokio::select! {
                        _ = ticker.tick() => {
                            // Once per interval among every process sharing the store: the
                            // lease lasts a little less than the interval, so the next tick
                            // of whichever instance comes first takes it again.
                            let ttl = Duration::from_secs(interval).mul_f64(0.9);
                            match store.backend().try_lease("cleanup", ttl).await {
                                Ok(true) => match store.cleanup().await {
                                    Ok(done) => log::info!(
                                        "stored-messages: periodic cleanup: {} expired inbox entries, {} old messages removed",
                                        done.inbox_entries,
                                        done.messages
                                    ),
                                    Err(e) => log::error!("stored-messages: periodic cleanup failed: {}", report(&e)),
                                },
                                Ok(false) => log::debug!("stored-messages: another instance cleans up this time"),
                                Err(e) => log::error!("stored-messages: periodic cleanup failed: {}", report(&e)),
                            }
                        }
                        _ = &mut shutdown => break,
                    }
                }
            });
        }
    }

    async fn on_request(&self, request: &mut Request<'_>, data: &mut Data<'_>) {
        crate::request::request_start(request);
        crate::request::note_looks_only(request);
        let api = self.api.as_ref().ok().and_then(ApiBase::get);
        api::normalize_trailing_slash(request, api);
        if self.csrf {
            csrf::check(request, data, &self.policy()).await;
        }
    }

    async fn on_response<'r>(&self, request: &'r Request<'_>, response: &mut Response<'r>) {
        let Some(store) = request.rocket().state::<Store>() else {
            return;
        };
        // What the API answers, and a page that loaded the message stream, belong to one
        // user (or one browser's flash queue): no cache may keep them, unless the handler
        // said otherwise.
        let api = self.api.as_ref().ok().and_then(ApiBase::get);
        let private = request_state(request).is_some()
            || api.is_some_and(|api| csrf::is_below(request.uri().path().as_str(), api));
        if private
            && !response
                .headers()
                .iter()
                .any(|header| is_named(&header, "Cache-Control"))
        {
            response.set_raw_header("Cache-Control", PRIVATE);
        }
        // A page that `Page` rendered with every helper's value needs no second pass.
        let rendered = template::Rendered::of(request);
        let html = (!rendered.by_page || rendered.markers) && is_html(response);
        let mut user = Ok(None);
        let mut unread = None;
        if let Some(state) = request_state(request) {
            user = Ok(state.user);
            let cookies_sent = response
                .headers()
                .iter()
                .any(|header| is_named(&header, "Set-Cookie") && sets_flash_cookie(header.value()));
            let succeeded = response.status().code < 400;
            if settle(store, state, cookies_sent, succeeded).await.is_err() {
                unsettled(response);
                return;
            }
            // The helpers show the inbox as this request leaves it, from its own snapshot.
            if html {
                unread = state.lock().unread_after(succeeded);
            }
        } else if html {
            // A host that cannot tell who the user is gets helpers that say so, never an
            // anonymous visitor's empty list and count of 0.
            user = crate::host::current_user(request, store.host()).await;
        }
        if html {
            template::fill(request, response, store, user, unread).await;
        }
    }
}

/// Writes the spill the request's cookies point to, marks the shown stored messages read,
/// then drops the spill the cookies no longer point to: in that order, so that when a step
/// fails, the browser's old cookies and the spill they name are still whole (see
/// [`unsettled`]).
///
/// # Errors
///
/// When the spill could not be written or the messages could not be marked read (logged
/// here): the response must not go out as it is.
async fn settle(
    store: &Store,
    state: &crate::request::RequestState,
    cookies_sent: bool,
    succeeded: bool,
) -> Result<(), ()> {
    let (pending, stale, shown) = {
        let inner = state.lock();
        (
            inner.pending_spill.clone(),
            inner.stale_spill_key().map(str::to_string),
            inner.shown_stored(),
        )
    };
    // A catcher response drops the handler's cookie changes: then the browser keeps its
    // old cookies, so the old spill must stay and the new one is useless.
    if cookies_sent {
        // The quota already let this spill be made (`Messages`): a refused one is not
        // pending.
        if let Some((key, payload)) = &pending {
            let lifetime = match state.user {
                Some(_) => spill_lifetime(),
                None => chrono::Duration::from_std(ANONYMOUS_SPILL_LIFETIME)
                    .unwrap_or_else(|_| spill_lifetime()),
            };
            let expires = chrono::Utc::now() + lifetime;
            if let Err(e) = store.flash_spill().spill_put(key, payload, expires).await {
                log::error!(
                    "stored-messages: writing flash spill failed, the request answers 503: {}",
                    report(&e)
                );
                return Err(());
            }
        }
    }
    if let (Some(user), true, false) = (state.user, succeeded, shown.is_empty()) {
        if let Err(e) = store.mark_many_read(user, &shown).await {
            log::error!(
                "stored-messages: marking {} messages read for user {user} failed, the \
                 request answers 503: {}",
                shown.len(),
                report(&e)
            );
            return Err(());
        }
    }
    if cookies_sent {
        if let Some(key) = &stale {
            if let Err(e) = store.flash_spill().spill_delete(key).await {
                log::warn!(
                    "stored-messages: dropping flash spill failed: {}",
                    report(&e)
                );
            }
        }
    }
    Ok(())
}

/// Whether `response` is an HTML page: its `Content-Type` is `text/html` (any parameters,
/// any case). Read from the header's text, not through Rocket's media-type parser, which
/// allocates and cost about 2,500 instructions on every response.
fn is_html(response: &Response<'_>) -> bool {
    response
        .headers()
        .iter()
        .find(|header| is_named(header, "Content-Type"))
        .is_some_and(|header| {
            let media_type = header.value().split(';').next().unwrap_or_default();
            media_type.eq_ignore_ascii_case("text/html")
        })
}

/// Whether a `Set-Cookie` value sets (or clears) the flash queue's cookie or its spill key.
fn sets_flash_cookie(set_cookie: &str) -> bool {
    [FLASH_COOKIE, SPILL_COOKIE].iter().any(|name| {
        set_cookie
            .strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('='))
    })
}

/// Turns `response` into a 503: it showed stored messages as read, or queued flash messages
/// in a spill, and the store did not take that. Sent as it was, the page would say messages
/// left the inbox that are still there, or the flash cookies would point at a spill that was
/// never written. Instead the browser keeps its flash cookies (their `Set-Cookie` headers are
/// dropped, other cookies go out), nothing is marked read, and a reload shows everything
/// again once the store answers.
fn unsettled(response: &mut Response<'_>) {
    let kept: Vec<String> = response
        .headers()
        .get("Set-Cookie")
        .filter(|c| !sets_flash_cookie(c))
        .map(str::to_string)
        .collect();
    response.remove_header("Set-Cookie");
    for cookie in kept {
        response.adjoin_raw_header("Set-Cookie", cookie);
    }
    const TEXT: &str = "The message store did not answer, so what this page shows could not \
                        be saved. Nothing was lost: load the page again in a moment.";
    let (content_type, body) = if is_html(response) {
        (
            ContentType::HTML,
            format!(
                "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
                 <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
                 <title>Try again</title>\n</head>\n<body>\n<main>\n<h1>Try again</h1>\n\
                 <p>{TEXT}</p>\n</main>\n</body>\n</html>\n"
            ),
        )
    } else {
        (
            ContentType::JSON,
            crate::error::error_body(Status::ServiceUnavailable, TEXT).to_string(),
        )
    };
    response.set_status(Status::ServiceUnavailable);
    response.set_header(content_type);
    response.set_raw_header("Retry-After", "1");
    response.set_sized_body(body.len(), std::io::Cursor::new(body));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_told_as_rockets_media_type_parser_tells_it() {
        let with = |content_type: Option<&str>| {
            let mut response = Response::new();
            if let Some(value) = content_type {
                response.set_raw_header("Content-Type", value.to_string());
            }
            response
        };
        for value in [
            "text/html",
            "text/html; charset=utf-8",
            "Text/HTML;charset=UTF-8",
        ] {
            let response = with(Some(value));
            assert!(is_html(&response), "{value}");
            assert_eq!(response.content_type(), Some(ContentType::HTML), "{value}");
        }
        for value in [
            Some("application/json"),
            Some("text/plain; charset=utf-8"),
            Some("text/htmlx"),
            Some(" text/html ; q=1"),
            Some("text"),
            Some(""),
            None,
        ] {
            let response = with(value);
            assert!(!is_html(&response), "{value:?}");
            assert_ne!(
                response.content_type(),
                Some(ContentType::HTML),
                "{value:?}"
            );
        }
    }
}
