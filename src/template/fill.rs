//! The second pass over an HTML response: replaces the markers that helpers printed when
//! they could not answer while rendering (plain `Template::render` pages, the archive, an
//! inbox the request had not loaded) with the data of that request's user. The
//! [`crate::StoredMessages`] fairing calls it once the request's reads are settled, and only
//! for responses that may carry markers.

use std::borrow::Cow;

use rocket::http::ContentType;
use rocket::{Request, Response};
use rocket_dyn_templates::{Metadata, Template};
use serde::Serialize;

use super::helpers::{marker_prefix, Slot, MARKER_END};
use super::list::{Forms, ListPartial, LIST_TEMPLATE};
use super::Templates;
use crate::api::ApiBase;
use crate::backend::ListQuery;
use crate::csrf;
use crate::host::Unidentified;
use crate::message::{Message, UserId};
use crate::ops::Store;
use crate::request::StreamMessage;

/// The largest HTML body the fairing reads to look for helper markers (16 MiB).
const MAX_SCANNED_BODY: usize = 16 << 20;

/// Replaces the markers of an HTML response with the data of its request's user.
///
/// `unread` is the user's inbox as the request left it, when the request loaded it (the
/// `Messages` guard): the count and list helpers then need no query. `user` is `Err` when the
/// host could not tell who the user is: the helpers then answer as for a store that fails
/// (a count of `?`, a list that says messages are unavailable), not as for a visitor.
pub(crate) async fn fill<'r>(
    request: &'r Request<'_>,
    response: &mut Response<'r>,
    store: &Store,
    user: Result<Option<UserId>, Unidentified>,
    unread: Option<Vec<Message>>,
) {
    if response.content_type() != Some(ContentType::HTML) {
        return;
    }
    // Helpers print into rendered templates, which are in-memory bodies of a known size: a
    // streamed body (unknown size) is passed on untouched, never read into memory, and so is
    // one too large to be a rendered page.
    match response.body().preset_size() {
        Some(size) if size <= MAX_SCANNED_BODY => {}
        _ => return,
    }
    let body = match response.body_mut().to_string().await {
        Ok(body) => body,
        Err(e) => {
            log::warn!("stored-messages: could not read the response body: {e}");
            return;
        }
    };
    if !body.contains(marker_prefix()) {
        response.set_sized_body(body.len(), std::io::Cursor::new(body));
        return;
    }
    let filled = replace_markers(&body, request, store, user, unread.as_deref()).await;
    // The page now holds this browser's token and, for a user, their messages.
    if !response.headers().contains("Cache-Control") {
        response.set_raw_header("Cache-Control", crate::fairing::PRIVATE);
    }
    response.set_sized_body(filled.len(), std::io::Cursor::new(filled));
}

async fn replace_markers(
    body: &str,
    request: &Request<'_>,
    store: &Store,
    user: Result<Option<UserId>, Unidentified>,
    unread: Option<&[Message]>,
) -> String {
    let prefix = marker_prefix();
    let mut out = String::with_capacity(body.len() + 1024);
    let mut rest = body;
    let mut done: Vec<(Slot, String)> = Vec::new();
    while let Some(start) = rest.find(prefix) {
        out.push_str(&rest[..start]);
        let after = &rest[start + prefix.len()..];
        let Some(end) = after.find(MARKER_END) else {
            out.push_str(&rest[start..]);
            rest = "";
            break;
        };
        match Slot::decode(&after[..end]) {
            Some(slot) => {
                if let Some((_, html)) = done.iter().find(|(s, _)| *s == slot) {
                    out.push_str(html);
                } else {
                    let html = render_slot(slot, request, store, user, unread).await;
                    out.push_str(&html);
                    done.push((slot, html));
                }
            }
            None => out.push_str(&rest[start..start + prefix.len() + end + MARKER_END.len()]),
        }
        rest = &after[end + MARKER_END.len()..];
    }
    out.push_str(rest);
    out
}

/// What a list helper shows when its messages cannot be read.
const UNAVAILABLE: &str =
    "<p class=\"stored-messages-error\">Messages are unavailable right now.</p>";

async fn render_slot(
    slot: Slot,
    request: &Request<'_>,
    store: &Store,
    user: Result<Option<UserId>, Unidentified>,
    unread: Option<&[Message]>,
) -> String {
    let backend = store.backend();
    let user = match (slot, user) {
        (Slot::Csrf, _) => return csrf::ensure_token(request),
        (_, Ok(user)) => user,
        // The host already logged why.
        (Slot::Count, Err(Unidentified)) => return "?".to_string(),
        (Slot::StreamId, Err(Unidentified)) => return String::new(),
        (Slot::List(_) | Slot::Archive(_), Err(Unidentified)) => return UNAVAILABLE.to_string(),
    };
    let (kind, result) = match (slot, user) {
        (Slot::Csrf, _) => return csrf::ensure_token(request),
        (Slot::Count, None) => return "0".to_string(),
        (Slot::StreamId, None) => return String::new(),
        (Slot::StreamId, Some(_)) if unread.is_some() => {
            return crate::live::state_id(unread.unwrap_or_default());
        }
        (Slot::StreamId, Some(user)) => {
            let query = crate::backend::ListQuery::first(crate::live::KNOWN_LIMIT);
            return match backend.inbox_list(user, query).await {
                Ok(inbox) => crate::live::state_id(&inbox),
                Err(_) => String::new(),
            };
        }
        (Slot::Count, Some(_)) if unread.is_some() => {
            return unread.map_or(0, <[Message]>::len).to_string();
        }
        (Slot::List(n), Some(_)) if unread.is_some() => {
            let unread = unread.unwrap_or_default();
            let first = &unread[..unread.len().min(n as usize)];
            ("inbox", Ok(Cow::Borrowed(first)))
        }
        (Slot::Count, Some(user)) => {
            return match backend.inbox_count(user).await {
                Ok(n) => n.to_string(),
                Err(e) => {
                    log::error!(
                        "stored-messages: count for user {user} failed: {}",
                        crate::report(&e)
                    );
                    "?".to_string()
                }
            }
        }
        (Slot::List(_), None) => ("inbox", Ok(Cow::Owned(Vec::new()))),
        (Slot::Archive(_), None) => ("archive", Ok(Cow::Owned(Vec::new()))),
        (Slot::List(n), Some(user)) => (
            "inbox",
            backend
                .inbox_list(user, ListQuery::first(n))
                .await
                .map(Cow::Owned),
        ),
        (Slot::Archive(n), Some(user)) => (
            "archive",
            backend
                .archive_list(user, ListQuery::first(n))
                .await
                .map(Cow::Owned),
        ),
    };
    let messages: Cow<'_, [Message]> = match result {
        Ok(messages) => messages,
        Err(e) => {
            log::error!(
                "stored-messages: {kind} helper failed: {}",
                crate::report(&e)
            );
            return UNAVAILABLE.to_string();
        }
    };
    let next = request.uri().to_string();
    let csrf = csrf::ensure_token(request);
    let tags = store.level_tags();
    let forms = Forms {
        csrf: &csrf,
        next: &next,
        api: ApiBase::of(request.rocket()),
    };
    let rendered = match request
        .rocket()
        .state::<Templates>()
        .and_then(Templates::partial)
    {
        Some(partial) => partial.render(kind, &messages, tags, forms),
        // The host registered the helpers itself (`register`): its override, if it has
        // one, is known to rocket_dyn_templates only.
        None if host_has_partial(request).await => {
            #[derive(Serialize)]
            struct Context<'a> {
                messages: Vec<StreamMessage>,
                kind: &'a str,
                csrf: &'a str,
                next: &'a str,
                api: &'a str,
            }
            let context = Context {
                messages: messages
                    .iter()
                    .map(|m| StreamMessage::stored(m, tags))
                    .collect(),
                kind,
                csrf: &csrf,
                next: &next,
                api: forms.api.unwrap_or(""),
            };
            Template::show(request.rocket(), LIST_TEMPLATE, context).ok_or_else(|| {
                rocket_dyn_templates::tera::Error::msg("the list partial failed to render")
            })
        }
        None => ListPartial::Builtin.render(kind, &messages, tags, forms),
    };
    rendered.unwrap_or_else(|e| {
        log::error!(
            "stored-messages: the {kind} list failed to render: {}",
            crate::report(&e)
        );
        "<p class=\"stored-messages-error\">Messages cannot be shown right now.</p>".to_string()
    })
}

async fn host_has_partial(request: &Request<'_>) -> bool {
    match request.guard::<Metadata<'_>>().await {
        rocket::outcome::Outcome::Success(meta) => meta.contains_template(LIST_TEMPLATE),
        _ => false,
    }
}
