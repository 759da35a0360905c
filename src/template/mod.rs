//! Tera helpers: `stored_messages_list(limit=10)`, `stored_messages_archive(limit=10)`,
//! `stored_messages_count()`, `csrf_token()` and `stored_messages_stream_id()` (the inbox
//! this page shows, as a live stream's event id: a page passes it as the stream's `?since=`,
//! see [`crate::live`]), for the current user of any page.
//!
//! Tera functions are synchronous and see only their arguments, so they cannot know whose
//! page is being rendered, and must never wait for a database. So the data is prepared
//! before rendering, and the helpers reach it without I/O:
//!
//! - **Pages rendered with [`Page`]** (a drop-in for `Template::render`): while `Page`
//!   renders, on the thread that renders it, a scope holds what the request already knows:
//!   its CSRF token, and the user's unread inbox as the [`crate::Messages`] guard loaded it
//!   (the oldest [`crate::MAX_STREAM_STORED`], and past those the count of the rest),
//!   minus what this page shows and marks read. `stored_messages_count()` is then a number
//!   usable in any expression (`{% if stored_messages_count() > 0 %}`) and
//!   `stored_messages_list()` renders the partial at once. Two users rendering at the same
//!   moment each see their own data: a scope belongs to one thread for the span of one
//!   synchronous render.
//! - What the request does not know yet (the archive, or the inbox when the handler did not
//!   use the `Messages` guard), and every helper in a page rendered with plain
//!   `Template::render`, prints a marker instead: an HTML comment carrying a per-process
//!   random nonce, which the [`crate::StoredMessages`] fairing replaces with that request's
//!   data once the response is ready. Only responses that carry markers are rewritten.
//!
//! Both ways, the helpers show the inbox as this page leaves it: messages the page shows
//! (and marks read, see [`crate::Messages`]) are not counted as unread.
//!
//! The partials are built in and registered with Tera by [`register`] (and [`fairing`]):
//! the stream `stored_messages/messages` ([`MESSAGES_TEMPLATE`]) and the list
//! `stored_messages/list.html` ([`LIST_INCLUDE`]). A host overrides either by putting its own
//! file at that path in its templates directory.
//!
//! The list partial is `stored_messages/list.html.tera`. The crate has its own (see
//! [`list`](self) `list.html.tera`, rendered without Tera); a host overrides it by putting
//! its own file at that path in its templates directory. [`fairing`] attaches
//! rocket_dyn_templates with the helpers registered and lets [`Page`] render with Tera
//! directly (without rocket_dyn_templates' conversion of the context through figment,
//! which costs as much as a small template).

use std::borrow::Cow;
use std::sync::{Arc, RwLock};

use rocket::fairing::{AdHoc, Fairing};
use rocket::http::{ContentType, Status};
use rocket::response::{self, Responder};
use rocket::Request;
use rocket_dyn_templates::tera::{self, Tera};
use rocket_dyn_templates::{Engines, Template};

use self::helpers::{with_scope, Helper, Scope, Slot};
use self::list::ListPartial;
use self::uses::Uses;
use crate::api::ApiBase;
use crate::csrf;
use crate::message::Message;
use crate::ops::Store;
use crate::request::{request_state, StreamSnapshot};

mod fill;
mod helpers;
mod list;
mod stream;
mod uses;

pub(crate) use self::fill::fill;
pub use self::helpers::MAX_HELPER_LIMIT;
pub(crate) use self::list::push_escaped;
pub use self::list::{BUILTIN_SOURCE as BUILTIN_LIST_SOURCE, LIST_TEMPLATE};
pub(crate) use self::stream::{defer as defer_stream, serialize_placeholder};

/// The name under which pages include the list partial:
/// `{% include "stored_messages/list.html" %}`.
pub const LIST_INCLUDE: &str = "stored_messages/list.html";

/// The stream partial: the messages of the `messages` context variable (the
/// [`crate::Messages`] guard, serialized) in an ARIA live region. Pages include it with
/// `{% include "stored_messages/messages" %}`; a host overrides it with its own
/// `stored_messages/messages.html.tera`.
pub const MESSAGES_TEMPLATE: &str = "stored_messages/messages";

/// The source of the crate's stream partial: a starting point for an override.
pub const BUILTIN_MESSAGES_SOURCE: &str = include_str!("messages.html.tera");

/// Registers the helpers on a Tera instance: call it from `Template::custom`, after any
/// templates or functions of your own. [`fairing`] does this for you, and renders faster.
///
/// ```no_run
/// use rocket_dyn_templates::Template;
///
/// let templates = Template::custom(|engines| stored_messages::template::register(&mut engines.tera));
/// ```
pub fn register(tera: &mut Tera) {
    register_with(tera, Arc::new(ListPartial::from_host(tera)));
}

fn register_with(tera: &mut Tera, partial: Arc<ListPartial>) {
    // Pages may `{% include "stored_messages/list.html" %}` with a context of their own
    // (see the partial's comment). That name is the host's override when there is one, the
    // crate's partial otherwise, and it ends in `.html`, so Tera escapes it even when it is
    // rendered on its own.
    let source = match &*partial {
        ListPartial::Builtin => Some(Cow::Borrowed(list::BUILTIN_SOURCE)),
        ListPartial::Host(_) => tera
            .get_template(LIST_TEMPLATE)
            .ok()
            .and_then(|t| t.path.clone())
            .and_then(|path| std::fs::read_to_string(path).ok())
            .map(Cow::Owned),
    };
    if let Some(source) = source {
        if let Err(e) = tera.add_raw_template(LIST_INCLUDE, &source) {
            log::error!("stored-messages: registering {LIST_INCLUDE} failed: {e}");
        }
    }
    // The stream partial, unless the host has its own: written by Rust (see `stream`).
    if tera.get_template(MESSAGES_TEMPLATE).is_err() {
        tera.register_filter(stream::FILTER, stream::StreamPartial);
        if let Err(e) = tera.add_raw_template(MESSAGES_TEMPLATE, stream::FAST_SOURCE) {
            log::error!("stored-messages: registering {MESSAGES_TEMPLATE} failed: {e}");
        }
    }
    let helper = |kind: fn(u32) -> Slot, takes_limit| Helper {
        kind,
        takes_limit,
        partial: partial.clone(),
    };
    tera.register_function("stored_messages_list", helper(Slot::List, true));
    tera.register_function("stored_messages_archive", helper(Slot::Archive, true));
    tera.register_function("stored_messages_count", helper(|_| Slot::Count, false));
    tera.register_function("csrf_token", helper(|_| Slot::Csrf, false));
    tera.register_function(
        "stored_messages_stream_id",
        helper(|_| Slot::StreamId, false),
    );
}

/// What [`fairing`] last loaded: the Tera [`Page`] renders with, and the list partial.
#[derive(Clone, Default)]
struct Templates(Arc<RwLock<Option<Loaded>>>);

#[derive(Clone)]
struct Loaded {
    tera: Arc<Tera>,
    partial: Arc<ListPartial>,
    uses: Arc<Uses>,
}

impl Templates {
    fn loaded(&self) -> Option<Loaded> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn partial(&self) -> Option<Arc<ListPartial>> {
        self.loaded().map(|l| l.partial)
    }

    fn set(&self, loaded: Loaded) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(loaded);
    }
}

/// rocket_dyn_templates' template fairing with the helpers registered (see [`register`]):
/// attach it instead of `Template::fairing()`. [`Page`] then renders with its Tera
/// directly. In debug builds templates still reload when they change.
pub fn fairing() -> impl Fairing {
    custom(|_| {})
}

/// As [`fairing`], with `customize` run first on every (re)load, like `Template::custom`:
/// register your own Tera functions and filters there.
///
/// ```no_run
/// let templates = stored_messages::template::custom(|engines| {
///     engines.tera.register_filter("shout", |v: &rocket_dyn_templates::tera::Value, _: &_| {
///         Ok(v.as_str().unwrap_or_default().to_uppercase().into())
///     });
/// });
/// ```
pub fn custom<F>(customize: F) -> impl Fairing
where
    F: Fn(&mut Engines) + Send + Sync + 'static,
{
    AdHoc::on_ignite("stored-messages templates", |rocket| async move {
        let templates = Templates::default();
        let loaded = templates.clone();
        rocket
            .manage(templates)
            .attach(Template::custom(move |engines| {
                customize(engines);
                let partial = Arc::new(ListPartial::from_host(&engines.tera));
                register_with(&mut engines.tera, partial.clone());
                loaded.set(Loaded {
                    uses: Arc::new(Uses::of(&engines.tera)),
                    tera: Arc::new(engines.tera.clone()),
                    partial,
                });
            }))
    })
}

/// An HTML page rendered from a Tera template: a drop-in for `Template::render` whose
/// helpers are values and see this request's data (see the module docs).
///
/// The context is serialized when the page is made, like `Template::render` does, so a
/// [`crate::Messages`] stream in it counts as shown then. (When the page's templates only
/// include the stream partial and count the stream, its messages are not turned into
/// Tera values at all: the partial is written from them directly. A template that looks
/// inside the stream sees its JSON as always.) The answer is `text/html`
/// whatever the template's extension, with status 200 unless [`Page::status`] says
/// otherwise: set it there rather than wrapping the page in a `(Status, Page)` tuple, so
/// the helpers know whether this page's reads will count (a failed page marks nothing
/// read).
///
/// ```no_run
/// # use rocket::get;
/// use rocket_dyn_templates::context;
/// use stored_messages::{template::Page, Messages};
///
/// #[get("/")]
/// fn index(messages: Messages<'_>) -> Page {
///     Page::render("index", context! { messages })
/// }
/// ```
pub struct Page {
    name: Cow<'static, str>,
    context: Result<serde_json::Value, serde_json::Error>,
    /// The stream the context holds a stand-in for (see [`stream`]).
    stream: Option<Arc<StreamSnapshot>>,
    status: Status,
}

impl Page {
    /// The page `name` (a template such as `"index"` for `index.html.tera`) with `context`.
    pub fn render(name: impl Into<Cow<'static, str>>, context: impl serde::Serialize) -> Page {
        let (context, stream) = stream::capture(|| serde_json::to_value(context));
        Page {
            name: name.into(),
            context,
            stream,
            status: Status::Ok,
        }
    }

    /// The same page answered with `status` (a form re-rendered with errors: 422).
    pub fn status(mut self, status: Status) -> Page {
        self.status = status;
        self
    }
}

/// What [`Page`] tells the fairing about the response it made.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Rendered {
    /// The response was rendered by `Page`.
    pub(crate) by_page: bool,
    /// A helper printed a marker that the fairing must fill.
    pub(crate) markers: bool,
}

impl Rendered {
    /// What the current request's `Page` said (nothing, for other responses).
    pub(crate) fn of(request: &Request<'_>) -> Rendered {
        *request.local_cache(Rendered::default)
    }
}

impl<'r> Responder<'r, 'static> for Page {
    fn respond_to(self, request: &'r Request<'_>) -> response::Result<'static> {
        let loaded = request
            .rocket()
            .state::<Templates>()
            .and_then(Templates::loaded);
        let failed = |e: &dyn std::fmt::Display| {
            log::error!(
                "stored-messages: the context of page {} failed to serialize: {e}",
                self.name
            );
            Status::InternalServerError
        };
        let mut context = self.context.map_err(|e| failed(&e))?;
        // Keep the stream's stand-in only where every template of the page just counts it.
        let stream = match self.stream {
            // An empty stream's stand-in is its JSON already.
            Some(stream) if stream.is_empty() => None,
            Some(stream) if stand_in_kept(&context, &self.name, loaded.as_ref()) => Some(stream),
            Some(stream) => {
                stream::materialize(&mut context, &stream).map_err(|e| failed(&e))?;
                None
            }
            None => None,
        };
        let succeeded = self.status.code < 400;
        let scope = Scope {
            csrf: csrf::ensure_token(request),
            next: request.uri().to_string(),
            api: ApiBase::of(request.rocket()).map(str::to_string),
            unread: page_unread(request, succeeded),
            count: page_count(request, succeeded),
            tags: request
                .rocket()
                .state::<Store>()
                .map(|store| store.level_tags().clone())
                .unwrap_or_default(),
            stream,
            markers: false,
        };
        let counted = scope.count.is_some();
        let (html, scope) = with_scope(scope, || match &loaded {
            Some(loaded) => tera::Context::from_value(context)
                .and_then(|context| loaded.tera.render(&self.name, &context))
                .map_err(|e| {
                    let report = crate::report(&e);
                    let hint = if !counted && report.contains("stored_messages_count") {
                        " (its handler takes no `Messages` guard, so the count is a placeholder \
                         filled in after rendering: it prints, but cannot be compared or \
                         computed with; take the guard)"
                    } else {
                        ""
                    };
                    log::error!(
                        "stored-messages: page {} failed to render: {report}{hint}",
                        self.name
                    );
                })
                .ok(),
            // Without `fairing()`, through rocket_dyn_templates (which logs its errors).
            None => {
                let html = Template::show(request.rocket(), self.name.clone(), context);
                if html.is_none() {
                    log::error!(
                        "stored-messages: page {} did not render, and this app has no \
                         `stored_messages::template::fairing()`: attach it in place of \
                         `Template::fairing()`, which lacks `csrf_token()` and the \
                         `stored_messages_*` helpers",
                        self.name
                    );
                }
                html
            }
        });
        let html = html.ok_or(Status::InternalServerError)?;
        request.local_cache(|| Rendered {
            by_page: true,
            markers: scope.markers,
        });
        let len = html.len();
        let mut response = (ContentType::HTML, html).respond_to(request)?;
        response.set_status(self.status);
        // The page is in memory already: hand it to the connection in one piece, not in
        // Rocket's default 4 KiB chunks (one write each).
        response.set_max_chunk_size(len.max(1));
        Ok(response)
    }
}

/// Whether a page may render with its deferred stream's stand-in: it sits at the top of
/// `context` (not inside another value), and `template` and all it renders only count it.
/// Without the crate's template fairing, nothing is known of the templates.
fn stand_in_kept(context: &serde_json::Value, template: &str, loaded: Option<&Loaded>) -> bool {
    let (Some(loaded), serde_json::Value::Object(map)) = (loaded, context) else {
        return false;
    };
    let mut at_top = map.iter().filter(|(_, v)| stream::is_placeholder(v));
    match (at_top.next(), at_top.next()) {
        (Some((name, _)), None) => loaded.uses.only_counts(template, name),
        _ => false,
    }
}

/// How many unread messages a page's helpers count (see [`page_unread`]): also known when
/// the guard stopped at its window. `None` when the guard did not load the inbox.
fn page_count(request: &Request<'_>, succeeded: bool) -> Option<u64> {
    let state = request_state(request)?;
    if state.user.is_none() {
        return Some(0);
    }
    let count = state.lock().unread_count_after(succeeded);
    count
}

/// The unread inbox a page's helpers show: what the `Messages` guard loaded and this
/// request added, minus what the page shows and will mark read when it `succeeded`. Empty
/// for anonymous visitors; `None` when the guard did not load the inbox, or stopped at its
/// window (the fairing then asks the store).
fn page_unread(request: &Request<'_>, succeeded: bool) -> Option<Arc<[Message]>> {
    let state = request_state(request)?;
    if state.user.is_none() {
        return Some(Arc::from([]));
    }
    let unread = state.lock().unread_after(succeeded)?;
    Some(unread.into())
}
