//! Publishing results.
//!
//! Owns the one way a [`TaskResult`] leaves a worker: to the results exchange, persistent,
//! mandatory, confirmed by the broker before the caller may ack the task. Results are
//! batched: a [`Reporter`] collects what handlers finish within a couple of milliseconds (up
//! to `max_batch`) into one [`ResultBatch`] message, publishes it once, and tells every
//! waiting handler the outcome of that one confirm. The broker then stores one message for
//! many devices, which is most of what limits throughput. Each handler still waits for its
//! own result's confirm, so the ack-after-confirm rule holds per task. It never decides
//! outcomes.

use std::time::Duration;

use lapin::types::FieldTable;
use shared::{
    amqp::{self, AmqpError, Outgoing, Publisher},
    messages::{self, RESULT_BATCH_TYPE, ResultBatch, TaskResult, WIRE_VERSION},
    topology::{Names, RESULT_ROUTING_KEY},
};
use tokio::sync::{mpsc, oneshot};

type Waiter = oneshot::Sender<Result<(), String>>;

/// Why a result could not be published.
#[derive(Debug, thiserror::Error)]
#[error("result not published: {0}")]
pub struct ReportError(String);

/// The handle handlers publish results through.
#[derive(Debug, Clone)]
pub struct Reporter {
    tx: mpsc::Sender<(TaskResult, Waiter)>,
    /// The channel results go out on (its state tells whether the reporter can work).
    channel: lapin::Channel,
}

/// A batch stops growing past about this many bytes, well under the broker's message size
/// limit, however long the devices' error texts are.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// About how many bytes a result takes in a batch.
fn approx_size(r: &TaskResult) -> usize {
    let readings = r.readings.as_ref().map_or(0, |m| {
        m.iter()
            .map(|(k, v)| k.len() + v.to_string().len() + 8)
            .sum()
    });
    256 + r.device_id.len() + r.worker.len() + r.error.as_ref().map_or(0, String::len) + readings
}

impl Reporter {
    /// Starts the batching task on `publisher`; it ends when every [`Reporter`] clone is
    /// dropped.
    pub fn start(publisher: Publisher, names: Names, max_batch: usize, linger: Duration) -> Self {
        let (tx, rx) = mpsc::channel(max_batch.max(1) * 4);
        let channel = publisher.channel().clone();
        tokio::spawn(batch_loop(publisher, names, rx, max_batch.max(1), linger));
        Self { tx, channel }
    }

    /// Whether the results channel is open (a broker that closed it, e.g. over a deleted
    /// exchange, leaves the reporter unable to publish until the session is rebuilt).
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Publishes `result` (in a batch) and waits for the broker's confirm of that batch.
    ///
    /// # Errors
    /// The batch was not confirmed (closed channel, nack, timeout).
    pub async fn publish(&self, result: TaskResult) -> Result<(), ReportError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send((result, done))
            .await
            .map_err(|_| ReportError("the reporter stopped".into()))?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ReportError(e)),
            Err(_) => Err(ReportError("the reporter stopped".into())),
        }
    }
}

async fn batch_loop(
    publisher: Publisher,
    names: Names,
    mut rx: mpsc::Receiver<(TaskResult, Waiter)>,
    max_batch: usize,
    linger: Duration,
) {
    while let Some(first) = rx.recv().await {
        let mut bytes = approx_size(&first.0);
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + linger;
        while batch.len() < max_batch && bytes < MAX_BATCH_BYTES {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(item)) => {
                    bytes += approx_size(&item.0);
                    batch.push(item);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let (results, waiters): (Vec<TaskResult>, Vec<Waiter>) = batch.into_iter().unzip();
        let outcome = publish_batch(&publisher, &names, results)
            .await
            .map_err(|e| format!("{e}: {e:?}"));
        for w in waiters {
            let _ = w.send(outcome.clone());
        }
    }
}

async fn publish_batch(
    publisher: &Publisher,
    names: &Names,
    results: Vec<TaskResult>,
) -> Result<(), AmqpError> {
    let id = results
        .first()
        .map(|r| r.execution_id.to_string())
        .unwrap_or_default();
    let payload = messages::encode(&ResultBatch {
        version: WIRE_VERSION,
        results,
    })?;
    let mut headers = FieldTable::default();
    amqp::inject_current_context(&mut headers);
    publisher
        .publish(Outgoing {
            exchange: &names.results_exchange(),
            routing_key: RESULT_ROUTING_KEY,
            payload: &payload,
            properties: amqp::properties(RESULT_BATCH_TYPE, &id, headers),
        })
        .await
}
