//! Background broadcasts: their list, a job's page, its status (polled by admin.js) and its
//! resumption.

use rocket::http::Status;
use rocket::response::Redirect;
use rocket::serde::json::{json, Json, Value};
use rocket::State;
use rocket_dyn_templates::context;
use stored_messages::report;
use stored_messages::template::Page;
use stored_messages::Messages;

use super::AdminUser;
use crate::jobs::{Job, Jobs};
use crate::paging::{cut_page, is_id, Trail};

/// Background broadcasts a page.
const JOBS_PAGE: i64 = 25;

/// Every background broadcast, newest first, a page at a time both ways.
#[get("/admin/jobs?<from>&<back>")]
pub(super) async fn job_list(
    admin: AdminUser,
    messages: Messages<'_>,
    jobs: &State<Jobs>,
    from: Option<&str>,
    back: Option<&str>,
) -> Result<Page, Status> {
    let trail = Trail::parse(from, back, is_id).ok_or(Status::BadRequest)?;
    let before = trail.from.parse::<i64>().ok();
    let mut jobs = jobs.page(before, JOBS_PAGE + 1).await.map_err(|e| {
        log::error!(
            "reference app: listing broadcast jobs failed: {}",
            report(&e)
        );
        Status::ServiceUnavailable
    })?;
    let next = cut_page(&mut jobs, JOBS_PAGE as usize, |j| j.id.to_string());
    let rows: Vec<Value> = jobs.iter().map(job_row).collect();
    Ok(Page::render(
        "admin/jobs",
        context! {
            messages: messages.flash(), here: "admin", user: &admin.0, jobs: rows,
            first: trail.is_first(), pages: trail.links(next),
        },
    ))
}

#[get("/admin/jobs/<id>")]
pub(super) async fn job_page(
    admin: AdminUser,
    id: i64,
    messages: Messages<'_>,
    jobs: &State<Jobs>,
) -> Result<Page, Status> {
    let job = jobs
        .get(id)
        .await
        .map_err(|_| Status::ServiceUnavailable)?
        .ok_or(Status::NotFound)?;
    let stalled = job.status == "running" && is_unattended(jobs, &job).await;
    // What is being sent, and to whom, from the job's own copy of the message.
    let message: Option<stored_messages::Message> = serde_json::from_str(&job.message).ok();
    let audience = if job.audience == "list" {
        "the users named in the form"
    } else {
        "everyone"
    };
    Ok(Page::render(
        "admin/job",
        context! {
            messages: messages.flash(), here: "admin", user: &admin.0,
            status_label: status_label(&job.status),
            error: job_error(&job),
            job,
            text: message.as_ref().map(|m| m.message.as_str()),
            level_label: message.as_ref().map(|m| m.level.label()),
            audience,
            stalled,
        },
    ))
}

/// Whether a running job has had no worker for a while: its lease (which a working
/// instance renews with every chunk) lapsed, or it was never taken, longer than a worker
/// takes to notice. The page then says it may be stuck even without JavaScript.
async fn is_unattended(jobs: &Jobs, job: &Job) -> bool {
    match jobs.lease_until(job.id).await {
        Ok(lease) => {
            let now = stored_messages::backend::micros(chrono::Utc::now());
            unattended(lease, job.created_us, now)
        }
        Err(e) => {
            log::warn!(
                "reference app: reading the lease of job {} failed: {}",
                job.id,
                report(&e)
            );
            false
        }
    }
}

/// Whether a job whose lease ends at `lease` (µs; `None`: never taken) and that was
/// created at `created` has had no worker for longer than a worker takes to notice (a
/// lease, then a poll), at `now`.
fn unattended(lease: Option<i64>, created: i64, now: i64) -> bool {
    let grace = (crate::jobs::LEASE + crate::jobs::POLL).as_micros() as i64;
    lease.unwrap_or(created) + grace < now
}

/// A job's status in a word.
pub(super) fn status_label(status: &str) -> &'static str {
    match status {
        "running" => "Running",
        "done" => "Done",
        "failed" => "Failed",
        _ => "Unknown",
    }
}

/// A job as the overview's table shows it: what, when, how far.
pub(super) fn job_row(job: &Job) -> serde_json::Value {
    let message: Option<stored_messages::Message> = serde_json::from_str(&job.message).ok();
    let created = stored_messages::backend::from_micros(job.created_us);
    json!({
        "id": job.id,
        "status": job.status,
        "status_label": status_label(&job.status),
        "delivered": job.delivered,
        "total": job.total,
        "message": message.as_ref().map(|m| m.message.as_str()),
        "head": message.as_ref().and_then(|m| {
            stored_messages::StreamMessage::stored(m, &stored_messages::LevelTags::default()).head
        }),
        "date": created.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "date_text": created.format("%Y-%m-%d %H:%M UTC").to_string(),
    })
}

/// Why a job stopped, in words: the stored detail (a database's error text) is for the
/// log, where the worker wrote it under the job's id; the page names that id.
fn job_error(job: &Job) -> Option<String> {
    job.error.as_ref().map(|_| {
        format!(
            "Delivery stopped after {} users because of an error. The details are in the server log, under “broadcast job {}”.",
            job.delivered, job.id
        )
    })
}

#[get("/admin/jobs/<id>/status")]
pub(super) async fn job_status(
    _admin: AdminUser,
    id: i64,
    jobs: &State<Jobs>,
) -> Result<Json<Value>, Status> {
    let job = jobs
        .get(id)
        .await
        .map_err(|_| Status::ServiceUnavailable)?
        .ok_or(Status::NotFound)?;
    Ok(Json(json!({
        "id": job.id, "status": job.status, "status_label": status_label(&job.status),
        "total": job.total, "delivered": job.delivered, "error": job_error(&job),
    })))
}

#[post("/admin/jobs/<id>/resume")]
pub(super) async fn job_resume(
    _admin: AdminUser,
    id: i64,
    jobs: &State<Jobs>,
    messages: Messages<'_>,
) -> Result<Redirect, Status> {
    if matches!(jobs.get(id).await, Ok(None)) {
        return Err(Status::NotFound);
    }
    match jobs.resume(id).await {
        Ok(true) => {
            let _ = messages.info("The broadcast is running again.").await;
        }
        // A running job that makes no progress: its worker stopped renewing its lease (or
        // is stuck). Waking this instance's worker lets it take the job over as soon as
        // the lease lapses; it goes on from the last recorded user.
        Ok(false) if matches!(jobs.get(id).await, Ok(Some(job)) if job.status == "running") => {
            jobs.start();
            let _ = messages
                .info(&format!(
                    "Asked to go on: a server takes the broadcast over within {} seconds if its worker has stopped.",
                    crate::jobs::LEASE.as_secs() + crate::jobs::POLL.as_secs()
                ))
                .await;
        }
        Ok(false) => {
            let _ = messages
                .warning("Only a stopped or stuck broadcast can be resumed.")
                .await;
        }
        Err(e) => log::error!("reference app: resuming job {id} failed: {}", report(&e)),
    }
    Ok(Redirect::to(format!("/admin/jobs/{id}")))
}

#[cfg(test)]
mod tests {
    use super::unattended;

    #[test]
    fn a_job_is_unattended_once_its_lease_lapsed_for_longer_than_a_poll() {
        let second = 1_000_000;
        let now = 1_000 * second;
        // taken, lease still running or just lapsed: attended
        assert!(!unattended(Some(now + 10 * second), 0, now));
        assert!(!unattended(Some(now - 5 * second), 0, now));
        // lapsed for a minute: nobody works on it
        assert!(unattended(Some(now - 60 * second), 0, now));
        // never taken: judged from its creation
        assert!(!unattended(None, now - 2 * second, now));
        assert!(unattended(None, now - 60 * second, now));
    }
}
