//! The server-side spill for flash messages that do not fit the cookie.
//!
//! The browser keeps only a random key (in a private cookie); the messages wait in the
//! backend's [`FlashSpill`] (see [`crate::MessageBackend::flash_spill`]) until they are
//! shown, then the key is dropped. Backends without a place of their own use the
//! process-local [`MemorySpill`], which is lost on restart ([`crate::Store::flash_spill`]
//! picks).

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, OnceLock};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Duration, Utc};
use rand::RngCore;

use crate::backend::FlashSpill;
use crate::error::Result;
use crate::message::UserId;

/// How long spilled messages wait for the browser to come back.
pub fn spill_lifetime() -> Duration {
    Duration::days(1)
}

/// A new random spill key: 144 bits, URL-safe.
pub fn new_key() -> String {
    let mut bytes = [0u8; 18];
    rand::thread_rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Whether `key` looks like one of ours (so a forged key cannot reach other storage keys).
pub use crate::backend::is_spill_key as is_valid_key;

/// How many new spills one client address may create per [`SPILL_WINDOW`] by default
/// (`spills_per_client`).
pub const SPILLS_PER_CLIENT: u32 = 20;
/// The window of [`SPILLS_PER_CLIENT`].
pub const SPILL_WINDOW: std::time::Duration = std::time::Duration::from_secs(10 * 60);
/// The largest spill payload kept (bytes); a larger queue keeps its newest messages that fit.
pub const MAX_SPILL_BYTES: usize = 256 * 1024;
/// How long an anonymous visitor's spill waits for the browser to come back (a logged-in
/// user's waits [`spill_lifetime`]). It is also the window of the anonymous budget.
pub const ANONYMOUS_SPILL_LIFETIME: std::time::Duration = std::time::Duration::from_secs(60 * 60);
/// The default of `anonymous_spill_bytes`: 64 MiB.
pub const ANONYMOUS_SPILL_BYTES: usize = 64 * 1024 * 1024;

/// Bounds the server-side storage that clients can make the app keep.
///
/// A browser that returns its cookies holds one spill at a time (the previous one is deleted
/// when it is replaced, which costs no quota), but a client that never returns them would
/// create a new one with every request. So:
///
/// - **per client**: at most `spills_per_client` (default [`SPILLS_PER_CLIENT`]) new spills
///   per [`SPILL_WINDOW`] for each logged-in user (whatever address they come from), and as
///   many for each address of anonymous visitors (an IPv6 address counts by its /64
///   network, which one client usually holds whole);
/// - **all anonymous visitors together**: the spills created in the last
///   [`ANONYMOUS_SPILL_LIFETIME`] (which is also how long an anonymous spill lives) hold at
///   most `anonymous_spill_bytes` (default [`ANONYMOUS_SPILL_BYTES`]), so that is the most
///   their spills can occupy in the store, per instance.
///
/// A spill refused by either is not written: the visitor gets the messages that fit the
/// cookie and, in place of the rest, a warning that some messages could not be kept.
/// The counts are this instance's, in memory.
#[derive(Debug)]
pub struct SpillQuota {
    per_client: u32,
    anonymous_bytes: usize,
    counts: Mutex<HashMap<Client, (u32, std::time::Instant)>>,
    /// Anonymous spills still alive: when each was created and its size, oldest first.
    anonymous: Mutex<(VecDeque<(std::time::Instant, usize)>, usize)>,
}

impl Default for SpillQuota {
    fn default() -> SpillQuota {
        SpillQuota::new(SPILLS_PER_CLIENT, ANONYMOUS_SPILL_BYTES)
    }
}

impl SpillQuota {
    /// A quota of `per_client` new spills per address per [`SPILL_WINDOW`], and
    /// `anonymous_bytes` for the live spills of anonymous visitors.
    pub fn new(per_client: u32, anonymous_bytes: usize) -> SpillQuota {
        SpillQuota {
            per_client,
            anonymous_bytes,
            counts: Mutex::default(),
            anonymous: Mutex::default(),
        }
    }

    /// Whether a request from `address`, of logged-in `user` or anonymous, may create one
    /// more spill of `bytes` now (and counts it). A logged-in user counts as themselves,
    /// wherever they come from; an anonymous visitor by address, and against the anonymous
    /// budget.
    pub fn allow(
        &self,
        address: Option<std::net::IpAddr>,
        user: Option<UserId>,
        bytes: usize,
    ) -> bool {
        let client = Client::new(address, user);
        if user.is_none() {
            let mut live = self.anonymous.lock().unwrap_or_else(|e| e.into_inner());
            return self.fits(&mut live, bytes)
                && self.count_client(client)
                && Self::take(&mut live, bytes);
        }
        self.count_client(client)
    }

    /// Whether an anonymous spill already allowed may grow by `bytes` (and counts them).
    pub fn allow_more(&self, bytes: usize) -> bool {
        let mut live = self.anonymous.lock().unwrap_or_else(|e| e.into_inner());
        self.fits(&mut live, bytes) && Self::take(&mut live, bytes)
    }

    /// Drops the spills that expired; whether `bytes` more fit the anonymous budget.
    fn fits(
        &self,
        live: &mut (VecDeque<(std::time::Instant, usize)>, usize),
        bytes: usize,
    ) -> bool {
        let now = std::time::Instant::now();
        let (spills, total) = live;
        while let Some((created, size)) = spills.front() {
            if now.duration_since(*created) < ANONYMOUS_SPILL_LIFETIME {
                break;
            }
            *total -= size;
            spills.pop_front();
        }
        total.saturating_add(bytes) <= self.anonymous_bytes
    }

    fn take(live: &mut (VecDeque<(std::time::Instant, usize)>, usize), bytes: usize) -> bool {
        live.0.push_back((std::time::Instant::now(), bytes));
        live.1 += bytes;
        true
    }

    fn count_client(&self, client: Client) -> bool {
        let now = std::time::Instant::now();
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.len() > 10_000 {
            counts.retain(|_, (_, since)| now.duration_since(*since) < SPILL_WINDOW);
        }
        let (count, since) = counts.entry(client).or_insert((0, now));
        if now.duration_since(*since) >= SPILL_WINDOW {
            *count = 0;
            *since = now;
        }
        if *count >= self.per_client {
            return false;
        }
        *count += 1;
        true
    }
}

/// Whom the per-client count of [`SpillQuota`] counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Client {
    User(UserId),
    /// An anonymous visitor's address: IPv4 whole, IPv6 by its /64 network; `None` when
    /// Rocket knows no address (a local client in tests).
    Network(Option<std::net::IpAddr>),
}

impl Client {
    fn new(address: Option<std::net::IpAddr>, user: Option<UserId>) -> Client {
        use std::net::{IpAddr, Ipv6Addr};
        match user {
            Some(user) => Client::User(user),
            None => Client::Network(address.map(|address| match address {
                IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                    Some(v4) => IpAddr::V4(v4),
                    None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
                },
                v4 => v4,
            })),
        }
    }
}

/// A process-local spill, used by every backend without a [`FlashSpill`] of its own.
#[derive(Debug, Default)]
pub struct MemorySpill {
    entries: Mutex<HashMap<String, (String, DateTime<Utc>)>>,
}

impl MemorySpill {
    /// The process-wide instance.
    pub fn global() -> &'static MemorySpill {
        static SPILL: OnceLock<MemorySpill> = OnceLock::new();
        SPILL.get_or_init(MemorySpill::default)
    }

    /// Stores `payload` under `key` until `expires`; drops expired entries on the way.
    pub fn put(&self, key: &str, payload: &str, expires: DateTime<Utc>) {
        let now = Utc::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|_, (_, until)| *until > now);
        entries.insert(key.to_string(), (payload.to_string(), expires));
    }

    /// The payload under `key`, if present and not expired.
    pub fn get(&self, key: &str) -> Option<String> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(key)
            .filter(|(_, until)| *until > Utc::now())
            .map(|(p, _)| p.clone())
    }

    /// Forgets `key`.
    pub fn delete(&self, key: &str) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

#[rocket::async_trait]
impl FlashSpill for MemorySpill {
    async fn spill_put(&self, key: &str, payload: &str, expires: DateTime<Utc>) -> Result<()> {
        self.put(key, payload, expires);
        Ok(())
    }

    async fn spill_get(&self, key: &str) -> Result<Option<String>> {
        Ok(self.get(key))
    }

    async fn spill_delete(&self, key: &str) -> Result<()> {
        self.delete(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_and_recognised() {
        let (a, b) = (new_key(), new_key());
        assert_ne!(a, b);
        assert!(is_valid_key(&a));
        assert!(!is_valid_key("../../etc/passwd"));
        assert!(!is_valid_key(""));
    }

    #[test]
    fn the_quota_counts_clients_and_anonymous_bytes() {
        let quota = SpillQuota::new(3, 1000);
        let a = Some(std::net::IpAddr::from([10, 0, 0, 1]));
        let b = Some(std::net::IpAddr::from([10, 0, 0, 2]));
        let (alice, bob) = (Some(UserId(1)), Some(UserId(2)));
        assert!((0..3).all(|_| quota.allow(a, alice, 10_000)));
        assert!(!quota.allow(a, alice, 1), "alice's fourth");
        assert!(
            !quota.allow(b, alice, 1),
            "alice's fourth from another address"
        );
        assert!(quota.allow(a, bob, 1), "bob counts apart from alice");
        assert!(quota.allow(b, None, 600));
        assert!(!quota.allow(b, None, 600), "over the anonymous bytes");
        assert!(quota.allow(b, None, 400));
        assert!(!quota.allow_more(1), "the budget is spent");
        assert!(
            !quota.allow(a, None, 1),
            "the budget is spent for a as well"
        );
    }

    #[test]
    fn anonymous_ipv6_clients_count_by_network() {
        let quota = SpillQuota::new(2, 1_000_000);
        let address = |s: &str| Some(s.parse::<std::net::IpAddr>().unwrap());
        assert!(quota.allow(address("2001:db8:1:2::1"), None, 1));
        assert!(quota.allow(address("2001:db8:1:2:ffff::9"), None, 1));
        assert!(
            !quota.allow(address("2001:db8:1:2:abcd::1"), None, 1),
            "the same /64: the third"
        );
        assert!(
            quota.allow(address("2001:db8:1:3::1"), None, 1),
            "another /64"
        );
        // An IPv4 address written as IPv6 is that IPv4 address.
        assert!(quota.allow(address("192.0.2.7"), None, 1));
        assert!(quota.allow(address("::ffff:192.0.2.7"), None, 1));
        assert!(
            !quota.allow(address("192.0.2.7"), None, 1),
            "192.0.2.7's third"
        );
        assert!(quota.allow(address("192.0.2.8"), None, 1));
    }

    #[test]
    fn memory_spill_expires() {
        let spill = MemorySpill::default();
        spill.put("k", "v", Utc::now() + Duration::minutes(1));
        spill.put("old", "v", Utc::now() - Duration::minutes(1));
        assert_eq!(spill.get("k").as_deref(), Some("v"));
        assert_eq!(spill.get("old"), None);
        spill.delete("k");
        assert_eq!(spill.get("k"), None);
    }
}
