//! The tasks consumer.
//!
//! Owns the tasks channel, its prefetch, the consumer and every ack, nack, reject and
//! forwarded copy: a handler decides an [`Outcome`], and [`settle`] applies it. On shutdown it cancels the
//! consumer first (no new deliveries), hands back anything delivered after that, and lets
//! in-flight handlers finish. It never decides an outcome itself.

use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use lapin::{
    Channel,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
        BasicQosOptions, BasicRejectOptions,
    },
    types::FieldTable,
};
use shared::{
    amqp::{AmqpError, Publisher},
    messages::DeviceTask,
    topology::Names,
};
use tokio_util::task::TaskTracker;

use crate::handle::{self, Context, ForwardTo, Outcome};

/// Consumes tasks until shutdown fires or the channel fails; handlers run on `tracker`.
///
/// # Errors
/// The channel or connection failed.
pub async fn run(
    ctx: Arc<Context>,
    channel: Channel,
    tracker: TaskTracker,
) -> Result<(), AmqpError> {
    // Prefetch equals concurrency: the broker hands this worker at most as many tasks as it
    // works on at once, so a SIGKILL strands no more than that and other workers get the rest.
    channel
        .basic_qos(ctx.settings.worker.concurrency, BasicQosOptions::default())
        .await?;
    let tag = format!("{}-tasks", ctx.worker_id);
    let mut consumer = channel
        .basic_consume(
            ctx.names.tasks_queue().into(),
            tag.clone().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue = %ctx.names.tasks_queue(), prefetch = ctx.settings.worker.concurrency, "consuming tasks");

    // A broker that drops the connection does not always end the consumer's stream at once:
    // look at the channel every second, so the worker reconnects promptly.
    let mut watch = tokio::time::interval(std::time::Duration::from_secs(1));
    let result = loop {
        tokio::select! {
            biased;
            // Shutdown: stop taking tasks at once.
            _ = ctx.shutdown.cancelled() => break Ok(()),
            _ = watch.tick() => {
                if !channel.status().connected() {
                    break Err(AmqpError::ConnectionLost);
                }
            }
            // The next task.
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let ctx = ctx.clone();
                    tracker.spawn(async move {
                        ctx.metrics.in_flight.inc();
                        // A panic in a handler must not leak the delivery (unacked, holding a
                        // prefetch slot for good): the task is dead-lettered with the reason.
                        let handled = std::panic::AssertUnwindSafe(handle::handle(
                            &ctx,
                            &delivery.data,
                            delivery.properties.headers().as_ref(),
                        ))
                        .catch_unwind()
                        .await;
                        let outcome = match handled {
                            Ok(outcome) => outcome,
                            Err(panic) => {
                                let what = panic
                                    .downcast_ref::<&str>()
                                    .map(|s| (*s).to_owned())
                                    .or_else(|| panic.downcast_ref::<String>().cloned())
                                    .unwrap_or_else(|| "unknown panic".into());
                                // The handler holds nothing any more: its claim goes, so the
                                // coordinators can end the device with the reason at once.
                                if let Ok(task) = shared::messages::decode_task(&delivery.data) {
                                    let mut redis = ctx.redis.clone();
                                    let _ = crate::idempotency::release(
                                        &mut redis,
                                        &ctx.names,
                                        task.execution_id,
                                        &ctx.worker_id,
                                    )
                                    .await;
                                }
                                Outcome::DeadLetter(format!("the task's handler panicked: {what}"))
                            }
                        };
                        settle(&ctx, delivery, outcome).await;
                        ctx.metrics
                            .last_settled_ms
                            .store(shared::now_ms(), std::sync::atomic::Ordering::Relaxed);
                        ctx.metrics.in_flight.dec();
                    });
                }
                // The channel or connection failed: in-flight tasks return to the queue.
                Some(Err(e)) => break Err(AmqpError::from(e)),
                // The stream ended without our cancel: the channel is gone.
                None => break Err(AmqpError::ConsumerCancelled),
            },
        }
    };

    if result.is_ok() {
        // Every broker call on the way out is bounded: a channel the broker or the client
        // library left half-closed must not hold the process (unacked tasks return to the
        // queue when the connection goes).
        let cancel = channel.basic_cancel(tag.into(), BasicCancelOptions::default());
        match tokio::time::timeout(STOP_CALL_TIMEOUT, cancel).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error.message = %e, "cancelling the consumer failed"),
            Err(_) => tracing::warn!(
                timeout_ms = STOP_CALL_TIMEOUT.as_millis() as u64,
                "the broker did not confirm the consumer's cancel; stopping anyway"
            ),
        }
        // Deliveries already on their way when we cancelled: hand them back untouched.
        while let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(std::time::Duration::from_millis(100), consumer.next()).await
        {
            let nack = delivery.acker.nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            });
            let _ = tokio::time::timeout(STOP_CALL_TIMEOUT, nack).await;
        }
    }
    result
}

/// How long one broker call may take while a worker stops.
pub(crate) const STOP_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Applies a handler's decision to the broker.
pub async fn settle(ctx: &Context, delivery: Delivery, outcome: Outcome) {
    let acker = &delivery.acker;
    let settled = match outcome {
        Outcome::Ack => acker.ack(BasicAckOptions::default()).await,
        Outcome::Forward { to, task } => {
            match forward(&ctx.publisher, &ctx.names, to, &task).await {
                Ok(()) => acker.ack(BasicAckOptions::default()).await,
                Err(e) => {
                    tracing::warn!(error.message = %e, error.cause_chain = %shared::telemetry::chain(&e), "could not forward a task; handing it back");
                    acker.nack(requeue()).await
                }
            }
        }
        Outcome::DeadLetter(reason) => {
            tracing::error!(%reason, queue = %ctx.names.tasks_queue(), "dead-lettering a task");
            ctx.metrics
                .outcomes
                .with_label_values(&["dead_lettered"])
                .inc();
            match shared::topology::dead_letter(
                &ctx.publisher,
                &ctx.names,
                &ctx.names.tasks_queue(),
                &delivery.data,
                &delivery.properties,
                &reason,
            )
            .await
            {
                Ok(()) => acker.ack(BasicAckOptions::default()).await,
                // The queue's own dead-letter exchange still keeps the message.
                Err(_) => acker.reject(BasicRejectOptions { requeue: false }).await,
            }
        }
        Outcome::Requeue => acker.nack(requeue()).await,
    };
    if let Err(e) = settled {
        // The channel is gone; the broker will redeliver the task.
        tracing::warn!(error.message = %e, "could not settle a delivery");
    }
}

fn requeue() -> BasicNackOptions {
    BasicNackOptions {
        requeue: true,
        ..Default::default()
    }
}

/// Publishes a copy of a task (to the tasks exchange or a retry queue), confirmed.
///
/// # Errors
/// Broker errors.
async fn forward(
    publisher: &Publisher,
    names: &Names,
    to: ForwardTo,
    task: &DeviceTask,
) -> Result<(), shared::amqp::AmqpError> {
    let retry = match to {
        ForwardTo::Tasks => None,
        ForwardTo::Retry(n) => Some(n),
    };
    shared::topology::send_task(publisher, names, retry, task)
        .await?
        .wait()
        .await
}
