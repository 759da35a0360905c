//! The Redis backend's change feed: `SUBSCRIBE` to the changes channel its scripts publish
//! on, and syncs by a marker on a channel of this process's own.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{Client, RedisError};

use super::CONNECT_TIMEOUT;
use crate::backend::{Change, FeedSink, Wanted};
use crate::changes::SYNC_TIMEOUT;

/// How long the change feed waits before subscribing again after losing its connection.
const FEED_RETRY: Duration = Duration::from_secs(1);

/// The change feed: `SUBSCRIBE P changes` and a sync channel of this process's own, on a
/// connection of its own. The scripts publish from inside each change, so a message arrives
/// exactly when the change is visible.
///
/// A sync marker is a `PUBLISH` on the sync channel over the shared connection. Redis runs
/// one command at a time and a subscriber receives its messages in the order the server ran
/// the `PUBLISH`es, so when the marker arrives, every change published before it has arrived.
pub(super) async fn watch(
    client: &Client,
    mut connection: ConnectionManager,
    channel: &str,
    sync_channel: &str,
    sink: &FeedSink,
) {
    use rocket::futures::StreamExt;
    loop {
        let subscribing = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&[channel, sync_channel]).await?;
            Ok::<_, RedisError>(pubsub)
        };
        let subscribed = rocket::tokio::select! {
            _ = sink.closed() => return,
            subscribed = rocket::tokio::time::timeout(CONNECT_TIMEOUT, subscribing) => subscribed,
        };
        let mut pubsub = match subscribed {
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
        sink.live();
        let mut messages = pubsub.on_message();
        loop {
            rocket::tokio::select! {
                _ = sink.closed() => return,
                message = messages.next() => match message {
                    Some(message) if message.get_channel_name() == sync_channel => {
                        let payload: String = message.get_payload().unwrap_or_default();
                        if let Ok(n) = payload.parse() {
                            sink.synced(n);
                        }
                    }
                    Some(message) => {
                        let payload: String = message.get_payload().unwrap_or_default();
                        sink.changed(Change::parse(&payload));
                    }
                    // The connection dropped: messages may have been missed.
                    None => {
                        log::warn!("stored-messages: change feed down, lost the Redis subscription");
                        sink.lost();
                        break;
                    }
                },
                wanted = sink.wanted() => match wanted {
                    Wanted::Sync(n) => {
                        let mut publish = ::redis::cmd("PUBLISH");
                        publish.arg(sync_channel).arg(n);
                        let publish = publish.query_async::<u64>(&mut connection);
                        // Bounded: a server that stopped answering is not waited for.
                        match rocket::tokio::time::timeout(SYNC_TIMEOUT, publish).await {
                            // Nobody received it: this subscription is gone, though its
                            // connection has not said so yet.
                            Ok(Ok(0)) | Err(_) => {
                                sink.lost();
                                break;
                            }
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => {
                                log::warn!("stored-messages: sending a change feed sync failed: {e}");
                                sink.sync_failed();
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
