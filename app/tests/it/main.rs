//! The one integration test binary (one link, many modules).

// First, so its macros are visible in the modules below.
#[macro_use]
mod common;

mod admin;
mod api;
mod backend;
mod browser;
mod cli;
mod host;
mod outage;
mod pages;
mod processes;
mod redis_backend;
mod unsettled;
