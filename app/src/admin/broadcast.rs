//! The broadcast form: its values and errors, their validation (in the form types), the
//! preview, and the two ways of sending (at once, or as a background job for a large
//! audience), each recorded in the audit log.

use std::sync::Arc;
use std::time::Instant;

use rocket::form::{Contextual, Form};
use rocket::http::Status;
use rocket::response::Redirect;
use rocket::State;
use rocket_dyn_templates::context;
use serde::Serialize;
use stored_messages::api::NOTICE_ANCHOR;
use stored_messages::report;
use stored_messages::template::Page;
use stored_messages::{
    Level, Message, MessageId, Messages, NewMessage, Store, StreamMessage, UserId, MAX_TEXT_CHARS,
};

use super::{AdminUser, BackgroundThreshold};
use crate::jobs::{Audit, Jobs};
use crate::pages::{sentence, FieldError};
use crate::users::{User, UserError, Users};

#[derive(Serialize)]
struct LevelChoice {
    value: String,
    label: String,
}

fn stored_level_choices(store: &Store) -> Vec<LevelChoice> {
    let mut choices: Vec<LevelChoice> = store
        .config()
        .store_levels
        .iter()
        .map(|l| LevelChoice {
            value: l.name().map_or_else(|| l.0.to_string(), str::to_string),
            label: format!("{} ({})", l.label(), l.0),
        })
        .collect();
    choices.push(LevelChoice {
        value: "custom".into(),
        label: "Custom level…".into(),
    });
    choices
}

#[derive(Debug, Default, Serialize)]
struct BroadcastValues {
    level: String,
    custom_level: String,
    message: String,
    extra_tags: String,
    url: String,
    recipients: String,
    usernames: String,
}

#[derive(Debug, Default, Serialize)]
struct BroadcastErrors {
    level: Option<String>,
    message: Option<String>,
    extra_tags: Option<String>,
    url: Option<String>,
    usernames: Option<String>,
}

impl BroadcastErrors {
    /// The same errors as sentences, for people.
    fn as_sentences(&self) -> BroadcastErrors {
        let say = |e: &Option<String>| e.as_deref().map(sentence);
        BroadcastErrors {
            level: say(&self.level),
            message: say(&self.message),
            extra_tags: say(&self.extra_tags),
            url: say(&self.url),
            usernames: say(&self.usernames),
        }
    }

    /// Every error in the order of the form's fields, each with the id of the field it is
    /// about (for the error summary's links).
    fn summary(&self, values: &BroadcastValues) -> Vec<FieldError> {
        let recipients = if values.recipients == "list" {
            "usernames"
        } else {
            "recipients-everyone"
        };
        let level = if values.level == "custom" {
            "custom_level"
        } else {
            "level"
        };
        [
            (recipients, &self.usernames),
            (level, &self.level),
            ("message", &self.message),
            ("extra_tags", &self.extra_tags),
            ("url", &self.url),
        ]
        .into_iter()
        .filter_map(|(field, error)| {
            error.as_ref().map(|text| FieldError {
                field,
                text: text.clone(),
            })
        })
        .collect()
    }

    fn any(&self) -> bool {
        self.level.is_some()
            || self.message.is_some()
            || self.extra_tags.is_some()
            || self.url.is_some()
            || self.usernames.is_some()
    }
}

fn broadcast_page(
    messages: &Messages<'_>,
    admin: &User,
    store: &Store,
    values: &BroadcastValues,
    errors: &BroadcastErrors,
    preview: Option<Vec<StreamMessage>>,
    confirm: Option<Confirm>,
) -> Page {
    let errors = errors.as_sentences();
    Page::render(
        "admin/broadcast",
        context! {
            messages: messages.flash(),
            here: "admin",
            user: admin,
            levels: stored_level_choices(store),
            max_len: MAX_TEXT_CHARS,
            form: values,
            error_list: errors.summary(values),
            errors,
            preview,
            confirm,
            store_levels: store.config().store_levels.iter().map(|l| l.0).collect::<Vec<_>>(),
        },
    )
}

/// The question before a broadcast to everyone: how many users it goes to, and, when the
/// admin confirmed another count (users were added or removed since the question), that
/// count.
#[derive(Debug, Clone, Copy, Serialize)]
struct Confirm {
    users: usize,
    was: Option<usize>,
}

#[get("/admin/broadcast")]
pub(super) fn broadcast_form(
    admin: AdminUser,
    messages: Messages<'_>,
    store: &State<Store>,
) -> Page {
    // No recipient is chosen for the admin: "everyone" is a choice to make, not a default.
    let values = BroadcastValues {
        level: "stored_info".into(),
        ..Default::default()
    };
    broadcast_page(
        &messages,
        &admin.0,
        store,
        &values,
        &BroadcastErrors::default(),
        None,
        None,
    )
}

#[derive(Debug, FromForm)]
pub(super) struct BroadcastForm<'r> {
    level: &'r str,
    custom_level: Option<&'r str>,
    message: &'r str,
    extra_tags: Option<&'r str>,
    url: Option<&'r str>,
    recipients: Option<&'r str>,
    usernames: Option<&'r str>,
    action: Option<&'r str>,
    /// The count of users the admin said yes to, once asked before a broadcast to everyone
    /// (`yes`, from a script of one's own: whatever the count).
    confirmed: Option<&'r str>,
}

/// Usernames separated by commas, spaces or new lines, without duplicates, in order.
fn parse_usernames(raw: &str) -> Vec<String> {
    crate::users::recipient_names(raw.split([',', '\n', '\r', ' ', '\t']))
}

impl BroadcastValues {
    /// What the form sent, also when fields are missing or malformed (to show it again with
    /// the errors).
    fn from_form(form: &Contextual<'_, BroadcastForm<'_>>) -> BroadcastValues {
        match &form.value {
            Some(f) => BroadcastValues {
                level: f.level.to_string(),
                custom_level: f.custom_level.unwrap_or("").to_string(),
                message: f.message.to_string(),
                extra_tags: f.extra_tags.unwrap_or("").to_string(),
                url: f.url.unwrap_or("").to_string(),
                recipients: f.recipients.unwrap_or("").to_string(),
                usernames: f.usernames.unwrap_or("").to_string(),
            },
            None => {
                let field = |name: &str| form.context.field_value(name).unwrap_or("").to_string();
                BroadcastValues {
                    level: field("level"),
                    custom_level: field("custom_level"),
                    message: field("message"),
                    extra_tags: field("extra_tags"),
                    url: field("url"),
                    recipients: field("recipients"),
                    usernames: field("usernames"),
                }
            }
        }
    }

    /// The message the form describes, checking every field on its own so that all of
    /// their errors show at once. The level must be one of the store levels, by name or as
    /// a custom integer.
    fn message(&self, store: &Store, errors: &mut BroadcastErrors) -> Option<NewMessage> {
        let raw_level = if self.level == "custom" {
            self.custom_level.as_str()
        } else {
            self.level.as_str()
        };
        let level = match Level::parse(raw_level) {
            Ok(level) if store.config().is_store_level(level) => Some(level),
            Ok(level) => {
                errors.level = Some(format!("level {} is not a store level", level.0));
                None
            }
            Err(e) => {
                errors.level = Some(e.to_string());
                None
            }
        };
        let url = Some(self.url.trim()).filter(|u| !u.is_empty());
        if let Err(e) = NewMessage::parse(Level::INFO, &self.message, "", None, None) {
            errors.message = Some(e.to_string());
        }
        if let Err(e) = stored_messages::parse_extra_tags(&self.extra_tags) {
            errors.extra_tags = Some(e.to_string());
        }
        if let Some(Err(e)) = url.map(stored_messages::parse_url) {
            errors.url = Some(e.to_string());
        }
        match level {
            Some(l) if !errors.any() => {
                NewMessage::parse(l, &self.message, &self.extra_tags, url, None).ok()
            }
            _ => None,
        }
    }

    /// The named recipients (`None`: everyone). Every name must be a user.
    async fn named_audience(
        &self,
        users: &Users,
        errors: &mut BroadcastErrors,
    ) -> Option<Vec<UserId>> {
        match self.recipients.as_str() {
            "everyone" => None,
            "list" => {
                let names = parse_usernames(&self.usernames);
                if names.is_empty() {
                    errors.usernames = Some("enter at least one username".into());
                    return None;
                }
                match users.ids_by_names(&names).await {
                    Ok(ids) => Some(ids),
                    Err(UserError::Unknown(e)) => {
                        errors.usernames = Some(e.to_string());
                        None
                    }
                    Err(e) => {
                        log::error!(
                            "reference app: looking up recipients failed: {}",
                            report(&e)
                        );
                        errors.usernames =
                            Some("recipients could not be looked up right now".into());
                        None
                    }
                }
            }
            _ => {
                errors.usernames = Some("choose who receives it: everyone, or these users".into());
                None
            }
        }
    }

    /// How the audit names the audience.
    fn audience_label(&self) -> String {
        if self.recipients == "list" {
            parse_usernames(&self.usernames).join(", ")
        } else {
            "everyone".to_string()
        }
    }
}

/// What a broadcast handler works with.
struct Sending<'a, 'r> {
    admin: &'a User,
    messages: &'a Messages<'r>,
    store: &'a Store,
    jobs: &'a Jobs,
    values: &'a BroadcastValues,
}

impl Sending<'_, '_> {
    /// The form again, with `errors`, answered with `status`.
    fn again(&self, errors: &BroadcastErrors, status: Status) -> Page {
        broadcast_page(
            self.messages,
            self.admin,
            self.store,
            self.values,
            errors,
            None,
            None,
        )
        .status(status)
    }

    /// The form again, saying that nothing was sent and why.
    fn failed(&self, e: stored_messages::Error) -> Page {
        let words = crate::pages::failure_words(&e, "a broadcast");
        let errors = BroadcastErrors {
            message: Some(format!("Nothing was sent. {words}")),
            ..Default::default()
        };
        self.again(&errors, e.status())
    }

    /// Records the broadcast in the audit log (a failure is logged, not shown).
    async fn audit(&self, message: &Message, size: i64, took_ms: Option<i64>, job: Option<i64>) {
        let label = self.values.audience_label();
        let audit = Audit {
            actor: self.admin,
            message,
            audience: &label,
            audience_size: size,
            duration_ms: took_ms,
            job_id: job,
        };
        if let Err(e) = self.jobs.audit(audit).await {
            log::error!("reference app: audit failed: {}", report(&e));
        }
    }

    /// A large audience: the message is created once, then a job delivers it chunk by
    /// chunk (resumable); the admin follows it on the job's page.
    async fn in_background(
        &self,
        new: &NewMessage,
        named: Option<&[UserId]>,
    ) -> Result<Redirect, Page> {
        let message = self
            .store
            .backend()
            .create_message(new)
            .await
            .map_err(|e| self.failed(e))?;
        let job = self
            .jobs
            .queue(&message, self.admin.id, named)
            .await
            .map_err(|e| self.failed(stored_messages::backend::BackendError::Sql(e).into()))?;
        self.audit(&message, job.total, None, Some(job.id)).await;
        self.jobs.start();
        Ok(Redirect::to(format!("/admin/jobs/{}", job.id)))
    }

    /// A small audience: delivered at once, in one step.
    async fn now(&self, new: NewMessage, audience: &[UserId]) -> Result<Redirect, Page> {
        let started = Instant::now();
        let delivery = self
            .store
            .add_message_for(audience, new)
            .await
            .map_err(|e| self.failed(e))?;
        let elapsed = started.elapsed();
        self.audit(
            &delivery.message,
            audience.len() as i64,
            Some(elapsed.as_millis() as i64),
            None,
        )
        .await;
        let text = format!(
            "Sent to {} user{} in {:.1} ms.",
            delivery.recipients,
            if delivery.recipients == 1 { "" } else { "s" },
            elapsed.as_secs_f64() * 1000.0
        );
        let _ = self.messages.success(&text).await;
        Ok(Redirect::to(format!("/admin/broadcast#{NOTICE_ANCHOR}")))
    }
}

#[allow(clippy::too_many_arguments)]
#[post("/admin/broadcast", data = "<form>")]
pub(super) async fn broadcast_send(
    admin: AdminUser,
    form: Form<Contextual<'_, BroadcastForm<'_>>>,
    messages: Messages<'_>,
    store: &State<Store>,
    users: &State<Arc<Users>>,
    jobs: &State<Jobs>,
    threshold: &State<BackgroundThreshold>,
) -> Result<Redirect, Page> {
    let values = BroadcastValues::from_form(&form);
    let sending = Sending {
        admin: &admin.0,
        messages: &messages,
        store,
        jobs,
        values: &values,
    };
    let mut errors = BroadcastErrors::default();
    let new = values.message(store, &mut errors);
    let named = values.named_audience(users, &mut errors).await;
    let Some(new) = new.filter(|_| !errors.any()) else {
        return Err(sending.again(&errors, Status::UnprocessableEntity));
    };
    // The form again with the message as recipients will see it: after Preview, and as
    // the question before a broadcast to `confirm` users (everyone).
    let preview = |confirm: Option<Confirm>| {
        let shown =
            StreamMessage::stored(&new.clone().into_message(MessageId(0)), store.level_tags());
        let page = broadcast_page(
            &messages,
            &admin.0,
            store,
            &values,
            &errors,
            Some(vec![shown]),
            confirm,
        );
        Err(page)
    };
    // Only the Send button sends: Preview, no action or any other value shows the preview
    // (nothing is stored).
    if form.value.as_ref().and_then(|f| f.action) != Some("send") {
        return preview(None);
    }
    let unavailable = |e: crate::users::UserError, errors: &mut BroadcastErrors| {
        log::error!("reference app: listing users failed: {}", report(&e));
        errors.usernames = Some("the user list is unavailable right now".into());
    };
    // Everyone is counted, not listed: a background job reads the users chunk by chunk.
    let size = match &named {
        Some(ids) => ids.len(),
        None => match users.count().await {
            Ok(n) => usize::try_from(n).unwrap_or(usize::MAX),
            Err(e) => {
                unavailable(e, &mut errors);
                return Err(sending.again(&errors, Status::ServiceUnavailable));
            }
        },
    };
    // Everyone is asked for once more, with the exact count and the preview; nothing is
    // stored before the admin says yes, and the yes holds for that count only: when users
    // were added or removed since, the admin is asked again with the new count.
    if named.is_none() {
        let ask = |was: Option<usize>| preview(Some(Confirm { users: size, was }));
        match form.value.as_ref().and_then(|f| f.confirmed) {
            Some("yes") => {}
            Some(count) if count.parse::<usize>() == Ok(size) => {}
            Some(count) => return ask(count.parse().ok()),
            None => return ask(None),
        }
    }
    if size > threshold.0 {
        return sending.in_background(&new, named.as_deref()).await;
    }
    let audience = match named {
        Some(ids) => ids,
        None => match users.all_ids().await {
            Ok(ids) => ids,
            Err(e) => {
                unavailable(e, &mut errors);
                return Err(sending.again(&errors, Status::ServiceUnavailable));
            }
        },
    };
    sending.now(new, &audience).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_split_on_commas_spaces_and_lines() {
        assert_eq!(
            parse_usernames("alice, bob\ncarol\r\n\n bob ,"),
            ["alice", "bob", "carol"]
        );
        assert!(parse_usernames(" , \n").is_empty());
        // One user in several spellings is one recipient, named in its own spelling.
        assert_eq!(parse_usernames("alice, ALICE Alice,Bob"), ["alice", "bob"]);
    }
}
