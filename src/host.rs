//! What a host application tells the library about its users.
//!
//! The library owns messages, not users. A host implements [`Host`] to say who the current
//! user of a request is and which users exist (the audience of a broadcast); the reference
//! app's implementation reads its own users table and session cookie.

use rocket::Request;

use crate::error::BoxError;
use crate::message::UserId;

/// The host application's view of users.
///
/// # Examples
///
/// A host whose session cookie holds the user id:
///
/// ```
/// use stored_messages::{BoxError, Host, UserId};
/// use rocket::Request;
///
/// struct MyUsers;
///
/// #[rocket::async_trait]
/// impl Host for MyUsers {
///     async fn current_user(&self, request: &Request<'_>) -> Option<UserId> {
///         let cookie = request.cookies().get_private("user_id")?;
///         cookie.value().parse().ok().map(UserId)
///     }
///
///     async fn all_users(&self) -> Result<Vec<UserId>, BoxError> {
///         Ok(vec![UserId(1), UserId(2)])
///     }
/// }
/// ```
#[rocket::async_trait]
pub trait Host: Send + Sync + 'static {
    /// The logged-in user of this request, or `None` for an anonymous visitor. Called at
    /// most once per request (the answer is cached).
    async fn current_user(&self, request: &Request<'_>) -> Option<UserId>;

    /// Every user that exists now: the audience of [`crate::Store::broadcast_message`].
    async fn all_users(&self) -> Result<Vec<UserId>, BoxError>;
}
