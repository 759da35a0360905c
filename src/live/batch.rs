//! Asks of many streams, answered together: one change can wake every stream at once (a
//! broadcast wakes them all), and each then checks its session and reads its inbox. Those asks
//! are gathered and answered [`BATCH`] at a time, one query per batch instead of one per
//! stream. No timer: while one batch is answered, the next one fills.

use std::sync::{Arc, Mutex, MutexGuard};

use rocket::futures::future::BoxFuture;
use rocket::tokio::sync::oneshot;

use crate::error::Result;

/// The most asks answered at once.
pub(crate) const BATCH: usize = 500;

/// Answers a batch of asks with what it needs (`C`, the store): one answer per ask, in
/// their order.
pub(crate) type Answer<C, Q, A> = for<'a> fn(&'a C, &'a [Q]) -> BoxFuture<'a, Result<Vec<A>>>;

/// Asks waiting for their batch, and how a batch is answered.
pub(crate) struct Batches<C, Q, A> {
    answer: Answer<C, Q, A>,
    pending: Mutex<Pending<Q, A>>,
}

struct Pending<Q, A> {
    asks: Vec<(Q, oneshot::Sender<A>)>,
    /// A task is answering batches.
    answering: bool,
}

impl<C, Q, A> Batches<C, Q, A>
where
    C: Clone + Send + Sync + 'static,
    Q: Send + Sync + 'static,
    A: Send + 'static,
{
    pub(crate) fn new(answer: Answer<C, Q, A>) -> Arc<Self> {
        Arc::new(Batches {
            answer,
            pending: Mutex::new(Pending {
                asks: Vec::new(),
                answering: false,
            }),
        })
    }

    fn pending(&self) -> MutexGuard<'_, Pending<Q, A>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The answer to `ask`, given with the other asks made meanwhile; `None` when its batch
    /// failed (the caller then asks alone, and gets the store's own answer or error).
    pub(crate) async fn ask(self: &Arc<Self>, context: &C, ask: Q) -> Option<A> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut pending = self.pending();
            pending.asks.push((ask, reply));
            !std::mem::replace(&mut pending.answering, true)
        };
        if start {
            // A task of its own: a stream that goes away must not take the others' asks with
            // it.
            rocket::tokio::spawn(Arc::clone(self).drain(context.clone()));
        }
        answer.await.ok()
    }

    /// Answers batches until nobody waits.
    async fn drain(self: Arc<Self>, context: C) {
        // The replies of the batch being answered. Declared before the guard, so that when
        // an answer panics they are dropped after it: a caller woken by that drop and asking
        // again then finds the next drain free to start, not its ask cleared by the guard.
        let mut replies: Vec<oneshot::Sender<A>> = Vec::new();
        let mut draining = Draining {
            batches: &self,
            done: false,
        };
        // Lets the other streams woken by the same change ask first.
        rocket::tokio::task::yield_now().await;
        loop {
            let asks: Vec<Q> = {
                let mut pending = self.pending();
                if pending.asks.is_empty() {
                    pending.answering = false;
                    // From here another ask may start the next drain.
                    draining.done = true;
                    return;
                }
                let n = pending.asks.len().min(BATCH);
                let mut asks = Vec::with_capacity(n);
                for (ask, reply) in pending.asks.drain(..n) {
                    asks.push(ask);
                    replies.push(reply);
                }
                asks
            };
            match (self.answer)(&context, &asks).await {
                Ok(answers) if answers.len() == replies.len() => {
                    for (reply, answer) in replies.drain(..).zip(answers) {
                        let _ = reply.send(answer);
                    }
                }
                // The replies are dropped: each stream asks alone.
                Ok(answers) => {
                    let asked = replies.len();
                    replies.clear();
                    log::error!(
                        "stored-messages: a batch of {asked} live asks got {} answers",
                        answers.len()
                    );
                }
                Err(e) => {
                    replies.clear();
                    log::debug!(
                        "stored-messages: a batch of live asks failed: {}",
                        crate::report(&e)
                    );
                }
            }
        }
    }
}

/// Ends a drain that did not end by itself (its answer panicked, or the runtime dropped the
/// task): the asks it left are dropped, so that their streams ask alone instead of waiting
/// forever, and the next ask starts a new drain.
struct Draining<'a, C, Q, A> {
    batches: &'a Batches<C, Q, A>,
    /// It ended by itself.
    done: bool,
}

impl<C, Q, A> Drop for Draining<'_, C, Q, A> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut pending = self
            .batches
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        pending.answering = false;
        pending.asks.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn doubled<'a>(
        calls: &'a Arc<AtomicUsize>,
        asks: &'a [u32],
    ) -> BoxFuture<'a, Result<Vec<u32>>> {
        calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move { Ok(asks.iter().map(|n| n * 2).collect()) })
    }

    fn short<'a>(_: &'a (), asks: &'a [u32]) -> BoxFuture<'a, Result<Vec<u32>>> {
        Box::pin(async move { Ok(asks.iter().skip(1).copied().collect()) })
    }

    fn failing<'a>(_: &'a (), _: &'a [u32]) -> BoxFuture<'a, Result<Vec<u32>>> {
        Box::pin(async move { Err(crate::Error::Config(vec!["down".into()])) })
    }

    /// Many asks at once: each gets its own answer, in batches. On one thread (tokio's
    /// default for a test) the drain runs only once every ask is made, as when one change
    /// wakes many streams; with a second thread it could answer each ask as it comes, and how
    /// many calls that takes would depend on the machine's load.
    #[tokio::test]
    async fn asks_made_together_are_answered_together() {
        let calls = Arc::new(AtomicUsize::new(0));
        let batches = Batches::new(doubled);
        let asks = (0..1200u32).map(|n| {
            let (batches, calls) = (Arc::clone(&batches), Arc::clone(&calls));
            async move { batches.ask(&calls, n).await }
        });
        let answers = rocket::futures::future::join_all(asks).await;
        for (n, answer) in answers.into_iter().enumerate() {
            assert_eq!(answer, Some(n as u32 * 2));
        }
        let made = calls.load(Ordering::SeqCst);
        assert_eq!(
            made,
            1200_usize.div_ceil(BATCH),
            "{made} calls for 1,200 asks"
        );
        // Nobody waits any more: the next ask starts a new task and is answered.
        assert_eq!(batches.ask(&calls, 7).await, Some(14));
    }

    fn refusing_13<'a>(_: &'a (), asks: &'a [u32]) -> BoxFuture<'a, Result<Vec<u32>>> {
        assert!(!asks.contains(&13), "a panicking answer");
        Box::pin(async move { Ok(asks.to_vec()) })
    }

    /// An answer that panics answers nobody of its batch, and leaves the next asks answered.
    #[rocket::async_test]
    async fn a_panicking_batch_leaves_the_next_ones_answered() {
        let batches = Batches::new(refusing_13);
        assert_eq!(batches.ask(&(), 13).await, None);
        let next =
            rocket::tokio::time::timeout(std::time::Duration::from_secs(30), batches.ask(&(), 12))
                .await
                .expect("an ask after a panicking batch is answered, not left waiting");
        assert_eq!(next, Some(12));
    }

    /// A failed batch, or one with too few answers, answers nobody: they ask alone.
    #[rocket::async_test]
    async fn a_failed_batch_answers_none() {
        assert_eq!(Batches::new(failing).ask(&(), 1).await, None);
        assert_eq!(Batches::new(short).ask(&(), 1).await, None);
    }
}
