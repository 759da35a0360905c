//! The Lua scripts of the Redis backend, each in a `.lua` file of its own beside this one
//! (the file's opening comment says what it does, its KEYS and ARGV). They build user keys
//! as `prefix .. 'user:' .. id .. ':archive'` (or `':notifications'`) and message keys as
//! `prefix .. 'message:' .. id`, the same names as `Keys`; app/tests/it/redis_backend.rs
//! checks that both agree.

use std::sync::OnceLock;

use redis::Script;

const DELIVER: &str = include_str!("deliver.lua");
const STORE: &str = include_str!("store.lua");
const LIST: &str = include_str!("list.lua");
const GET: &str = include_str!("get.lua");
const DELETE: &str = include_str!("delete.lua");
pub(super) const TAKE: &str = include_str!("take.lua");

/// The scripts, hashed once for `EVALSHA`.
pub(super) struct Scripts {
    pub(super) deliver: Script,
    pub(super) store: Script,
    pub(super) list: Script,
    pub(super) get: Script,
    pub(super) delete: Script,
    pub(super) take: Script,
}

pub(super) fn scripts() -> &'static Scripts {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    // The scripts name the users of a change as `Change::payloads` does: up to the feed's
    // own limits, and `*` beyond them.
    let many = |script: &str| {
        script
            .replace("MANY_USERS", &crate::changes::MANY_USERS.to_string())
            .replace("LISTED_USERS", &crate::changes::LISTED_USERS.to_string())
    };
    SCRIPTS.get_or_init(|| Scripts {
        deliver: Script::new(&many(DELIVER)),
        store: Script::new(&many(STORE)),
        list: Script::new(LIST),
        get: Script::new(GET),
        delete: Script::new(DELETE),
        take: Script::new(TAKE),
    })
}
