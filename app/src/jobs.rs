//! Broadcast jobs and the audit trail of the reference app.
//!
//! A broadcast whose audience is larger than `admin.background_threshold` users becomes a
//! job: the message is created once, then delivered chunk by chunk with
//! [`Store::deliver_once`], the job's cursor (last user id done) saved after each chunk. On
//! the SQL backend a chunk of consecutive user ids is stored as a run, as
//! `broadcast_message` stores it, so a job to a million users writes a few rows. A
//! restart resumes every running job from its cursor; since `deliver_once` skips users who
//! already have the message, a chunk that was delivered but not yet recorded is never
//! delivered twice. A chunk that fails stops the job as `failed`, with what was delivered;
//! an admin can resume it.
//!
//! Several instances share the jobs table: an instance works on a job only while it holds
//! the job's lease ([`LEASE`], renewed after every chunk). Claiming is one conditional
//! `update`, so two instances never hold one job; an instance that dies stops renewing, and
//! another takes the job over once the lease expired (its worker looks every [`POLL`]),
//! from the recorded cursor. Every instance's admin pages read the progress from the table.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rocket::tokio::sync::Notify;
use serde::Serialize;

use crate::users::Users;
use stored_messages::backend::micros;
use stored_messages::report;
use stored_messages::Store;
use stored_messages::{Message, UserId};

/// Users per chunk of a background broadcast, unless `admin.broadcast_chunk` says otherwise.
pub const CHUNK: i64 = 5_000;
/// How long a job's lease lasts without renewal: after that, another instance may take the
/// job over.
pub const LEASE: Duration = Duration::from_secs(15);
/// How often an idle worker looks for jobs it can take (new ones wake it at once).
pub const POLL: Duration = Duration::from_secs(5);

/// A background broadcast.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Job {
    /// Id.
    pub id: i64,
    /// The message being delivered.
    pub message_id: i64,
    /// The message itself (JSON), so the job can resume without looking it up.
    pub message: String,
    /// Who sent it.
    pub created_by: i64,
    /// When (µs).
    pub created_us: i64,
    /// `everyone` or `list`.
    pub audience: String,
    /// For `everyone`: the largest user id when it was sent.
    pub max_user_id: i64,
    /// For `list`: the user ids, a JSON array.
    pub user_ids: String,
    /// Audience size.
    pub total: i64,
    /// Users who have it so far (delivered by this job, before or after an interruption).
    pub delivered: i64,
    /// Last user id done.
    pub cursor: i64,
    /// `running`, `done` or `failed`.
    pub status: String,
    /// Why it failed.
    pub error: Option<String>,
    /// When it ended (µs).
    pub finished_us: Option<i64>,
}

/// One audit entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct AuditEntry {
    /// Id.
    pub id: i64,
    /// Who (user id).
    pub actor_id: i64,
    /// Who (username).
    pub actor: String,
    /// When (µs).
    pub at_us: i64,
    /// The level.
    pub level: i64,
    /// The text.
    pub message: String,
    /// `everyone` or the usernames.
    pub audience: String,
    /// How many users.
    pub audience_size: i64,
    /// The stored message.
    pub message_id: i64,
    /// How long the delivery took (set when it ended).
    pub duration_ms: Option<i64>,
    /// The background job, if any.
    pub job_id: Option<i64>,
}

/// What an audit entry records.
pub struct Audit<'a> {
    /// Who.
    pub actor: &'a crate::users::User,
    /// The message.
    pub message: &'a Message,
    /// `everyone` or the usernames.
    pub audience: &'a str,
    /// How many users.
    pub audience_size: i64,
    /// How long it took, when it is done.
    pub duration_ms: Option<i64>,
    /// The job, for a background broadcast.
    pub job_id: Option<i64>,
}

/// Jobs and audit, over the app's database; wakes the worker when a job is queued.
#[derive(Debug, Clone)]
pub struct Jobs {
    users: Arc<Users>,
    wake: Arc<Notify>,
    /// This instance's name in the leases it holds.
    owner: Arc<str>,
    /// Users per chunk.
    chunk: i64,
    /// A pause after each chunk, to leave the database to requests.
    pause: Duration,
}

const JOB_COLUMNS: &str =
    "id, message_id, message, created_by, created_us, audience, max_user_id, user_ids, \
                           total, delivered, cursor, status, error, finished_us";

impl Jobs {
    /// Jobs over the users database.
    pub fn new(users: Arc<Users>) -> Jobs {
        Jobs {
            users,
            wake: Arc::new(Notify::new()),
            owner: stored_messages::changes::instance_name().into(),
            chunk: CHUNK,
            pause: Duration::ZERO,
        }
    }

    /// Delivers `chunk` users at a time (at least 1), pausing `pause` after each chunk: a
    /// slower broadcast that leaves the database to requests (`admin.broadcast_chunk`,
    /// `admin.broadcast_pause_ms`).
    pub fn paced(mut self, chunk: i64, pause: Duration) -> Jobs {
        self.chunk = chunk.max(1);
        self.pause = pause;
        self
    }

    /// Records an audit entry; returns its id.
    pub async fn audit(&self, entry: Audit<'_>) -> Result<i64, sqlx::Error> {
        let sql = "insert into app_audit (actor_id, actor, at_us, level, message, audience, audience_size, \
                   message_id, duration_ms, job_id) values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) returning id";
        let ids: Vec<i64> = with_pool!(self.users.pool(), pool => sqlx::query_scalar(sql)
            .bind(entry.actor.id)
            .bind(&entry.actor.username)
            .bind(micros(Utc::now()))
            .bind(i64::from(entry.message.level.0))
            .bind(&entry.message.message)
            .bind(entry.audience)
            .bind(entry.audience_size)
            .bind(entry.message.id.0)
            .bind(entry.duration_ms)
            .bind(entry.job_id)
            .fetch_all(pool)
            .await?);
        ids.first().copied().ok_or(sqlx::Error::RowNotFound)
    }

    /// The newest audit entries.
    pub async fn audit_list(&self, limit: i64) -> Result<Vec<AuditEntry>, sqlx::Error> {
        self.audit_page(None, limit).await
    }

    /// At most `limit` audit entries older than entry `before` (from the newest without it),
    /// newest first: a page of the audit log, read by primary key.
    pub async fn audit_page(
        &self,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, sqlx::Error> {
        let sql = "select id, actor_id, actor, at_us, level, message, audience, audience_size, message_id, \
                   duration_ms, job_id from app_audit where id < $1 order by id desc limit $2";
        let before = before.unwrap_or(i64::MAX);
        Ok(
            with_pool!(self.users.pool(), pool => sqlx::query_as(sql).bind(before).bind(limit).fetch_all(pool).await?),
        )
    }

    /// Wakes the worker: a queued job starts.
    pub fn start(&self) {
        self.wake.notify_one();
    }

    /// Queues a job for `message` to `audience`; it runs once [`Jobs::start`] wakes the
    /// worker (after the caller recorded its audit entry), or at the next start of the app.
    pub async fn queue(
        &self,
        message: &Message,
        created_by: i64,
        list: Option<&[UserId]>,
    ) -> Result<Job, sqlx::Error> {
        // The audience of "everyone" and its size, from one snapshot of the users table.
        let (max_user_id, everyone): (i64, i64) = with_pool!(self.users.pool(), pool =>
            sqlx::query_as("select coalesce(max(id), 0), count(*) from app_users").fetch_one(pool).await?);
        let total = list.map_or(everyone, |ids| ids.len() as i64);
        let (audience, ids) = match list {
            Some(ids) => (
                "list",
                serde_json::to_string(&ids.iter().map(|u| u.0).collect::<Vec<_>>())
                    .unwrap_or_default(),
            ),
            None => ("everyone", "[]".to_string()),
        };
        let sql = format!(
            "insert into app_broadcast_jobs (message_id, message, created_by, created_us, audience, max_user_id, \
             user_ids, total, status) values ($1, $8, $2, $3, $4, $5, $6, $7, 'running') returning {JOB_COLUMNS}"
        );
        let jobs: Vec<Job> = with_pool!(self.users.pool(), pool => sqlx::query_as(&sql)
            .bind(message.id.0)
            .bind(created_by)
            .bind(micros(Utc::now()))
            .bind(audience)
            .bind(max_user_id)
            .bind(ids)
            .bind(total)
            .bind(serde_json::to_string(message).unwrap_or_default())
            .fetch_all(pool)
            .await?);
        jobs.into_iter().next().ok_or(sqlx::Error::RowNotFound)
    }

    /// One job.
    pub async fn get(&self, id: i64) -> Result<Option<Job>, sqlx::Error> {
        let sql = format!("select {JOB_COLUMNS} from app_broadcast_jobs where id = $1");
        Ok(
            with_pool!(self.users.pool(), pool => sqlx::query_as(&sql).bind(id).fetch_optional(pool).await?),
        )
    }

    /// The newest jobs.
    pub async fn recent(&self, limit: i64) -> Result<Vec<Job>, sqlx::Error> {
        self.page(None, limit).await
    }

    /// At most `limit` jobs older than job `before` (from the newest without it), newest
    /// first: a page of the jobs list, read by primary key.
    pub async fn page(&self, before: Option<i64>, limit: i64) -> Result<Vec<Job>, sqlx::Error> {
        let sql = format!(
            "select {JOB_COLUMNS} from app_broadcast_jobs where id < $1 order by id desc limit $2"
        );
        let before = before.unwrap_or(i64::MAX);
        Ok(
            with_pool!(self.users.pool(), pool => sqlx::query_as(&sql).bind(before).bind(limit).fetch_all(pool).await?),
        )
    }

    /// Until when job `id`'s lease runs (µs), if anyone holds it.
    pub async fn lease_until(&self, id: i64) -> Result<Option<i64>, sqlx::Error> {
        let sql = "select lease_until_us from app_broadcast_jobs where id = $1";
        let (until,): (Option<i64>,) = with_pool!(self.users.pool(), pool =>
            sqlx::query_as(sql).bind(id).fetch_one(pool).await?);
        Ok(until)
    }

    /// Sets a failed job running again; `false` if it was not failed.
    pub async fn resume(&self, id: i64) -> Result<bool, sqlx::Error> {
        let sql = "update app_broadcast_jobs set status = 'running', error = null, \
                   lease_owner = null, lease_until_us = null where id = $1 and status = 'failed'";
        let n = with_pool!(self.users.pool(), pool => sqlx::query(sql).bind(id).execute(pool).await?.rows_affected());
        self.wake.notify_one();
        Ok(n == 1)
    }

    /// Takes the lease of the oldest running job nobody holds (or whose holder stopped
    /// renewing it), if there is one.
    async fn claim(&self) -> Result<Option<Job>, sqlx::Error> {
        let now = micros(Utc::now());
        let until = now + LEASE.as_micros() as i64;
        // The condition is checked again on the row itself: of two instances that picked
        // the same job, the second updates nothing.
        let sql = format!(
            "update app_broadcast_jobs set lease_owner = $1, lease_until_us = $2 \
             where id = (select id from app_broadcast_jobs where status = 'running' \
                         and (lease_until_us is null or lease_until_us < $3) order by id limit 1) \
             and status = 'running' and (lease_until_us is null or lease_until_us < $3) \
             returning {JOB_COLUMNS}"
        );
        let jobs: Vec<Job> = with_pool!(self.users.pool(), pool => sqlx::query_as(&sql)
            .bind(&*self.owner)
            .bind(until)
            .bind(now)
            .fetch_all(pool)
            .await?);
        Ok(jobs.into_iter().next())
    }

    /// The next chunk of a job's audience after its cursor.
    async fn next_chunk(&self, job: &Job) -> Result<Vec<UserId>, sqlx::Error> {
        if job.audience == "list" {
            let ids: Vec<i64> = serde_json::from_str(&job.user_ids).unwrap_or_default();
            let mut ids: Vec<i64> = ids.into_iter().filter(|id| *id > job.cursor).collect();
            ids.sort_unstable();
            ids.truncate(usize::try_from(self.chunk).unwrap_or(usize::MAX));
            return Ok(ids.into_iter().map(UserId).collect());
        }
        let sql = "select id from app_users where id > $1 and id <= $2 order by id limit $3";
        let ids: Vec<i64> = with_pool!(self.users.pool(), pool => sqlx::query_scalar(sql)
            .bind(job.cursor)
            .bind(job.max_user_id)
            .bind(self.chunk)
            .fetch_all(pool)
            .await?);
        Ok(ids.into_iter().map(UserId).collect())
    }

    /// Records progress and renews the lease; `false` when this instance no longer holds
    /// it (it stalled past [`LEASE`] and another took over): then it must stop.
    async fn record(&self, job: &Job, cursor: i64, delivered: i64) -> Result<bool, sqlx::Error> {
        let until = micros(Utc::now()) + LEASE.as_micros() as i64;
        let sql = "update app_broadcast_jobs set cursor = $2, delivered = $3, lease_until_us = $4 \
                   where id = $1 and lease_owner = $5";
        let n = with_pool!(self.users.pool(), pool => sqlx::query(sql).bind(job.id).bind(cursor).bind(delivered).bind(until).bind(&*self.owner).execute(pool).await?.rows_affected());
        Ok(n == 1)
    }

    async fn finish(
        &self,
        job: &Job,
        status: &str,
        error: Option<String>,
    ) -> Result<(), sqlx::Error> {
        let now = micros(Utc::now());
        // The audit entry first: once the job says it ended, its duration is recorded.
        let duration_ms = (now - job.created_us) / 1000;
        let sql = "update app_audit set duration_ms = $2 where job_id = $1";
        with_pool!(self.users.pool(), pool => sqlx::query(sql).bind(job.id).bind(duration_ms).execute(pool).await?.rows_affected());
        let sql = "update app_broadcast_jobs set status = $2, error = $3, finished_us = $4, \
                   lease_owner = null, lease_until_us = null where id = $1";
        with_pool!(self.users.pool(), pool => sqlx::query(sql).bind(job.id).bind(status).bind(&error).bind(now).execute(pool).await?.rows_affected());
        Ok(())
    }

    /// Claims the oldest job this instance may work on and runs it to its end (done, failed,
    /// or taken over); `false` when there was none to claim.
    pub async fn run_next(&self, store: &Store) -> Result<bool, sqlx::Error> {
        match self.claim().await? {
            Some(job) => {
                self.run(store, job).await;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Runs one claimed job to its end (done or failed), or until another instance took it
    /// over.
    async fn run(&self, store: &Store, mut job: Job) {
        let message: Message = match serde_json::from_str(&job.message) {
            Ok(message) => message,
            Err(e) => {
                return self
                    .fail(&job, format!("unreadable job message: {e}"))
                    .await
            }
        };
        loop {
            let chunk = match self.next_chunk(&job).await {
                Ok(chunk) => chunk,
                Err(e) => return self.fail(&job, report(&e)).await,
            };
            let Some(last) = chunk.last().copied() else {
                if let Err(e) = self.finish(&job, "done", None).await {
                    log::error!(
                        "reference app: finishing job {} failed: {}",
                        job.id,
                        report(&e)
                    );
                }
                log::info!(
                    "reference app: broadcast job {} delivered to {} users",
                    job.id,
                    job.delivered
                );
                return;
            };
            match store.deliver_once(&chunk, &message).await {
                Ok(added) => {
                    job.cursor = last.0;
                    // Users covered, whether this chunk added it or an interrupted run did.
                    let _ = added;
                    job.delivered += chunk.len() as i64;
                    match self.record(&job, job.cursor, job.delivered).await {
                        Ok(true) => {}
                        Ok(false) => {
                            log::warn!(
                                "reference app: broadcast job {} was taken over by another instance",
                                job.id
                            );
                            return;
                        }
                        Err(e) => return self.fail(&job, report(&e)).await,
                    }
                }
                Err(e) => return self.fail(&job, report(&e)).await,
            }
            if self.pause.is_zero() {
                rocket::tokio::task::yield_now().await;
            } else {
                rocket::tokio::time::sleep(self.pause).await;
            }
        }
    }

    async fn fail(&self, job: &Job, why: String) {
        log::error!(
            "reference app: broadcast job {} failed after {} users: {why}",
            job.id,
            job.delivered
        );
        if let Err(e) = self.finish(job, "failed", Some(why)).await {
            log::error!(
                "reference app: recording the failure of job {} failed: {}",
                job.id,
                report(&e)
            );
        }
    }

    /// Runs the jobs this instance can claim, one at a time, then waits for new ones (or
    /// for a lease to expire), until shutdown.
    pub async fn worker(self, store: Store, mut shutdown: rocket::Shutdown) {
        loop {
            loop {
                match self.claim().await {
                    Ok(Some(job)) => {
                        let id = job.id;
                        log::info!("reference app: working on broadcast job {id}");
                        rocket::tokio::select! {
                            _ = self.run(&store, job) => {}
                            _ = &mut shutdown => {
                                // The lease lapses; another instance (or this one after a
                                // restart) goes on from the cursor.
                                return;
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        log::error!(
                            "reference app: claiming a broadcast job failed: {}",
                            report(&e)
                        );
                        break;
                    }
                }
            }
            rocket::tokio::select! {
                _ = self.wake.notified() => {}
                _ = rocket::tokio::time::sleep(POLL) => {}
                _ = &mut shutdown => break,
            }
        }
    }
}
