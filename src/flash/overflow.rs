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
