//! Events about stored messages, and the hub applications subscribe to.
//!
//! The hub is a bounded broadcast channel: a write publishes and moves on, whoever listens.
//! A subscriber that falls behind loses the oldest events (its receiver reports how many)
//! instead of slowing writers down; callbacks run on their own task for the same reason.

use std::sync::Arc;

use rocket::tokio::sync::broadcast;
use rocket::tokio::task::JoinHandle;

use crate::message::{Message, MessageId, UserId};

/// How many events a subscriber may lag behind before it starts losing the oldest.
const CAPACITY: usize = 1024;

/// Something that happened to stored messages.
///
/// Bulk writes publish one event for all their users (a broadcast to a million users is one
/// `InboxStored`, not a million).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// `message` entered the inbox of each of `users` (sorted, unique).
    InboxStored {
        /// Recipients, sorted by id.
        users: Arc<[UserId]>,
        /// The message.
        message: Arc<Message>,
    },
    /// Messages left a user's inbox (they were read).
    InboxDeleted {
        /// Whose inbox.
        user: UserId,
        /// Which messages.
        message_ids: Arc<[MessageId]>,
    },
    /// A user's inbox was emptied (mark all read); `count` entries left it.
    InboxPurged {
        /// Whose inbox.
        user: UserId,
        /// How many entries were removed.
        count: u64,
    },
    /// `message` entered the archive of each of `users` (sorted, unique).
    ArchiveStored {
        /// Recipients, sorted by id.
        users: Arc<[UserId]>,
        /// The message.
        message: Arc<Message>,
    },
}

impl Event {
    /// Whether the event concerns `user`.
    pub fn concerns(&self, user: UserId) -> bool {
        match self {
            Event::InboxStored { users, .. } | Event::ArchiveStored { users, .. } => {
                users.binary_search(&user).is_ok()
            }
            Event::InboxDeleted { user: u, .. } | Event::InboxPurged { user: u, .. } => *u == user,
        }
    }
}

/// The event hub. Cloning it gives another handle to the same hub.
#[derive(Debug, Clone)]
pub struct Events {
    sender: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Events {
        Events::new()
    }
}

impl Events {
    /// A hub with no subscribers.
    pub fn new() -> Events {
        let (sender, _) = broadcast::channel(CAPACITY);
        Events { sender }
    }

    /// Publishes an event to every current subscriber. Never blocks, never fails: with no
    /// subscriber the event is simply dropped.
    pub fn publish(&self, event: Event) {
        let _ = self.sender.send(event);
    }

    /// An async channel of every event from now on. A receiver more than 1024 events behind
    /// gets `RecvError::Lagged(n)` and continues with the oldest it still has.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender.subscribe()
    }

    /// Calls `callback` for every event from now on, on a task of its own, so a slow callback
    /// delays only itself. Must be called inside a Tokio runtime. The task ends when the hub
    /// is dropped or the returned handle is aborted.
    pub fn on<F>(&self, callback: F) -> JoinHandle<()>
    where
        F: Fn(&Event) + Send + Sync + 'static,
    {
        let mut receiver = self.subscribe();
        rocket::tokio::spawn(async move {
            loop {
                match receiver.recv().await {
                    Ok(event) => callback(&event),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        log::warn!("stored-messages: event callback lagged, {n} events skipped");
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    fn purged(count: u64) -> Event {
        Event::InboxPurged {
            user: UserId(1),
            count,
        }
    }

    #[rocket::async_test]
    async fn a_subscriber_that_never_reads_blocks_nothing() {
        let events = Events::new();
        let mut idle = events.subscribe();
        // Far more than the channel holds: publishing never waits for the idle subscriber.
        for i in 0..(CAPACITY as u64 * 5) {
            events.publish(purged(i));
        }
        match idle.recv().await {
            Err(broadcast::error::RecvError::Lagged(n)) => assert_eq!(n, CAPACITY as u64 * 4),
            other => panic!("expected a lag report, got {other:?}"),
        }
        // It then continues with the oldest event it still has.
        assert_eq!(idle.recv().await.unwrap(), purged(CAPACITY as u64 * 4));
    }

    #[rocket::async_test]
    async fn callbacks_see_every_event_on_their_own_task() {
        let events = Events::new();
        let seen = Arc::new(AtomicUsize::new(0));
        let (done, mut finished) = rocket::tokio::sync::mpsc::unbounded_channel();
        let counter = seen.clone();
        let task = events.on(move |_| {
            if counter.fetch_add(1, Ordering::SeqCst) + 1 == 3 {
                let _ = done.send(());
            }
        });
        for i in 0..3 {
            events.publish(purged(i));
        }
        finished.recv().await.unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 3);
        task.abort();
    }
}
