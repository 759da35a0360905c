//! Flash messages: one-shot messages for the next page a browser sees, many at a time.
//!
//! The queue lives in a private (encrypted, authenticated) cookie; what does not fit spills
//! to the backend under a random key (see [`overflow`]). A tampered or malformed cookie
//! decodes to an empty queue: it is logged at debug level and never an error page.

pub mod cookie;
pub mod overflow;
