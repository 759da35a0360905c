//! The one integration test binary (one link, many modules).

mod api;
mod backend;
mod browser;
mod cli;
mod common;
mod pages;
