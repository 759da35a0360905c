//! The server-side spill for flash messages that do not fit the cookie.
//!
//! The browser keeps only a random key (in a private cookie); the messages wait in the
//! backend's [`FlashSpill`] (see [`crate::MessageBackend::flash_spill`]) until they are
//! shown, then the key is dropped. Backends without a place of their own use the
//! process-local [`MemorySpill`], which is lost on restart ([`crate::Store::flash_spill`]
//! picks).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Duration, Utc};
use rand::RngCore;

use crate::backend::FlashSpill;
use crate::error::Result;

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

/// How many new spills one client address may create per [`SPILL_WINDOW`].
pub const SPILLS_PER_CLIENT: u32 = 20;
/// The window of [`SPILLS_PER_CLIENT`].
pub const SPILL_WINDOW: std::time::Duration = std::time::Duration::from_secs(10 * 60);
/// The largest spill payload kept (bytes); a larger queue keeps its newest messages that fit.
pub const MAX_SPILL_BYTES: usize = 256 * 1024;

/// Bounds the server-side storage anonymous clients can make the app keep: a browser that
/// returns its cookies holds one spill at a time (the previous one is deleted when it is
/// replaced), but a client that never returns them would create a new one with every
/// request. At most [`SPILLS_PER_CLIENT`] new spills per address per [`SPILL_WINDOW`] are
/// written; beyond that the overflow is dropped (logged), and the messages that fit the
/// cookie still arrive. One instance's count, kept in memory.
#[derive(Debug, Default)]
pub struct SpillQuota {
    counts: Mutex<HashMap<Option<std::net::IpAddr>, (u32, std::time::Instant)>>,
}

impl SpillQuota {
    /// Whether `client` may create one more spill now (and counts it).
    pub fn allow(&self, client: Option<std::net::IpAddr>) -> bool {
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
        *count += 1;
        *count <= SPILLS_PER_CLIENT
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
