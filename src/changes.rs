//! The change feed: which users' inboxes changed, in any process sharing the store.
//!
//! Every write that changes inboxes is announced by the backend itself, from inside the
//! writing transaction or script: PostgreSQL `NOTIFY`, Redis `PUBLISH`, a row in SQLite's
//! `sm_changes` log. So a write by this process, by the CLI or by another app instance is
//! reported the same way, and a [`ChangeFeed`] reports all of them as [`Change`]s:
//!
//! - [`ChangeFeed::subscribe`] gives a [`ChangeReceiver`], for code that reacts to changes
//!   (live pages, a host's own cache). A receiver that falls behind, or a feed that lost its
//!   connection, gets [`Change::All`]: "re-read what you show", never a silent gap.
//! - [`ChangeFeed::sync`] is a barrier: it returns once every change committed before the
//!   call, in any process, has been applied to caches. The inbox cache calls it before it trusts an
//!   entry, which is what makes a cached read exactly as fresh as a query (see
//!   [`crate::backend::cache`]).
//!
//! # How the barrier works
//!
//! The feed asks the backend for a *sync*, and the backend reports it done once every
//! change committed before it began has been reported:
//! - **PostgreSQL**: a second listening connection sends a bare `Sync` message; PostgreSQL
//!   sends an idle listening session its pending notifications before any `ReadyForQuery`,
//!   and a writer has signalled every listener before its commit returns.
//! - **Redis**: a `PING` on the subscribed connection; Redis runs one command at a time and
//!   writes to a connection in the order it ran the commands, so every change published
//!   before the `PING` ran has arrived ahead of its reply.
//! - **SQLite**: the feed reads the `sm_changes` log, which sees every commit that came
//!   before the read.
//!
//! The sync begins after the caller asked, hence after every write that had returned by
//! then.
//!
//! One sync serves every caller that was waiting when it began: callers that arrive while a
//! sync is out wait for the next one, which begins as soon as the first is done. Before a
//! sync begins, the feed's task lets the tasks that are ready to run go first (one yield to
//! the scheduler), so requests just read from their sockets join it rather than wait for the
//! one after. Under load a sync therefore costs one round trip per batch of requests, not
//! per request.
//!
//! # Recent syncs, and why PostgreSQL and Redis writes wait
//!
//! Waiting for a sync costs every cached read a round trip's wait. On PostgreSQL and Redis,
//! every write that changes inboxes (and every [`ChangeFeed::announce`]) waits instead:
//! once the store has acknowledged it, the write sleeps [`COMMIT_WAIT`] (1.6 ms) before it
//! returns to its caller, in whatever process it runs, since the backend's own code does it.
//! (A thread of this module's own times that sleep: tokio's timer fires on whole
//! milliseconds and would make it a millisecond longer on average.) A read then trusts any
//! sync that came back and began less than [`RECENT_SYNC`] (1.5 ms) before the read
//! checks, without a round trip of its own: a write that had returned
//! before the read started was acknowledged at least 1.6 ms before that, so before the sync
//! began, and its change was applied. Under load, reads keep such a sync at hand: one that
//! finds the last sync older than 0.5 ms asks for the next one without waiting for it. A
//! read that finds no recent sync (an idle process, a slow store) waits for one as above.
//!
//! Two clocks are compared only through durations of a few milliseconds, each measured on
//! its own machine: the writer's sleep on its monotonic clock (which, if anything, runs slow,
//! so it sleeps longer), the sync's age on Linux's `CLOCK_BOOTTIME`, which keeps counting
//! while a machine is suspended. Elsewhere reads always wait for a sync of their own.
//! SQLite needs none of this: its feed catches up without a round trip, so its writers do
//! not wait. A process that writes to the store with code of its own (not through a
//! backend of this crate) must announce its changes and wait as well; see
//! [`ChangeFeed::announce`].
//!
//! While the feed is down (no connection, or a sync that did not come back within
//! [`SYNC_TIMEOUT`]), [`ChangeFeed::sync`] answers `false` at once and [`ChangeFeed::is_live`]
//! is `false`: callers must then read the store itself. The backend reconnects by itself,
//! and reports [`Change::All`] when it is back, since it may have missed changes meanwhile.
//!
//! This module owns the bookkeeping; each backend owns its transport (`watch_changes` in
//! `backend::sql` and `backend::redis`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use rocket::tokio::sync::{broadcast, oneshot, watch, Notify};

use crate::backend::MessageBackend;
use crate::message::UserId;

/// The most user ids one announcement (a notification, a published message, a log row)
/// names: a write to more users is announced in several, each naming up to this many, sent
/// together by the writing transaction or script.
pub const MANY_USERS: usize = 256;

/// A write to more users than this is announced as [`Change::All`] rather than by naming
/// them: caches then drop everything instead of that many entries, and every live stream
/// reads its inbox once. Up to this many, only the users named are concerned.
pub const LISTED_USERS: usize = 4096;

/// How long [`ChangeFeed::sync`] waits for the backend's marker before it gives up, declares
/// the feed down and has it reconnect.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(1);

/// How long every write to a store whose syncs take a round trip (PostgreSQL, Redis) waits,
/// once the store has acknowledged it, before it returns to its caller. Each process keeps
/// its syncs recent under load, and a read that starts less than [`RECENT_SYNC`] after a
/// sync began trusts that sync instead of waiting for a new one: every write that had
/// returned by then was acknowledged at least `COMMIT_WAIT` earlier, so before the sync
/// began, so its change was applied (see the module docs).
pub const COMMIT_WAIT: Duration = Duration::from_micros(1600);

/// How recent a sync must have begun for a read to trust it without waiting, where writers
/// wait [`COMMIT_WAIT`]. `COMMIT_WAIT` need only be as long; the 0.1 ms more is a margin a
/// hundred times the drift of two machines' clocks over those 1.6 ms (both measure in
/// SI seconds, corrected to within 500 parts per million).
pub const RECENT_SYNC: Duration = Duration::from_micros(1500);

/// A sync that began longer ago than this is renewed in the background by the next read
/// that trusts it, so that reads under load keep finding a recent one.
const RENEW_SYNC: Duration = Duration::from_micros(500);

/// How many changes a [`ChangeReceiver`] may fall behind before it gets [`Change::All`]
/// instead of what it missed.
const BACKLOG: usize = 4096;

/// What changed, as a backend's change feed reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The inboxes of these users changed (sorted, each once).
    Users(Arc<[UserId]>),
    /// Any inbox may have changed: a cleanup, a deleted message, a write to very many users,
    /// or a feed that may have missed changes.
    All,
}

impl Change {
    /// The change for `users` (any order, repeats allowed): [`Change::All`] beyond
    /// [`LISTED_USERS`].
    pub fn users(users: &[UserId]) -> Change {
        if users.len() > LISTED_USERS {
            return Change::All;
        }
        let mut users = users.to_vec();
        users.sort_unstable();
        users.dedup();
        Change::Users(users.into())
    }

    /// Whether the change may concern `user`.
    pub fn concerns(&self, user: UserId) -> bool {
        match self {
            Change::Users(users) => users.binary_search(&user).is_ok(),
            Change::All => true,
        }
    }

    /// How backends write a change into one notification or log row: user ids separated by
    /// commas, or `*` for [`Change::All`] (and beyond [`MANY_USERS`] ids). A write to more
    /// users announces [`Change::payloads`] instead.
    pub fn payload(users: &[i64]) -> String {
        if users.len() > MANY_USERS {
            return "*".to_string();
        }
        let ids: Vec<String> = users.iter().map(i64::to_string).collect();
        ids.join(",")
    }

    /// The announcements of a write to `users`, all sent by the same transaction or script:
    /// [`Change::payload`]s of up to [`MANY_USERS`] ids each, or one `*` beyond
    /// [`LISTED_USERS`] ids. One (empty) payload for nobody.
    pub fn payloads(users: &[i64]) -> Vec<String> {
        if users.len() > LISTED_USERS {
            return vec!["*".to_string()];
        }
        if users.is_empty() {
            return vec![String::new()];
        }
        users.chunks(MANY_USERS).map(Change::payload).collect()
    }

    /// This change as one payload (see [`Change::payload`]): `*` beyond [`MANY_USERS`]
    /// users.
    pub fn to_payload(&self) -> String {
        match self {
            Change::Users(users) => Change::payload(&users.iter().map(|u| u.0).collect::<Vec<_>>()),
            Change::All => "*".to_string(),
        }
    }

    /// This change as the payloads that name every user of it (see [`Change::payloads`]).
    pub fn to_payloads(&self) -> Vec<String> {
        match self {
            Change::Users(users) => {
                Change::payloads(&users.iter().map(|u| u.0).collect::<Vec<_>>())
            }
            Change::All => vec!["*".to_string()],
        }
    }

    /// Reads a payload written by [`Change::payload`] (empty: nobody); anything else counts
    /// as [`Change::All`].
    pub fn parse(payload: &str) -> Change {
        if payload.trim().is_empty() {
            return Change::Users(Arc::from([]));
        }
        let ids: Option<Vec<UserId>> = payload
            .split(',')
            .map(|id| id.trim().parse().ok().map(UserId))
            .collect();
        ids.map_or(Change::All, |ids| Change::users(&ids))
    }
}

/// A random name for this process: 16 lowercase letters and digits.
pub fn instance_name() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..16)
        .map(|_| char::from(CHARS[rng.gen_range(0..CHARS.len())]))
        .collect()
}

/// See [`FeedSink::set_quick_check`].
type QuickCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// A callback run on the feed's task for each change, before any sync that follows it
/// returns: how the inbox cache drops entries in time.
pub type Hook = Box<dyn Fn(&Change) + Send + Sync>;

/// Barrier bookkeeping: syncs are numbered; at most one is out at a time.
#[derive(Debug, Default)]
struct Syncs {
    /// The last sync asked for.
    requested: u64,
    /// The last sync the backend was told to send.
    issued: u64,
    /// The last sync that came back.
    done: u64,
    /// Someone arrived while a sync was out and waits for the next one.
    again: bool,
    /// The backend should drop its connection and start over.
    reconnect: bool,
    /// When the oldest sync not yet done was asked for (for the watchdog).
    waiting_since: Option<Instant>,
    /// When the sync out was handed to the backend (at or before it began).
    issued_at: Option<Instant>,
    /// The same moment on [`boot_clock`].
    issued_boot: Option<u64>,
    /// The sync asked for renews a recent one, and nobody waits for it: it begins at once,
    /// without letting other requests join first.
    renewal: bool,
}

impl Syncs {
    /// Asks for the next sync and wakes the feed's task; `renewal` when nobody waits for it.
    /// Returns the sync's number.
    fn ask(&mut self, wake: &Notify, renewal: bool) -> u64 {
        self.requested += 1;
        self.renewal = renewal;
        self.waiting_since = Some(Instant::now());
        wake.notify_one();
        self.requested
    }
}

/// What sync waiters watch: the last sync done, and an epoch that changes whenever the
/// syncs out can no longer come back (the feed went down).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Progress {
    done: u64,
    epoch: u64,
    /// When the last sync that came back was handed to the backend: every change committed
    /// before that moment has been applied. `None` after a sync failed or the feed fell.
    began: Option<Instant>,
}

struct Shared {
    name: &'static str,
    live: AtomicBool,
    syncs: Mutex<Syncs>,
    progress: watch::Sender<Progress>,
    /// Wakes the backend's task when a sync or a reconnection is wanted (shared with the
    /// sink, which must not keep the feed alive while it waits).
    wake: Arc<Notify>,
    hooks: Mutex<Vec<Hook>>,
    /// The backend's way to vouch, without a round trip, that nothing changed since its
    /// last complete report (see [`FeedSink::set_quick_check`]).
    quick_check: std::sync::RwLock<Option<QuickCheck>>,
    /// When a quick check last vouched for everything committed before it, and in which
    /// epoch (see [`ChangeFeed::sync_since`]).
    quick_at: Mutex<Option<(Instant, u64)>>,
    /// Whether every write to the store waits [`COMMIT_WAIT`] before it returns (see
    /// [`FeedSink::writers_wait`]).
    writers_wait: AtomicBool,
    /// When the last sync that came back was handed to the backend, on [`boot_clock`]; 0
    /// after a sync failed or the feed fell.
    recent: AtomicU64,
    changes: broadcast::Sender<Change>,
    /// Counts what the feed reported (changes and state changes), for tests to wait on.
    reports: watch::Sender<u64>,
    /// Dropped with the feed, which ends the backend's task.
    stop: watch::Sender<()>,
    started: AtomicBool,
}

impl Shared {
    fn syncs(&self) -> MutexGuard<'_, Syncs> {
        self.syncs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the hooks (the inbox cache) for `change`.
    fn apply(&self, change: &Change) {
        for hook in self.hooks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            hook(change);
        }
    }

    fn report(&self, change: &Change) {
        self.apply(change);
        // No receiver is not an error: nobody listens yet.
        let _ = self.changes.send(change.clone());
        self.reports.send_modify(|n| *n += 1);
    }

    /// Every sync out fails: their markers may never come back.
    fn abandon_syncs(&self) {
        self.recent.store(0, Ordering::SeqCst);
        let mut syncs = self.syncs();
        syncs.done = syncs.requested;
        syncs.issued = syncs.requested;
        syncs.again = false;
        syncs.renewal = false;
        syncs.waiting_since = None;
        self.progress.send_modify(|p| {
            p.done = syncs.done;
            p.epoch += 1;
            p.began = None;
        });
    }
}

/// A store's change feed; see the module docs. Cheap to clone.
#[derive(Clone)]
pub struct ChangeFeed {
    shared: Arc<Shared>,
    backend: Arc<dyn MessageBackend>,
}

impl std::fmt::Debug for ChangeFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeFeed")
            .field("backend", &self.shared.name)
            .field("live", &self.is_live())
            .finish_non_exhaustive()
    }
}

impl ChangeFeed {
    /// The feed of `backend`. Nothing runs until [`ChangeFeed::start`].
    pub fn new(backend: Arc<dyn MessageBackend>) -> ChangeFeed {
        let shared = Shared {
            name: backend.name(),
            live: AtomicBool::new(false),
            syncs: Mutex::new(Syncs::default()),
            progress: watch::channel(Progress::default()).0,
            wake: Arc::new(Notify::new()),
            hooks: Mutex::new(Vec::new()),
            quick_check: std::sync::RwLock::new(None),
            quick_at: Mutex::new(None),
            writers_wait: AtomicBool::new(false),
            recent: AtomicU64::new(0),
            changes: broadcast::channel(BACKLOG).0,
            reports: watch::channel(0).0,
            stop: watch::channel(()).0,
            started: AtomicBool::new(false),
        };
        ChangeFeed {
            shared: Arc::new(shared),
            backend,
        }
    }

    /// Starts the backend's feed on the current Tokio runtime, once (later calls do
    /// nothing). It runs until every clone of this feed is dropped, or the runtime stops.
    /// Without a runtime, or for a backend that has no feed, the feed stays down.
    pub fn start(&self) {
        let Ok(runtime) = rocket::tokio::runtime::Handle::try_current() else {
            log::warn!("stored-messages: no async runtime yet, the change feed waits for one");
            return;
        };
        if self.shared.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let sink = FeedSink::new(&self.shared);
        runtime.spawn(ChangeFeed::watchdog(Arc::downgrade(&self.shared)));
        let backend = Arc::clone(&self.backend);
        runtime.spawn(async move {
            // However the feed ends (dropped, an error, a panic, its runtime stopping), it
            // is down from then on.
            let _down = Down(sink.clone());
            let Some(feed) = backend.change_feed() else {
                log::info!(
                    "stored-messages: the {} backend has no change feed; reads are never cached",
                    backend.name()
                );
                return;
            };
            if let Err(e) = feed.watch_changes(sink).await {
                log::warn!(
                    "stored-messages: the change feed failed: {}",
                    crate::report(&e)
                );
            }
        });
    }

    /// Whether the feed is listening: every change, from any process, is being reported.
    pub fn is_live(&self) -> bool {
        self.shared.live.load(Ordering::SeqCst)
    }

    /// Waits until every change committed before this call, in any process sharing the
    /// store, has been applied to the hooks (the inbox cache); receivers get each change as
    /// the feed receives it, which may be a moment later. `false`, and at once,
    /// when the feed is down; `false` also when it goes down meanwhile, or when the backend
    /// does not answer within [`SYNC_TIMEOUT`] (the feed then reconnects). After `false`,
    /// read the store itself.
    pub async fn sync(&self) -> bool {
        let shared = &self.shared;
        if !self.is_live() {
            return false;
        }
        let mut progress = shared.progress.subscribe();
        let epoch = progress.borrow().epoch;
        // Checked again after reading the epoch: going down clears `live` before it moves
        // the epoch on, so from here on a fall is seen as a new epoch.
        if !self.is_live() {
            return false;
        }
        let quick = shared
            .quick_check
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let checked_at = Instant::now();
        if quick.is_some_and(|check| check()) {
            *shared.quick_at.lock().unwrap_or_else(|e| e.into_inner()) = Some((checked_at, epoch));
            return true;
        }
        let target = {
            let mut syncs = shared.syncs();
            if syncs.requested > syncs.issued {
                // Asked for and not begun yet: it begins after this call, so it will do.
                syncs.requested
            } else if syncs.requested == syncs.done {
                syncs.ask(&shared.wake, false)
            } else {
                // The sync out began before this call: wait for the next one.
                syncs.again = true;
                syncs.requested + 1
            }
        };
        // No timer per caller: the feed's watchdog ends every wait that lasts too long, by
        // declaring the feed down (which moves the epoch on).
        let answered = match progress
            .wait_for(|p| p.epoch != epoch || p.done >= target)
            .await
        {
            Ok(p) => p.epoch == epoch,
            Err(_) => false,
        };
        answered
    }

    /// As [`ChangeFeed::sync`], for a caller that needs only the changes committed before
    /// `since` (a request needs those before it began: [`crate::request_start`]): a sync
    /// that began after `since` and came back does, so several reads of one request share
    /// one sync.
    pub async fn sync_since(&self, since: Instant) -> bool {
        if !self.is_live() {
            return false;
        }
        if self.recent_sync() {
            return true;
        }
        let Progress { began, epoch, .. } = *self.shared.progress.borrow();
        let quick = *self
            .shared
            .quick_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let quick = quick.and_then(|(at, in_epoch)| (in_epoch == epoch).then_some(at));
        // Checked again after reading: going down clears `live` before it clears `began`
        // and moves the epoch on.
        if began.max(quick).is_some_and(|began| began > since) && self.is_live() {
            return true;
        }
        self.sync().await
    }

    /// Whether a sync that came back began less than [`RECENT_SYNC`] ago, on a store whose
    /// writers wait [`COMMIT_WAIT`]: every write that returned before now was acknowledged
    /// before that sync began. Asks for a new sync, without waiting for it, once the last
    /// one is older than [`RENEW_SYNC`].
    fn recent_sync(&self) -> bool {
        let shared = &self.shared;
        if !shared.writers_wait.load(Ordering::Relaxed) {
            return false;
        }
        let Some(now) = boot_clock() else {
            return false;
        };
        let began = shared.recent.load(Ordering::SeqCst);
        let age = now.saturating_sub(began);
        // Checked again after reading: going down clears `live` before it clears `recent`.
        if began == 0 || age >= RECENT_SYNC.as_nanos() as u64 || !self.is_live() {
            return false;
        }
        if age >= RENEW_SYNC.as_nanos() as u64 {
            let mut syncs = shared.syncs();
            if syncs.requested == syncs.done {
                syncs.ask(&shared.wake, true);
            }
        }
        true
    }

    /// Ends syncs that waited longer than [`SYNC_TIMEOUT`]: the feed is declared down and
    /// its backend asked to reconnect. Runs beside the backend's task, for as long as the
    /// feed exists.
    async fn watchdog(shared: Weak<Shared>) {
        let mut ticker = rocket::tokio::time::interval(SYNC_TIMEOUT / 4);
        loop {
            ticker.tick().await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let stuck = {
                let syncs = shared.syncs();
                syncs.done < syncs.requested
                    && syncs
                        .waiting_since
                        .is_some_and(|since| since.elapsed() > SYNC_TIMEOUT)
            };
            if stuck && shared.live.load(Ordering::SeqCst) {
                log::warn!(
                    "stored-messages: the {} change feed did not answer a sync within {:?}; reconnecting",
                    shared.name,
                    SYNC_TIMEOUT
                );
                FeedSink::new(&shared).lost();
                shared.syncs().reconnect = true;
                shared.wake.notify_one();
            }
        }
    }

    /// Reports `change` on every process's feed, as a write of the store would (see
    /// [`crate::backend::WatchChanges::announce`]): for state a host keeps beside the store,
    /// such as its sessions, that a cache of its own built on this feed must drop. Once it
    /// returns, a [`ChangeFeed::sync`] that begins afterwards, in any process, returns only
    /// after that process's hooks saw the change (or answers `false`).
    ///
    /// # Errors
    ///
    /// When the store cannot be reached, or [`crate::Error::Unsupported`] for a backend
    /// whose feed cannot carry it (or that has no feed).
    pub async fn announce(&self, change: &Change) -> crate::Result<()> {
        match self.backend.change_feed() {
            Some(feed) => feed.announce(change).await,
            None => Err(crate::Error::Unsupported("announcing changes")),
        }
    }

    /// A receiver of every change reported from now on.
    pub fn subscribe(&self) -> ChangeReceiver {
        ChangeReceiver {
            receiver: self.shared.changes.subscribe(),
        }
    }

    /// Runs `hook` on the feed's task for each change, before any later [`ChangeFeed::sync`]
    /// returns. Keep it short and non-blocking.
    pub fn add_hook(&self, hook: Hook) {
        self.shared
            .hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(hook);
    }

    /// How many reports (changes, going live, going down) the feed made so far.
    pub fn reports(&self) -> u64 {
        *self.shared.reports.borrow()
    }

    /// Waits until the feed has made more reports than `seen` (from [`ChangeFeed::reports`]).
    /// For tests and tools: something to wait on instead of sleeping.
    pub async fn wait_for_report(&self, seen: u64) {
        let mut reports = self.shared.reports.subscribe();
        let _ = reports.wait_for(|n| *n > seen).await;
    }

    /// Waits until the feed is live.
    pub async fn wait_live(&self) {
        loop {
            let seen = self.reports();
            if self.is_live() {
                return;
            }
            self.wait_for_report(seen).await;
        }
    }
}

/// Changes as they are reported; see [`ChangeFeed::subscribe`].
#[derive(Debug)]
pub struct ChangeReceiver {
    receiver: broadcast::Receiver<Change>,
}

impl ChangeReceiver {
    /// The next change; [`Change::All`] when this receiver fell behind and some were
    /// dropped; `None` once the feed is gone.
    pub async fn recv(&mut self) -> Option<Change> {
        match self.receiver.recv().await {
            Ok(change) => Some(change),
            Err(broadcast::error::RecvError::Lagged(_)) => Some(Change::All),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

/// What a backend's feed is asked to do next; see [`FeedSink::wanted`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// Sync `n`: call [`FeedSink::synced`] with `n` once every change committed before now
    /// has been reported (for example, send a marker down the change channel and wait for it
    /// to come back).
    Sync(u64),
    /// Drop the connection (it stopped answering) and connect again.
    Reconnect,
}

/// The handle through which a backend's change feed reports; given to
/// [`crate::backend::WatchChanges::watch_changes`]. Cheap to clone.
#[derive(Clone)]
pub struct FeedSink {
    shared: Weak<Shared>,
    wake: Arc<Notify>,
    stop: watch::Receiver<()>,
}

impl FeedSink {
    fn new(shared: &Arc<Shared>) -> FeedSink {
        FeedSink {
            shared: Arc::downgrade(shared),
            wake: Arc::clone(&shared.wake),
            stop: shared.stop.subscribe(),
        }
    }

    /// The feed listens: every change committed from now on will be reported. Reports
    /// [`Change::All`] (changes before this moment were not watched).
    pub fn live(&self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.report(&Change::All);
            shared.live.store(true, Ordering::SeqCst);
            shared.reports.send_modify(|n| *n += 1);
        }
    }

    /// The feed lost its connection, or may have missed changes: it is down until
    /// [`FeedSink::live`]. Syncs out fail, and [`Change::All`] is reported.
    pub fn lost(&self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.live.store(false, Ordering::SeqCst);
            *shared
                .quick_check
                .write()
                .unwrap_or_else(|e| e.into_inner()) = None;
            shared.abandon_syncs();
            shared.report(&Change::All);
        }
    }

    /// Gives the feed a way to vouch without a round trip that nothing was committed since
    /// the feed's last complete report: `check` answers `true` only when that is certain
    /// (SQLite compares its WAL-index header). A sync that it vouches for returns at once.
    /// Replaced by the next call; dropped when the feed goes down.
    pub fn set_quick_check(&self, check: impl Fn() -> bool + Send + Sync + 'static) {
        if let Some(shared) = self.shared.upgrade() {
            *shared
                .quick_check
                .write()
                .unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(check));
        }
    }

    /// Declares that every write to this store waits [`COMMIT_WAIT`], once the store has
    /// acknowledged it, before it returns (in every process: the backend's own code does
    /// it). Reads may then trust a sync that began less than [`RECENT_SYNC`] ago.
    pub fn writers_wait(&self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.writers_wait.store(true, Ordering::SeqCst);
        }
    }

    /// Reports a change (from any process, this one included).
    pub fn changed(&self, change: Change) {
        if let Some(shared) = self.shared.upgrade() {
            shared.report(&change);
        }
    }

    /// A change that reached the feed on its sync path (PostgreSQL's sync connection hears
    /// every notification too): applied to caches before the sync is reported done, but not
    /// repeated to receivers, which get it from the feed's own receive.
    pub fn caught_up(&self, change: Change) {
        if let Some(shared) = self.shared.upgrade() {
            shared.apply(&change);
        }
    }

    /// Sync `n` is done: every change committed before it began has been reported.
    pub fn synced(&self, n: u64) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let mut syncs = shared.syncs();
        if n <= syncs.done || n > syncs.issued {
            // A marker of an abandoned round, or one this feed did not send.
            return;
        }
        syncs.done = n;
        syncs.waiting_since = None;
        let began = syncs.issued_at.filter(|_| n == syncs.issued);
        if let Some(boot) = syncs.issued_boot.filter(|_| n == syncs.issued) {
            shared.recent.store(boot, Ordering::SeqCst);
        }
        if syncs.again {
            syncs.again = false;
            syncs.ask(&shared.wake, false);
        }
        shared.progress.send_modify(|p| {
            p.done = n;
            p.began = began;
        });
    }

    /// A sync could not be done, but no change was missed (sending a marker failed): the
    /// syncs out fail, and their callers read the store. The feed stays live.
    pub fn sync_failed(&self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.abandon_syncs();
        }
    }

    /// Waits for the next thing the feed must do. Cancel-safe: use it in `select!` next to
    /// the backend's own receive.
    pub async fn wanted(&self) -> Wanted {
        let mut gathered = false;
        loop {
            let Some(shared) = self.shared.upgrade() else {
                // The feed is gone: nothing will ever be wanted.
                return std::future::pending().await;
            };
            {
                let mut syncs = shared.syncs();
                if syncs.reconnect {
                    syncs.reconnect = false;
                    return Wanted::Reconnect;
                }
                if syncs.requested > syncs.issued && (gathered || syncs.renewal) {
                    syncs.renewal = false;
                    syncs.issued = syncs.requested;
                    syncs.issued_at = Some(Instant::now());
                    syncs.issued_boot = boot_clock();
                    return Wanted::Sync(syncs.issued);
                }
                gathered = syncs.requested > syncs.issued;
            }
            if gathered {
                // Lets the tasks that are ready to run (requests just read from their
                // sockets) ask first: they join this sync instead of waiting for the next
                // one. Nothing is claimed yet, so this stays cancel-safe.
                drop(shared);
                rocket::tokio::task::yield_now().await;
                continue;
            }
            // `notify_one` stores a permit when nobody waits, so a wake between the check
            // above and this wait is not lost.
            drop(shared);
            self.wake.notified().await;
        }
    }

    /// Resolves when the feed is gone: select on it to end the backend's task.
    pub async fn closed(&self) {
        let mut stop = self.stop.clone();
        while stop.changed().await.is_ok() {}
    }
}

/// What a write to a store whose writers wait (see [`FeedSink::writers_wait`]) does once the
/// store has acknowledged it and before it returns: wait [`COMMIT_WAIT`] (or a little more,
/// never less).
///
/// Tokio's timer fires on whole milliseconds, up to one late, which would add a millisecond
/// to every write on average; the [`CommitClock`]'s thread ends the wait on time.
pub(crate) async fn commit_wait() {
    let (until, done) = COMMIT_CLOCK.wait();
    // `None`: the thread could not be started; an error: it is gone. Either way tokio's
    // timer finishes the wait, and it never ends one early.
    if let Some(done) = done {
        let _ = done.await;
    }
    if Instant::now() < until {
        rocket::tokio::time::sleep_until(until.into()).await;
    }
}

/// Ends the writers' [`COMMIT_WAIT`]s, from a thread of its own that sleeps until the first
/// deadline (the kernel's timers are precise to tens of microseconds). Every wait has the
/// same length and is queued under the lock, so the queue is in the order of its deadlines.
struct CommitClock {
    /// Deadlines and the writers waiting for them, earliest first.
    queue: Mutex<VecDeque<(Instant, oneshot::Sender<()>)>>,
    /// Wakes the thread when a wait is queued while it sleeps with nothing to do.
    queued: Condvar,
}

/// The process's one [`CommitClock`]; its thread starts on the first wait.
static COMMIT_CLOCK: CommitClock = CommitClock {
    queue: Mutex::new(VecDeque::new()),
    queued: Condvar::new(),
};

impl CommitClock {
    /// Queues a wait that ends [`COMMIT_WAIT`] from now: its deadline, and what resolves
    /// then (`None` when the thread could not be started).
    fn wait(&'static self) -> (Instant, Option<oneshot::Receiver<()>>) {
        static STARTED: OnceLock<bool> = OnceLock::new();
        let started = *STARTED.get_or_init(|| {
            let thread = std::thread::Builder::new()
                .name("sm-commit-wait".into())
                .spawn(|| self.run());
            if let Err(e) = &thread {
                log::warn!("stored-messages: no thread to time writes ({e}); tokio's timer will");
            }
            thread.is_ok()
        });
        if !started {
            return (Instant::now() + COMMIT_WAIT, None);
        }
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let until = Instant::now() + COMMIT_WAIT;
        let (done, waited) = oneshot::channel();
        if queue.is_empty() {
            self.queued.notify_one();
        }
        queue.push_back((until, done));
        (until, Some(waited))
    }

    /// The thread: ends each wait once its deadline passed, sleeps until the next one.
    fn run(&self) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let now = Instant::now();
            while queue.front().is_some_and(|&(until, _)| until <= now) {
                if let Some((_, done)) = queue.pop_front() {
                    // The writer may have been cancelled meanwhile.
                    let _ = done.send(());
                }
            }
            queue = match queue.front() {
                Some(&(until, _)) => {
                    self.queued
                        .wait_timeout(queue, until - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self
                    .queued
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
    }
}

/// Now, in nanoseconds, on a clock that keeps counting while the machine is suspended
/// (`CLOCK_BOOTTIME`): a sync's age must never be underestimated. `None` where there is no
/// such clock; reads then wait for a sync of their own.
fn boot_clock() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        let nanos = u64::try_from(now.tv_sec).ok()? * 1_000_000_000;
        Some(nanos + u64::try_from(now.tv_nsec).ok()?)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Declares the feed down when dropped: held by the feed's task.
struct Down(FeedSink);

impl Drop for Down {
    fn drop(&mut self) {
        self.0.lost();
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};
    use rocket::tokio;

    use super::*;
    use crate::backend::{Cleanup, ListQuery, WatchChanges};
    use crate::error::Result;
    use crate::level::Level;
    use crate::message::{Message, MessageId, NewMessage};

    /// A backend that stores nothing; its feed goes live, then answers syncs as told.
    struct Feedless {
        answer: bool,
        writers_wait: bool,
        syncs: Arc<AtomicU64>,
    }

    #[rocket::async_trait]
    impl MessageBackend for Feedless {
        fn name(&self) -> &'static str {
            "test"
        }
        fn can_handle(&self, _: Level) -> bool {
            false
        }
        async fn create_message(&self, _: &NewMessage) -> Result<Message> {
            unreachable!()
        }
        async fn archive_store(&self, _: &[UserId], _: &Message) -> Result<u64> {
            unreachable!()
        }
        async fn inbox_store(&self, _: &[UserId], _: &Message) -> Result<u64> {
            unreachable!()
        }
        async fn deliver(&self, _: &[UserId], _: &NewMessage) -> Result<Message> {
            unreachable!()
        }
        async fn inbox_list(&self, _: UserId, _: ListQuery) -> Result<Vec<Message>> {
            unreachable!()
        }
        async fn inbox_count(&self, _: UserId) -> Result<u64> {
            unreachable!()
        }
        async fn inbox_get(&self, _: UserId, _: MessageId) -> Result<Message> {
            unreachable!()
        }
        async fn inbox_delete_many(&self, _: UserId, _: &[MessageId]) -> Result<Vec<MessageId>> {
            unreachable!()
        }
        async fn inbox_purge(&self, _: UserId) -> Result<u64> {
            unreachable!()
        }
        async fn archive_list(&self, _: UserId, _: ListQuery) -> Result<Vec<Message>> {
            unreachable!()
        }
        async fn expired_messages_cleanup(&self, _: DateTime<Utc>) -> Result<Cleanup> {
            unreachable!()
        }
        async fn flush(&self) -> Result<()> {
            unreachable!()
        }
        async fn deliver_once(&self, _: &[UserId], _: &Message) -> Result<u64> {
            unreachable!()
        }
        fn change_feed(&self) -> Option<&dyn WatchChanges> {
            Some(self)
        }
    }

    #[rocket::async_trait]
    impl WatchChanges for Feedless {
        async fn watch_changes(&self, sink: FeedSink) -> Result<()> {
            loop {
                if self.writers_wait {
                    sink.writers_wait();
                }
                sink.live();
                loop {
                    tokio::select! {
                        _ = sink.closed() => return Ok(()),
                        wanted = sink.wanted() => match wanted {
                            Wanted::Sync(n) => {
                                self.syncs.fetch_add(1, Ordering::SeqCst);
                                // Let more callers pile up behind this round.
                                tokio::task::yield_now().await;
                                if self.answer {
                                    sink.synced(n);
                                }
                            }
                            Wanted::Reconnect => break,
                        },
                    }
                }
            }
        }
    }

    fn feed(answer: bool) -> (ChangeFeed, Arc<AtomicU64>) {
        feed_of(answer, false)
    }

    fn feed_of(answer: bool, writers_wait: bool) -> (ChangeFeed, Arc<AtomicU64>) {
        let syncs = Arc::new(AtomicU64::new(0));
        let backend = Feedless {
            answer,
            writers_wait,
            syncs: syncs.clone(),
        };
        (ChangeFeed::new(Arc::new(backend)), syncs)
    }

    /// Whether a read starting right after a sync came back was answered without a sync
    /// of its own, in `tries` attempts.
    async fn reads_trusting_the_last_sync(
        feed: &ChangeFeed,
        syncs: &AtomicU64,
        tries: usize,
    ) -> usize {
        let mut trusted = 0;
        for _ in 0..tries {
            assert!(feed.sync().await);
            let before = syncs.load(Ordering::SeqCst);
            assert!(feed.sync_since(Instant::now()).await);
            if syncs.load(Ordering::SeqCst) == before {
                trusted += 1;
            }
        }
        trusted
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_trusts_a_recent_sync_only_where_writers_wait() {
        // Writers that do not wait: every read that starts after a sync began needs one of
        // its own.
        let (feed, syncs) = feed_of(true, false);
        feed.start();
        feed.wait_live().await;
        assert_eq!(reads_trusting_the_last_sync(&feed, &syncs, 20).await, 0);

        // Writers that wait: a sync that began moments ago will do (timing-tolerant: a
        // machine that stalls past RECENT_SYNC just makes that read sync again).
        let (feed, syncs) = feed_of(true, true);
        feed.start();
        feed.wait_live().await;
        assert!(reads_trusting_the_last_sync(&feed, &syncs, 100).await > 0);
        // ... but never one that began RECENT_SYNC ago or more.
        for _ in 0..5 {
            assert!(feed.sync().await);
            tokio::time::sleep(RECENT_SYNC + Duration::from_millis(1)).await;
            let before = syncs.load(Ordering::SeqCst);
            assert!(feed.sync_since(Instant::now()).await);
            assert!(
                syncs.load(Ordering::SeqCst) > before,
                "an old sync was trusted"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commit_waits_last_their_full_length_however_many_overlap_or_give_up() {
        // Waits queued together, in waves, some cancelled half way: every one that is not
        // cancelled ends, and none before COMMIT_WAIT has passed.
        for wave in 0..5 {
            let waiters: Vec<_> = (0..50)
                .map(|i| {
                    tokio::spawn(async move {
                        let began = Instant::now();
                        if i % 7 == 0 {
                            // Given up: leaves the clock's queue with a writer that is gone.
                            let _ = tokio::time::timeout(COMMIT_WAIT / 2, commit_wait()).await;
                            return None;
                        }
                        commit_wait().await;
                        Some(began.elapsed())
                    })
                })
                .collect();
            for waiter in waiters {
                if let Some(waited) = waiter.await.unwrap() {
                    assert!(waited >= COMMIT_WAIT, "wave {wave}: waited only {waited:?}");
                }
            }
            tokio::time::sleep(Duration::from_micros(300 * wave)).await;
        }
        // The thread went back to sleep with nothing queued, and wakes for the next one.
        let began = Instant::now();
        commit_wait().await;
        assert!(began.elapsed() >= COMMIT_WAIT);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_syncs_share_rounds() {
        let (feed, syncs) = feed(true);
        feed.start();
        feed.wait_live().await;
        let callers: Vec<_> = (0..200)
            .map(|_| {
                let feed = feed.clone();
                tokio::spawn(async move { feed.sync().await })
            })
            .collect();
        for caller in callers {
            assert!(caller.await.unwrap(), "a live feed answers every sync");
        }
        let rounds = syncs.load(Ordering::SeqCst);
        assert!(
            (1..200).contains(&rounds),
            "{rounds} rounds for 200 callers"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sync_nobody_answers_fails_and_the_feed_reconnects() {
        let (feed, syncs) = feed(false);
        feed.start();
        feed.wait_live().await;
        let started = Instant::now();
        assert!(!feed.sync().await, "an unanswered sync fails");
        assert!(started.elapsed() < SYNC_TIMEOUT * 3);
        // the watchdog declared the feed down; the backend reconnected and it is live again
        tokio::time::timeout(SYNC_TIMEOUT * 5, feed.wait_live())
            .await
            .expect("the feed comes back");
        assert!(syncs.load(Ordering::SeqCst) >= 1);
    }

    #[tokio::test]
    async fn a_feed_that_is_down_fails_syncs_at_once() {
        let (feed, _) = feed(true);
        // never started: not live
        assert!(!feed.is_live());
        assert!(!feed.sync().await);
    }

    fn ids(ids: &[i64]) -> Change {
        Change::Users(ids.iter().copied().map(UserId).collect())
    }

    #[test]
    fn payloads_round_trip() {
        assert_eq!(Change::payload(&[1, 22, 333]), "1,22,333");
        assert_eq!(Change::parse("333,1,22,1"), ids(&[1, 22, 333]));
        let many: Vec<i64> = (0..=MANY_USERS as i64).collect();
        assert_eq!(Change::payload(&many), "*");
        // more users than one payload names: several payloads, which together name them all
        let payloads = Change::payloads(&many);
        assert_eq!(payloads.len(), 2);
        let named: Vec<UserId> = payloads
            .iter()
            .flat_map(|p| match Change::parse(p) {
                Change::Users(users) => users.to_vec(),
                Change::All => panic!("{p} names everyone"),
            })
            .collect();
        assert_eq!(named, many.iter().copied().map(UserId).collect::<Vec<_>>());
        let listed: Vec<i64> = (1..=LISTED_USERS as i64).collect();
        assert_eq!(Change::payloads(&listed).len(), LISTED_USERS / MANY_USERS);
        let too_many: Vec<i64> = (0..=LISTED_USERS as i64).collect();
        assert_eq!(Change::payloads(&too_many), ["*"]);
        assert_eq!(Change::payloads(&[]), [""]);
        assert_eq!(Change::users(&named), Change::Users(named.clone().into()));
        let too_many: Vec<UserId> = too_many.into_iter().map(UserId).collect();
        assert_eq!(Change::users(&too_many), Change::All);
        assert_eq!(Change::parse("*"), Change::All);
        assert_eq!(Change::parse(""), ids(&[]));
        assert_eq!(Change::parse("1,x"), Change::All);
        assert!(Change::parse("5,7").concerns(UserId(7)));
        assert!(!Change::parse("5,7").concerns(UserId(6)));
        assert!(Change::All.concerns(UserId(6)));
    }
}
