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
    /// The logged-in user of this request, or `None` for an anonymous visitor. The library
    /// asks it once per request (and keeps the answer for that request).
    async fn current_user(&self, request: &Request<'_>) -> Option<UserId>;

    /// As [`Host::current_user`], for a host whose lookup can fail (its session store does
    /// not answer). An error means "cannot tell", and the library never takes it for an
    /// anonymous visitor: the API, the live stream and the [`crate::Messages`] guard answer
    /// 503; the template helpers of a page rendered without that guard show what they show
    /// when the store fails (a count of `?`, a list that says messages are unavailable); and
    /// the request's CSRF cookie is left as it is (not replaced by an anonymous one). The library asks this method, not `current_user`; the default asks
    /// `current_user`, which cannot fail.
    async fn try_current_user(&self, request: &Request<'_>) -> Result<Option<UserId>, BoxError> {
        Ok(self.current_user(request).await)
    }

    /// Every user that exists now: the audience of [`crate::Store::broadcast_message`].
    async fn all_users(&self) -> Result<Vec<UserId>, BoxError>;

    /// What identifies this request's session, if the host keeps server-side sessions (the
    /// session's id, or any value that changes when the session does). The CSRF token is
    /// bound to it: a token issued in one session is refused in any other, and a new one is
    /// issued whenever it changes (login, logout, another user). The default, `None`, binds
    /// the token to [`Host::current_user`] instead (anonymous, or which user), which gives
    /// the same guarantees except between two sessions of one user.
    async fn session_key(&self, request: &Request<'_>) -> Option<String> {
        let _ = request;
        None
    }

    /// What ties a live stream (`GET <api>/stream`) opened by this request to its session,
    /// for [`Host::session_active`] to check later: the session's id, say (it stays in the
    /// server's memory). The default, `None`, ties streams to nothing: they end when the
    /// client goes away or the server stops, not when the session ends.
    async fn stream_session(&self, request: &Request<'_>) -> Option<String> {
        let _ = request;
        None
    }

    /// Whether `session` (what [`Host::stream_session`] gave) is still `user`'s live session.
    /// An open stream asks before it sends anything after its user's inbox was announced as
    /// changed, and at least every [`crate::live::SESSION_CHECK`]; on `false` it ends
    /// without sending. So to end a user's streams at once, on every instance, when their
    /// sessions end (logout, a password change), announce a change of that user on the
    /// store's feed ([`crate::ChangeFeed::announce`]). Keep it cheap (a cache): a broadcast
    /// makes every stream ask (see [`Host::sessions_active`]). Answer `false` when the
    /// session cannot be vouched for (its store does not answer): the client reconnects, and
    /// its new request is checked as any other. The default says yes.
    async fn session_active(&self, user: UserId, session: &str) -> bool {
        let _ = (user, session);
        true
    }

    /// [`Host::session_active`] for many streams at once, one answer per pair in their
    /// order: after a broadcast every open stream asks, and the library gathers their asks
    /// into batches of up to 500. The default asks [`Host::session_active`] for each, all
    /// at once (as many checks in flight as the batch holds); a host whose sessions live in
    /// a database can answer a batch with one query (the reference app does). An answer of
    /// another length counts as no answer: each stream then asks [`Host::session_active`]
    /// alone.
    async fn sessions_active(&self, sessions: &[(UserId, &str)]) -> Vec<bool> {
        let checks = sessions
            .iter()
            .map(|(user, session)| self.session_active(*user, session));
        rocket::futures::future::join_all(checks).await
    }
}

/// The host could not tell who the current user is ([`Host::try_current_user`] failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unidentified;

/// The current user of `request` as the host says, asked once per request.
pub(crate) async fn current_user(
    request: &Request<'_>,
    host: &dyn Host,
) -> Result<Option<UserId>, Unidentified> {
    struct Cached(Result<Option<UserId>, Unidentified>);
    request
        .local_cache_async(async {
            Cached(host.try_current_user(request).await.map_err(|e| {
                log::error!(
                    "stored-messages: the host could not tell who the user of {} is: {}",
                    request.uri().path(),
                    crate::report(&*e)
                );
                Unidentified
            }))
        })
        .await
        .0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sessions named `live-<user>` are that user's. Each check waits until all five of a
    /// batch are in flight: checks asked one after the other would wait forever.
    struct Named(rocket::tokio::sync::Barrier);

    #[rocket::async_trait]
    impl Host for Named {
        async fn current_user(&self, _: &Request<'_>) -> Option<UserId> {
            None
        }

        async fn all_users(&self) -> Result<Vec<UserId>, BoxError> {
            Ok(Vec::new())
        }

        async fn session_active(&self, user: UserId, session: &str) -> bool {
            self.0.wait().await;
            session == format!("live-{user}")
        }
    }

    /// The default batch asks every session's own check at once, and answers in the asks'
    /// order.
    #[rocket::async_test]
    async fn a_batch_of_session_checks_asks_each_at_once() {
        let host = Named(rocket::tokio::sync::Barrier::new(5));
        let asks = [
            (UserId(1), "live-1"),
            (UserId(2), "live-1"),
            (UserId(3), "live-3"),
            (UserId(4), "gone"),
            (UserId(5), "live-5"),
        ];
        let answers = rocket::tokio::time::timeout(
            std::time::Duration::from_secs(30),
            host.sessions_active(&asks),
        )
        .await
        .expect("the checks of a batch run at once, not one after the other");
        assert_eq!(answers, [true, false, true, false, true]);
        assert!(host.sessions_active(&[]).await.is_empty());
    }
}
