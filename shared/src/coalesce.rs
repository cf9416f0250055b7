//! Group commit: single requests of concurrent callers merged into one call.
//!
//! Owns one background task per [`Coalescer`]. A caller hands in one item and awaits its own
//! answer; the task takes every item waiting at that moment (up to a batch's limit), runs them
//! through one batched call (one Redis script for many executions, say) and answers each
//! caller in order. Nothing waits for a batch to fill: an item that finds the task idle goes
//! alone at once, so a quiet worker adds no latency, and items arriving while `in_flight`
//! batches are under way gather into the next one, so a busy worker pays one call's overhead
//! for many items. A failed call fails each of its items with the same error.
//!
//! It never retries and never reorders answers; what a batched call does atomically is the
//! caller's business. The task ends when the last handle is dropped.
//!
//! Written here rather than taken from a batching crate: the ones in the ecosystem open
//! tracing spans per item, a cost per device on the hottest path, and we need nothing beyond
//! "take what is waiting".

use std::{future::Future, sync::Arc};

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::redis_conn::RedisConn;

/// Why a coalesced call gave no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CoalesceError<E> {
    /// The batched call failed: every item of its batch gets its error.
    #[error(transparent)]
    Failed(E),
    /// The batching task is gone (the runtime is shutting down), or the batched call answered
    /// fewer items than it was given.
    #[error("the batching task stopped before answering")]
    Stopped,
}

type Waiter<I, O, E> = (I, oneshot::Sender<Result<O, E>>);

/// A handle for submitting items; cheap to clone (clones share the background task).
pub struct Coalescer<I, O, E> {
    tx: mpsc::UnboundedSender<Waiter<I, O, E>>,
}

impl<I, O, E> Clone for Coalescer<I, O, E> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<I, O, E> std::fmt::Debug for Coalescer<I, O, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer").finish_non_exhaustive()
    }
}

impl<I, O, E> Coalescer<I, O, E>
where
    I: Send + 'static,
    O: Send + 'static,
    E: Clone + Send + 'static,
{
    /// Starts the background task (on the current tokio runtime): batches of at most
    /// `max_batch` items, at most `in_flight` batched calls at once, each made by `run`, which
    /// must answer its items in order, one answer each.
    pub fn start<F, Fut>(max_batch: usize, in_flight: usize, run: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<O>, E>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<Waiter<I, O, E>>();
        let max_batch = max_batch.max(1);
        let permits = Arc::new(Semaphore::new(in_flight.max(1)));
        tokio::spawn(async move {
            let mut waiting = Vec::with_capacity(max_batch);
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                if rx.recv_many(&mut waiting, max_batch).await == 0 {
                    break; // every handle is gone
                }
                let (items, answers): (Vec<I>, Vec<_>) = waiting.drain(..).unzip();
                let call = run(items);
                tokio::spawn(async move {
                    let outcome = call.await;
                    drop(permit);
                    match outcome {
                        Ok(outputs) => {
                            // Fewer outputs than items: the callers left over see `Stopped`.
                            for (answer, output) in answers.into_iter().zip(outputs) {
                                let _ = answer.send(Ok(output));
                            }
                        }
                        Err(e) => {
                            for answer in answers {
                                let _ = answer.send(Err(e.clone()));
                            }
                        }
                    }
                });
            }
        });
        Self { tx }
    }

    /// Submits `item` and waits for its answer.
    ///
    /// # Errors
    /// The batched call's error, or [`CoalesceError::Stopped`].
    pub async fn call(&self, item: I) -> Result<O, CoalesceError<E>> {
        let (answer, rx) = oneshot::channel();
        self.tx
            .send((item, answer))
            .map_err(|_| CoalesceError::Stopped)?;
        match rx.await {
            Ok(Ok(output)) => Ok(output),
            Ok(Err(e)) => Err(CoalesceError::Failed(e)),
            Err(_) => Err(CoalesceError::Stopped),
        }
    }
}

/// One item of a batched Redis script: its keys and arguments, laid out as the script reads
/// them (a fixed number of each per item).
#[derive(Debug, Default)]
pub struct ScriptItem {
    /// The item's keys.
    pub keys: Vec<String>,
    /// The item's arguments (text or binary).
    pub args: Vec<Vec<u8>>,
}

/// Items of one Redis script merged into one call, answered with one `T` each.
pub type ScriptBatcher<T> = Coalescer<ScriptItem, T, Arc<redis::RedisError>>;

/// A [`ScriptBatcher`] for `script`, which loops over its items (keys and arguments of every
/// item concatenated, in order) and returns an array of one answer an item.
pub fn script_batcher<T>(
    redis: RedisConn,
    script: Arc<redis::Script>,
    max_batch: usize,
    in_flight: usize,
) -> ScriptBatcher<T>
where
    T: redis::FromRedisValue + Send + 'static,
{
    Coalescer::start(max_batch, in_flight, move |items: Vec<ScriptItem>| {
        let (mut redis, script) = (redis.clone(), script.clone());
        async move {
            let mut call = script.prepare_invoke();
            for item in &items {
                for k in &item.keys {
                    call.key(k);
                }
                for a in &item.args {
                    call.arg(a);
                }
            }
            call.invoke_async(&mut redis).await.map_err(Arc::new)
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[tokio::test]
    async fn concurrent_items_share_calls_and_each_gets_its_own_answer() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let c = Coalescer::start(8, 1, move |items: Vec<u32>| {
            seen.lock().expect("lock").push(items.len());
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                Ok::<_, String>(items.into_iter().map(|i| i * 10).collect())
            }
        });
        let calls: Vec<_> = (0..40u32)
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move { (i, c.call(i).await) })
            })
            .collect();
        for call in calls {
            let (i, answer) = call.await.expect("task");
            assert_eq!(answer.expect("answer"), i * 10);
        }
        let sizes = sizes.lock().expect("lock").clone();
        assert_eq!(sizes.iter().sum::<usize>(), 40);
        assert!(sizes.iter().all(|&n| n <= 8), "{sizes:?}");
        // The first item went alone; the rest gathered while one call was under way.
        assert!(sizes.len() < 40, "nothing was merged: {sizes:?}");
    }

    #[tokio::test]
    async fn a_failed_call_fails_each_of_its_items_and_a_short_answer_stops_the_rest() {
        let c = Coalescer::start(4, 1, |items: Vec<u32>| async move {
            if items.contains(&7) {
                Err("down".to_owned())
            } else {
                Ok(Vec::<u32>::new())
            }
        });
        assert!(matches!(c.call(7).await, Err(CoalesceError::Failed(e)) if e == "down"));
        assert!(matches!(c.call(1).await, Err(CoalesceError::Stopped)));
    }
}
