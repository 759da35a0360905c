//! The one integration test binary (one link, many modules).

mod admin;
mod api;
mod backend;
mod browser;
mod cli;
mod common;
mod pages;
mod redis_backend;
