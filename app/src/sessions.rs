//! The session cache: which user a session cookie names, kept in process memory so that a
//! request of a logged-in user needs no query to know who it is.
//!
//! # What it guarantees
//!
//! The same as a query: a session that ended (logout, a password change, `stored-messages
//! endsessions`) in any process before a request began is not accepted by that request, on
//! any instance. How, with the store's change feed ([`ChangeFeed`]):
//!
//! - whoever ends sessions (this app, the CLI, another instance) deletes them and then
//!   announces their user on the feed ([`ChangeFeed::announce`]) before it returns; every
//!   process's feed drops that user's entries from its own task;
//! - before it trusts an entry, a request waits for [`ChangeFeed::sync`], which returns once
//!   everything announced before the request began has been applied here;
//! - a fill is kept only if no change touched its user's stripe while it queried, so it
//!   cannot bring back a session that ended meanwhile;
//! - while the feed is down nothing is answered from here (every request queries), and when
//!   it comes back the cache starts empty. Entries also expire with their session, and after
//!   [`MAX_ENTRY_AGE`] whatever happens.
//!
//! Any change the feed reports about a user drops their entries (a message for them too:
//! the feed does not say why), and [`Change::All`] drops everything; the next request
//! queries again. That costs one query now and then, never a stale answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use stored_messages::{Change, ChangeFeed};

use crate::users::User;

/// An entry older than this is read again from the database.
pub const MAX_ENTRY_AGE: Duration = Duration::from_secs(60);
/// At most this many sessions are kept; beyond, aged and then arbitrary entries go.
pub const MAX_ENTRIES: usize = 100_000;
/// Generation stripes: users hash onto these, so unrelated changes rarely spoil a fill.
const STRIPES: usize = 64;

struct Entry {
    user: User,
    /// When the session expires (microseconds since the epoch, as in the table).
    expires_us: i64,
    filled: Instant,
}

#[derive(Default)]
struct Entries {
    by_session: HashMap<String, Entry>,
    /// The sessions of each user that have an entry.
    by_user: HashMap<i64, Vec<String>>,
}

impl Entries {
    fn remove(&mut self, session: &str) {
        if let Some(entry) = self.by_session.remove(session) {
            if let Some(sessions) = self.by_user.get_mut(&entry.user.id) {
                sessions.retain(|s| s != session);
                if sessions.is_empty() {
                    self.by_user.remove(&entry.user.id);
                }
            }
        }
    }

    fn remove_user(&mut self, user: i64) {
        for session in self.by_user.remove(&user).unwrap_or_default() {
            self.by_session.remove(&session);
        }
    }

    fn clear(&mut self) {
        self.by_session.clear();
        self.by_user.clear();
    }
}

/// A generation per stripe of users, read before a fill queries.
pub(crate) struct Generations([u64; STRIPES]);

/// See the module docs.
pub struct SessionCache {
    feed: ChangeFeed,
    entries: Mutex<Entries>,
    generations: [AtomicU64; STRIPES],
}

impl std::fmt::Debug for SessionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionCache")
            .field("sessions", &self.len())
            .finish_non_exhaustive()
    }
}

fn stripe(user: i64) -> usize {
    (user.unsigned_abs() as usize) % STRIPES
}

impl SessionCache {
    /// A cache kept current by `feed` (the store's change feed, which it does not start).
    pub fn new(feed: ChangeFeed) -> Arc<SessionCache> {
        let cache = Arc::new(SessionCache {
            feed: feed.clone(),
            entries: Mutex::new(Entries::default()),
            generations: std::array::from_fn(|_| AtomicU64::new(0)),
        });
        let weak = Arc::downgrade(&cache);
        feed.add_hook(Box::new(move |change| {
            if let Some(cache) = weak.upgrade() {
                cache.apply(change);
            }
        }));
        cache
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn apply(&self, change: &Change) {
        match change {
            Change::Users(users) => {
                for user in users.iter() {
                    self.generations[stripe(user.0)].fetch_add(1, Ordering::SeqCst);
                }
                let mut entries = self.lock();
                for user in users.iter() {
                    entries.remove_user(user.0);
                }
            }
            Change::All => {
                for generation in &self.generations {
                    generation.fetch_add(1, Ordering::SeqCst);
                }
                self.lock().clear();
            }
        }
    }

    /// The user of `session` if an entry vouched for by a sync says so (for a request that
    /// began at `since`); `None` means "ask the database" (ended sessions are not kept).
    pub async fn get(&self, session: &str, now_us: i64, since: Instant) -> Option<User> {
        if !self.feed.is_live() {
            return None;
        }
        self.peek(session, now_us)?;
        // The entry may predate an ending announced before `since` (when the request began),
        // in another process: once the sync returns, such an ending has dropped it.
        if !self.feed.sync_since(since).await {
            return None;
        }
        self.peek(session, now_us)
    }

    /// Drops `user`'s sessions here at once (this process ended them), and spoils fills in
    /// flight.
    pub fn forget_user(&self, user: i64) {
        self.apply(&Change::users(&[stored_messages::UserId(user)]));
    }

    fn peek(&self, session: &str, now_us: i64) -> Option<User> {
        let entries = self.lock();
        let entry = entries.by_session.get(session)?;
        (entry.expires_us > now_us && entry.filled.elapsed() < MAX_ENTRY_AGE)
            .then(|| entry.user.clone())
    }

    /// What a fill must read before it queries.
    pub(crate) fn generations(&self) -> Generations {
        Generations(std::array::from_fn(|i| {
            self.generations[i].load(Ordering::SeqCst)
        }))
    }

    /// Keeps what a fill read, unless a change touched the user since `before`, or the feed
    /// is down.
    pub(crate) fn put(&self, session: &str, user: &User, expires_us: i64, before: &Generations) {
        if !self.feed.is_live() {
            return;
        }
        let mut entries = self.lock();
        // Under the lock: a change bumps the generation before it takes the lock to drop
        // entries, so it either sees this entry or spoils this fill.
        let i = stripe(user.id);
        if self.generations[i].load(Ordering::SeqCst) != before.0[i] {
            return;
        }
        entries.remove(session);
        if entries.by_session.len() >= MAX_ENTRIES {
            let aged: Vec<String> = entries
                .by_session
                .iter()
                .filter(|(_, e)| e.filled.elapsed() >= MAX_ENTRY_AGE)
                .map(|(s, _)| s.clone())
                .collect();
            for s in aged {
                entries.remove(&s);
            }
            // Down to nine tenths, so that a full cache is swept once per many fills.
            let excess = (entries.by_session.len() + MAX_ENTRIES / 10).saturating_sub(MAX_ENTRIES);
            let victims: Vec<String> = entries.by_session.keys().take(excess).cloned().collect();
            for victim in victims {
                entries.remove(&victim);
            }
        }
        entries.by_session.insert(
            session.to_string(),
            Entry {
                user: user.clone(),
                expires_us,
                filled: Instant::now(),
            },
        );
        entries
            .by_user
            .entry(user.id)
            .or_default()
            .push(session.to_string());
    }

    /// How many sessions are kept.
    pub fn len(&self) -> usize {
        self.lock().by_session.len()
    }

    /// Whether no session is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: i64) -> User {
        User {
            id,
            username: format!("u{id}"),
            is_admin: false,
        }
    }

    fn entry(id: i64) -> Entry {
        Entry {
            user: user(id),
            expires_us: i64::MAX,
            filled: Instant::now(),
        }
    }

    #[test]
    fn entries_of_a_user_go_together_and_alone() {
        let mut entries = Entries::default();
        for (session, id) in [("a", 1), ("b", 1), ("c", 2)] {
            entries.by_session.insert(session.into(), entry(id));
            entries.by_user.entry(id).or_default().push(session.into());
        }
        entries.remove("a");
        assert_eq!(entries.by_user[&1], vec!["b".to_string()]);
        entries.remove_user(1);
        assert!(!entries.by_session.contains_key("b"));
        assert!(!entries.by_user.contains_key(&1));
        assert!(entries.by_session.contains_key("c"));
        entries.remove("c");
        assert!(entries.by_user.is_empty() && entries.by_session.is_empty());
    }
}
