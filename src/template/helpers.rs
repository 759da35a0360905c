//! The Tera functions and what they read: a scope that [`super::Page`] sets on the rendering
//! thread for the span of one synchronous render, or, without one, markers that the fairing
//! fills after rendering (see [`super::fill`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use rocket_dyn_templates::tera::{self, Value};

use super::list::{Forms, ListPartial};
use crate::message::{LevelTags, Message};
use crate::request::StreamSnapshot;

/// Largest `limit` the list helpers accept.
pub const MAX_HELPER_LIMIT: u32 = 200;

/// A per-process random prefix for markers, so text on a page can never forge one.
pub(crate) fn marker_prefix() -> &'static str {
    static PREFIX: OnceLock<String> = OnceLock::new();
    PREFIX.get_or_init(|| format!("<!--stored-messages:{}:", crate::changes::instance_name()))
}

pub(crate) const MARKER_END: &str = "-->";

/// What a helper call asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    List(u32),
    Archive(u32),
    Count,
    Csrf,
    StreamId,
}

impl Slot {
    pub(crate) fn encode(self) -> String {
        let body = match self {
            Slot::List(n) => format!("list:{n}"),
            Slot::Archive(n) => format!("archive:{n}"),
            Slot::Count => "count".to_string(),
            Slot::Csrf => "csrf".to_string(),
            Slot::StreamId => "stream".to_string(),
        };
        format!("{}{body}{MARKER_END}", marker_prefix())
    }

    pub(crate) fn decode(body: &str) -> Option<Slot> {
        match body.split_once(':') {
            Some(("list", n)) => n.parse().ok().map(Slot::List),
            Some(("archive", n)) => n.parse().ok().map(Slot::Archive),
            None if body == "count" => Some(Slot::Count),
            None if body == "csrf" => Some(Slot::Csrf),
            None if body == "stream" => Some(Slot::StreamId),
            _ => None,
        }
    }
}

/// What the helpers know while [`super::Page`] renders.
pub(crate) struct Scope {
    pub(crate) csrf: String,
    /// This page, for the partial's forms to come back to.
    pub(crate) next: String,
    /// Where the JSON API is, for the partial's forms.
    pub(crate) api: Option<String>,
    /// The user's unread inbox as this page leaves it; `None` when the request did not load
    /// it.
    pub(crate) unread: Option<Arc<[Message]>>,
    /// How many unread messages the user has as this page leaves the inbox: `unread`'s
    /// length, or the store's count when the request's inbox snapshot stopped at its window.
    pub(crate) count: Option<u64>,
    pub(crate) tags: LevelTags,
    /// The stream the page's context deferred, for the stream partial (see
    /// [`super::stream`]); `None` when the context holds the stream's JSON, or no stream.
    pub(crate) stream: Option<Arc<StreamSnapshot>>,
    /// A helper printed a marker: the fairing must fill the response.
    pub(crate) markers: bool,
}

thread_local! {
    static SCOPE: RefCell<Option<Scope>> = const { RefCell::new(None) };
}

/// Runs `render` with `scope` visible to the helpers on this thread (a render is
/// synchronous, so nothing else runs on the thread meanwhile), and returns its result with
/// the scope as the helpers left it. The scope is gone afterwards, however `render` ends.
pub(crate) fn with_scope<T>(scope: Scope, render: impl FnOnce() -> T) -> (T, Scope) {
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            SCOPE.with(|s| s.borrow_mut().take());
        }
    }
    SCOPE.with(|s| *s.borrow_mut() = Some(scope));
    let _clear = Clear;
    let result = render();
    let scope = SCOPE.with(|s| s.borrow_mut().take());
    (result, scope.expect("helpers never remove the scope"))
}

/// The stream the page being rendered on this thread deferred, if any.
pub(crate) fn page_stream() -> Option<Arc<StreamSnapshot>> {
    SCOPE.with(|s| s.borrow().as_ref().and_then(|scope| scope.stream.clone()))
}

/// What a helper could answer from the scope.
enum Known {
    Text(String),
    Count(u64),
    List {
        messages: Arc<[Message]>,
        limit: usize,
        tags: LevelTags,
        csrf: String,
        next: String,
        api: Option<String>,
    },
}

/// One helper. Safe, so Tera does not escape what it prints: a marker, a number, a
/// URL-safe token, or HTML that the partial escaped.
pub(crate) struct Helper {
    pub(crate) kind: fn(u32) -> Slot,
    pub(crate) takes_limit: bool,
    pub(crate) partial: Arc<ListPartial>,
}

impl Helper {
    /// The value of `slot` from the current scope; `None` when there is no scope, or it
    /// cannot answer without I/O (the fairing fills a marker then).
    fn scoped(&self, slot: Slot) -> tera::Result<Option<Value>> {
        // The scope is borrowed only to copy out what is needed: rendering an override of
        // the partial may call helpers again.
        let known = SCOPE.with(|s| {
            let mut scope = s.borrow_mut();
            let scope = scope.as_mut()?;
            let known = match slot {
                Slot::Csrf => Some(Known::Text(scope.csrf.clone())),
                Slot::Count => scope.count.map(Known::Count),
                Slot::StreamId => scope
                    .unread
                    .as_ref()
                    .map(|u| Known::Text(crate::live::state_id(u))),
                Slot::List(n) => scope.unread.as_ref().map(|u| Known::List {
                    messages: u.clone(),
                    limit: n as usize,
                    tags: scope.tags.clone(),
                    csrf: scope.csrf.clone(),
                    next: scope.next.clone(),
                    api: scope.api.clone(),
                }),
                Slot::Archive(_) => None,
            };
            scope.markers |= known.is_none();
            known
        });
        known
            .map(|known| match known {
                Known::Text(text) => Ok(Value::String(text)),
                Known::Count(n) => Ok(Value::from(n)),
                Known::List {
                    messages,
                    limit,
                    tags,
                    csrf,
                    next,
                    api,
                } => {
                    let shown = &messages[..messages.len().min(limit)];
                    let forms = Forms {
                        csrf: &csrf,
                        next: &next,
                        api: api.as_deref(),
                    };
                    self.partial
                        .render("inbox", shown, &tags, forms)
                        .map(Value::String)
                }
            })
            .transpose()
    }
}

impl tera::Function for Helper {
    fn call(&self, args: &HashMap<String, Value>) -> tera::Result<Value> {
        let limit = match args.get("limit") {
            None => 10,
            Some(value) if self.takes_limit => value
                .as_u64()
                .filter(|n| (1..=u64::from(MAX_HELPER_LIMIT)).contains(n))
                .map(|n| n as u32)
                .ok_or_else(|| {
                    tera::Error::msg(format!(
                        "limit must be an integer from 1 to {MAX_HELPER_LIMIT}, not {value}"
                    ))
                })?,
            Some(_) => return Err(tera::Error::msg("this helper takes no arguments")),
        };
        let slot = (self.kind)(limit);
        Ok(self
            .scoped(slot)?
            .unwrap_or_else(|| Value::String(slot.encode())))
    }

    fn is_safe(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use rocket_dyn_templates::tera::{Context, Tera};

    use super::*;
    use crate::level::Level;
    use crate::message::MessageId;

    fn tera() -> Tera {
        let mut tera = Tera::default();
        super::super::register(&mut tera);
        tera
    }

    #[test]
    fn markers_round_trip() {
        for slot in [
            Slot::List(10),
            Slot::Archive(200),
            Slot::Count,
            Slot::Csrf,
            Slot::StreamId,
        ] {
            let marker = slot.encode();
            let body = marker
                .strip_prefix(marker_prefix())
                .unwrap()
                .strip_suffix(MARKER_END)
                .unwrap();
            assert_eq!(Slot::decode(body), Some(slot));
        }
        assert_eq!(Slot::decode("list:x"), None);
        assert_eq!(Slot::decode("other"), None);
    }

    #[test]
    fn helpers_validate_their_limit() {
        let mut tera = tera();
        tera.add_raw_template(
            "ok.html",
            "{{ stored_messages_list(limit=5) }}|{{ stored_messages_count() }}",
        )
        .unwrap();
        let out = tera.render("ok.html", &Context::new()).unwrap();
        assert!(
            out.contains("list:5-->") && out.contains("count-->"),
            "{out}"
        );
        assert!(!out.contains("&lt;"), "markers are not escaped");
        tera.add_raw_template("bad.html", "{{ stored_messages_list(limit=0) }}")
            .unwrap();
        assert!(tera.render("bad.html", &Context::new()).is_err());
        tera.add_raw_template("bad2.html", "{{ stored_messages_list(limit='x') }}")
            .unwrap();
        assert!(tera.render("bad2.html", &Context::new()).is_err());
    }

    fn scope(user: i64, texts: &[&str]) -> Scope {
        let unread: Vec<Message> = texts
            .iter()
            .enumerate()
            .map(|(i, text)| Message {
                id: MessageId(user * 100 + i as i64),
                level: Level::STORED_INFO,
                message: text.to_string(),
                extra_tags: String::new(),
                url: None,
                date: chrono::Utc::now(),
            })
            .collect();
        Scope {
            csrf: format!("token-of-{user}"),
            next: "/".into(),
            api: Some("/messages".into()),
            count: Some(unread.len() as u64),
            unread: Some(unread.into()),
            tags: LevelTags::default(),
            stream: None,
            markers: false,
        }
    }

    #[test]
    fn in_a_scope_helpers_are_values_of_that_scope() {
        let mut tera = tera();
        tera.add_raw_template(
            "page.html",
            "{% if stored_messages_count() > 1 %}many{% else %}few{% endif %} \
             {{ stored_messages_count() + 1 }} {{ csrf_token() }} {{ stored_messages_list(limit=1) }} \
             {{ stored_messages_archive() }}",
        )
        .unwrap();
        let (out, left) = with_scope(scope(1, &["a <b>", "c"]), || {
            tera.render("page.html", &Context::new()).unwrap()
        });
        assert!(out.starts_with("many 3 token-of-1 "), "{out}");
        assert!(out.contains("a &lt;b&gt;") && !out.contains(">c<"), "{out}");
        // the archive needs the store: a marker, and the scope says so
        assert!(out.contains("archive:10-->"), "{out}");
        assert!(left.markers);
        // outside a scope, markers again
        let out = tera.render("page.html", &Context::new());
        assert!(out.is_err(), "a marker is not a number");
    }

    #[test]
    fn two_users_rendering_at_once_each_see_their_own_data() {
        let mut tera = tera();
        tera.add_raw_template(
            "page.html",
            "{{ csrf_token() }} {{ stored_messages_count() }} {{ stored_messages_list() }}",
        )
        .unwrap();
        let tera = Arc::new(tera);
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let renders: Vec<_> = [1i64, 2]
            .into_iter()
            .map(|user| {
                let (tera, barrier) = (tera.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let texts: Vec<String> = (0..user * 2)
                        .map(|i| format!("user {user} message {i}"))
                        .collect();
                    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
                    let mut outs = Vec::new();
                    for _ in 0..200 {
                        barrier.wait();
                        let (out, _) = with_scope(scope(user, &texts), || {
                            tera.render("page.html", &Context::new()).unwrap()
                        });
                        outs.push(out);
                    }
                    (user, outs)
                })
            })
            .collect();
        for render in renders {
            let (user, outs) = render.join().unwrap();
            let other = 3 - user;
            for out in outs {
                assert!(
                    out.starts_with(&format!("token-of-{user} {} ", user * 2)),
                    "{out}"
                );
                assert!(out.contains(&format!("user {user} message")), "{out}");
                assert!(!out.contains(&format!("user {other} ")), "{out}");
                assert!(!out.contains(&format!("token-of-{other}")), "{out}");
            }
        }
    }
}
