//! The reference application: users, login, admin and demo pages around the library.
//!
//! Nothing in the library imports from here; this module is one host among many.

pub mod users;
