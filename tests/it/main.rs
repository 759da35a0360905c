//! The one integration test binary (one link, many modules).

mod backend;
mod cli;
mod common;
mod redis_backend;
