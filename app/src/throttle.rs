//! Login throttling, so that logins cannot be flooded:
//!
//! - **Bounded password checks.** Each argon2 check takes ~19 MiB and a core for a moment; at
//!   most as many run at once as the machine has cores. A login that cannot start its
//!   check within [`CHECK_WAIT`] is answered 503 at once instead of queueing without end, so
//!   a flood costs the server a bounded amount of memory.
//! - **Lockout after failures.** After [`FREE_FAILURES`] wrong passwords for one username
//!   from one address within [`WINDOW`], that pair is locked out for a time that doubles with
//!   each further failure (1 s, 2 s, 4 s, … at most [`MAX_LOCK`]); after
//!   [`FREE_FAILURES_PER_ADDRESS`] failures from one address, for any usernames, the address
//!   is. While locked, even the right password is refused (429 with `Retry-After`), so
//!   guessing stays slow; a success clears the username's record.
//!
//! The records live in this process (one instance's view); they are pruned as they age.
//! The address is Rocket's `client_ip()`: the reference app's Rocket.toml turns
//! `ip_header` off, so it is the peer's address; behind a proxy, set `ip_header` to the header
//! the proxy overwrites (never one a client can set).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rocket::tokio::sync::{Semaphore, SemaphorePermit};

/// How long a login waits for a free password check before it is refused.
pub const CHECK_WAIT: Duration = Duration::from_secs(5);
/// Failures for one username from one address before a lockout.
pub const FREE_FAILURES: u32 = 5;
/// Failures from one address, for any usernames, before a lockout.
pub const FREE_FAILURES_PER_ADDRESS: u32 = 50;
/// How long failures are remembered.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// The longest lockout.
pub const MAX_LOCK: Duration = Duration::from_secs(15 * 60);
/// Records kept before old ones are pruned.
const PRUNE_ABOVE: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    locked_until: Option<Instant>,
}

/// The login throttle of one app instance (managed state).
pub struct LoginThrottle {
    checks: Semaphore,
    failures: Mutex<HashMap<String, Failures>>,
}

impl Default for LoginThrottle {
    fn default() -> LoginThrottle {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        LoginThrottle::new(cores)
    }
}

impl LoginThrottle {
    /// A throttle running at most `concurrent_checks` password checks at once.
    pub fn new(concurrent_checks: usize) -> LoginThrottle {
        LoginThrottle {
            checks: Semaphore::new(concurrent_checks.max(1)),
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn keys(username: &str, address: Option<IpAddr>) -> [String; 2] {
        let address = address.map_or_else(|| "-".to_string(), |a| a.to_string());
        // The account's one spelling, so ` Alice` and `alice` share a record.
        let name = crate::users::normalize_username(username)
            .unwrap_or_else(|_| username.trim().to_lowercase());
        [format!("{address} {name}"), address]
    }

    /// How long this username and address must still wait, if they are locked out.
    pub fn locked(&self, username: &str, address: Option<IpAddr>) -> Option<Duration> {
        let now = Instant::now();
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        Self::keys(username, address)
            .iter()
            .filter_map(|key| failures.get(key)?.locked_until)
            .filter(|until| *until > now)
            .map(|until| until - now)
            .max()
    }

    /// A permit to run one password check, or `None` when none frees up within
    /// [`CHECK_WAIT`].
    pub async fn check_permit(&self) -> Option<SemaphorePermit<'_>> {
        rocket::tokio::time::timeout(CHECK_WAIT, self.checks.acquire())
            .await
            .ok()?
            .ok()
    }

    /// Records a wrong password; returns the lockout it starts, if any.
    pub fn failed(&self, username: &str, address: Option<IpAddr>) -> Option<Duration> {
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() > PRUNE_ABOVE {
            failures.retain(|_, f| {
                now.duration_since(f.last) < WINDOW || f.locked_until.is_some_and(|u| u > now)
            });
        }
        let mut lock = None;
        for (key, free) in Self::keys(username, address)
            .into_iter()
            .zip([FREE_FAILURES, FREE_FAILURES_PER_ADDRESS])
        {
            let entry = failures.entry(key).or_insert(Failures {
                count: 0,
                last: now,
                locked_until: None,
            });
            if now.duration_since(entry.last) >= WINDOW {
                entry.count = 0;
            }
            entry.count += 1;
            entry.last = now;
            if entry.count >= free {
                let doubled = 1u64 << (entry.count - free).min(20);
                let wait = Duration::from_secs(doubled).min(MAX_LOCK);
                entry.locked_until = Some(now + wait);
                lock = lock.max(Some(wait));
            }
        }
        lock
    }

    /// Records a successful login: the username's failures from this address are forgotten.
    pub fn succeeded(&self, username: &str, address: Option<IpAddr>) {
        let [user_key, _] = Self::keys(username, address);
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&user_key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_failures_lock_the_pair_for_doubling_times() {
        let throttle = LoginThrottle::new(1);
        let ip: Option<IpAddr> = Some("192.0.2.1".parse().unwrap());
        for _ in 1..FREE_FAILURES {
            assert_eq!(throttle.failed("alice", ip), None);
            assert_eq!(throttle.locked("alice", ip), None);
        }
        assert_eq!(
            throttle.failed(" Alice\t", ip),
            Some(Duration::from_secs(1))
        );
        assert!(throttle.locked("alice", ip).is_some());
        assert_eq!(throttle.failed("alice", ip), Some(Duration::from_secs(2)));
        assert_eq!(throttle.failed("alice", ip), Some(Duration::from_secs(4)));
        // Another user, or the same user from another address, is not locked.
        assert_eq!(throttle.locked("bob", ip), None);
        assert_eq!(
            throttle.locked("alice", Some("192.0.2.2".parse().unwrap())),
            None
        );
        throttle.succeeded("alice", ip);
        assert_eq!(throttle.locked("alice", ip), None);
    }

    #[test]
    fn one_address_trying_many_names_is_locked_too() {
        let throttle = LoginThrottle::new(1);
        let ip: Option<IpAddr> = Some("192.0.2.9".parse().unwrap());
        for i in 1..FREE_FAILURES_PER_ADDRESS {
            throttle.failed(&format!("user{i}"), ip);
        }
        assert_eq!(throttle.locked("someone-new", ip), None);
        throttle.failed("one-more", ip);
        assert!(throttle.locked("someone-new", ip).is_some());
    }

    #[test]
    fn lockouts_never_exceed_the_maximum() {
        let throttle = LoginThrottle::new(1);
        let mut last = None;
        for _ in 0..100 {
            last = throttle.failed("alice", None);
        }
        assert_eq!(last, Some(MAX_LOCK));
    }
}
