//! The Redis backend's change feed: `SUBSCRIBE` to the changes channel its scripts publish
//! on, and syncs by a `PING` on that same subscribed connection.

use std::time::Duration;

use redis::{Client, Msg, RedisError};

use super::CONNECT_TIMEOUT;
use crate::backend::{Change, FeedSink, Wanted};
use crate::changes::SYNC_TIMEOUT;

/// How long the change feed waits before subscribing again after losing its connection.
const FEED_RETRY: Duration = Duration::from_secs(1);

/// The change feed: `SUBSCRIBE P changes` on a connection of its own. The scripts publish
/// from inside each change, so a message arrives exactly when the change is visible.
///
/// A sync is a `PING` on the subscribed connection. Redis runs one command at a time and
/// writes to a connection in the order it ran the commands: every `PUBLISH` that ran before
/// the `PING` has put its message on the connection ahead of the reply. The client's reader
/// queues messages as it reads them, so once the reply is in, the messages ahead of it are
/// queued too: the feed takes them, then reports the sync done. One round trip on one
/// connection, and nothing for any other subscriber to receive.
pub(super) async fn watch(client: &Client, channel: &str, sink: &FeedSink) {
    use rocket::futures::StreamExt;
    loop {
        let subscribing = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok::<_, RedisError>(pubsub)
        };
        let subscribed = rocket::tokio::select! {
            _ = sink.closed() => return,
            subscribed = rocket::tokio::time::timeout(CONNECT_TIMEOUT, subscribing) => subscribed,
        };
        let pubsub = match subscribed {
            Ok(Ok(pubsub)) => pubsub,
            failed => {
                if let Ok(Err(e)) = failed {
                    log::warn!("stored-messages: change feed down, cannot subscribe: {e}");
                }
                sink.lost();
                rocket::tokio::select! {
                    _ = sink.closed() => return,
                    _ = rocket::tokio::time::sleep(FEED_RETRY) => continue,
                }
            }
        };
        let (mut commands, mut messages) = pubsub.split();
        // Every write that publishes waits COMMIT_WAIT after Redis answered it.
        sink.writers_wait();
        sink.live();
        loop {
            rocket::tokio::select! {
                _ = sink.closed() => return,
                message = messages.next() => match message {
                    Some(message) => report(sink, &message),
                    // The connection dropped: messages may have been missed.
                    None => {
                        log::warn!("stored-messages: change feed down, lost the Redis subscription");
                        sink.lost();
                        break;
                    }
                },
                wanted = sink.wanted() => match wanted {
                    Wanted::Sync(n) => {
                        // Bounded: a server that stopped answering is not waited for.
                        let ping = commands.ping_message::<redis::Value>(n);
                        match rocket::tokio::time::timeout(SYNC_TIMEOUT, ping).await {
                            Ok(Ok(_)) => {
                                if !take_queued(sink, &mut messages) {
                                    log::warn!("stored-messages: change feed down, lost the Redis subscription");
                                    sink.lost();
                                    break;
                                }
                                sink.synced(n);
                            }
                            // No answer, or an error on the subscribed connection: whether
                            // messages were missed cannot be told.
                            Ok(Err(e)) => {
                                log::warn!("stored-messages: change feed down, a sync failed: {e}");
                                sink.lost();
                                break;
                            }
                            Err(_) => {
                                sink.lost();
                                break;
                            }
                        }
                    }
                    Wanted::Reconnect => {
                        sink.lost();
                        break;
                    }
                },
            }
        }
    }
}

/// Reports one message of the changes channel.
fn report(sink: &FeedSink, message: &Msg) {
    let payload: String = message.get_payload().unwrap_or_default();
    sink.changed(Change::parse(&payload));
}

/// Reports every message already queued, without waiting for more. `false` when the
/// subscription has ended.
fn take_queued(sink: &FeedSink, messages: &mut redis::aio::PubSubStream) -> bool {
    use rocket::futures::{FutureExt, StreamExt};
    loop {
        match messages.next().now_or_never() {
            Some(Some(message)) => report(sink, &message),
            Some(None) => return false,
            None => return true,
        }
    }
}
