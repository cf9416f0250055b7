//! The tasks consumer.
//!
//! Owns the tasks channel, its prefetch, the consumer, the permits that bound how many tasks
//! are handled at once, and every ack, nack, reject and forwarded copy: a message carries one
//! task or several ([`shared::messages::TaskBatch`]); a handler decides an [`Outcome`] for
//! each task, and [`settle`] (one task) or `settle_batch` (several) applies them to the
//! message. On shutdown it cancels the
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
use tokio::sync::Semaphore;
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
    // At most `concurrency` tasks are handled at once (the permits); the prefetch, in
    // messages of up to `amqp.tasks_per_message` tasks, is sized so that about twice that
    // many tasks are here, which keeps every permit busy while a message waits for its
    // slowest task, and leaves the rest of the queue to other workers. A SIGKILL strands no
    // more than the prefetch: it returns to the queue for the others.
    let concurrency = ctx.settings.worker.concurrency.max(1);
    let prefetch = prefetch(concurrency, ctx.settings.amqp.tasks_per_message);
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let permits = Arc::new(Semaphore::new(usize::from(concurrency)));
    let tag = format!("{}-tasks", ctx.worker_id);
    let mut consumer = channel
        .basic_consume(
            ctx.names.tasks_queue().into(),
            tag.clone().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue = %ctx.names.tasks_queue(), prefetch, concurrency, "consuming tasks");

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
                    let (ctx, permits) = (ctx.clone(), permits.clone());
                    tracker.spawn(async move { take(&ctx, &permits, delivery).await });
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

/// Messages to prefetch for `concurrency` tasks at once, with up to `per_message` tasks a
/// message: twice the messages that fill the permits, never more than `concurrency`.
fn prefetch(concurrency: u16, per_message: u16) -> u16 {
    let per_message = per_message.max(1);
    concurrency
        .div_ceil(per_message)
        .saturating_mul(2)
        .clamp(1, concurrency.max(1))
}

/// Handles every task of one delivery and settles it.
async fn take(ctx: &Context, permits: &Semaphore, delivery: Delivery) {
    let tasks = match shared::messages::decode_tasks(&delivery.data) {
        Ok(tasks) => tasks,
        Err(e) => {
            let reason = format!("undecodable task: {e}: {e:?}");
            settle(ctx, delivery, Outcome::DeadLetter(reason)).await;
            return;
        }
    };
    if tasks.len() > 1 && delivery.redelivered {
        // A batch that comes back was held by a consumer that died or lost its connection.
        // Its tasks go on as messages of their own, so a task that kills its consumer ends up
        // alone at the queue's delivery limit instead of taking its batch's devices with it.
        split(ctx, delivery, &tasks).await;
        return;
    }
    let headers = delivery.properties.headers().as_ref();
    let outcomes = futures::future::join_all(
        tasks
            .iter()
            .map(|task| handle_one(ctx, permits, task, headers)),
    )
    .await;
    if tasks.len() == 1 {
        let outcome = outcomes.into_iter().next().unwrap_or(Outcome::Requeue);
        settle(ctx, delivery, outcome).await;
    } else {
        settle_batch(ctx, delivery, tasks, outcomes).await;
    }
    ctx.metrics
        .last_settled_ms
        .store(shared::now_ms(), std::sync::atomic::Ordering::Relaxed);
}

/// Handles one task once a permit is free; a task not started when the worker stops is
/// handed back.
async fn handle_one(
    ctx: &Context,
    permits: &Semaphore,
    task: &DeviceTask,
    headers: Option<&FieldTable>,
) -> Outcome {
    let _permit = tokio::select! {
        biased;
        _ = ctx.shutdown.cancelled() => return Outcome::Requeue,
        permit = permits.acquire() => match permit {
            Ok(p) => p,
            Err(_) => return Outcome::Requeue,
        },
    };
    ctx.metrics.in_flight.inc();
    // A panic in a handler must not leak the delivery (unacked, holding a prefetch slot for
    // good): the task is dead-lettered with the reason.
    let handled = std::panic::AssertUnwindSafe(handle::handle(ctx, task, headers))
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
            // The handler holds nothing any more: its claim goes, so the coordinators can
            // end the device with the reason at once.
            let mut redis = ctx.redis.clone();
            let _ = crate::idempotency::release(
                &mut redis,
                &ctx.names,
                task.execution_id,
                &ctx.worker_id,
            )
            .await;
            Outcome::DeadLetter(format!("the task's handler panicked: {what}"))
        }
    };
    ctx.metrics.in_flight.dec();
    outcome
}

/// Re-publishes a batch's tasks one to a message (confirmed), then acks the batch.
async fn split(ctx: &Context, delivery: Delivery, tasks: &[DeviceTask]) {
    let mut confirms = Vec::with_capacity(tasks.len());
    let mut sent = Ok(());
    for task in tasks {
        match shared::topology::send_task(&ctx.publisher, &ctx.names, None, task).await {
            Ok(c) => confirms.push(c),
            Err(e) => {
                sent = Err(e);
                break;
            }
        }
    }
    for confirm in confirms {
        if let Err(e) = confirm.wait().await {
            sent = Err(e);
        }
    }
    if sent.is_ok() {
        tracing::info!(
            tasks = tasks.len(),
            "a redelivered batch goes on as one message a task"
        );
    }
    ack_or_hand_back(
        delivery,
        sent,
        "could not split a redelivered batch; handing it back",
    )
    .await;
}

/// Applies the outcomes of a batch's tasks: forwarded and handed-back copies are published
/// (grouped by destination), dead-lettered tasks go to the dead-letter exchange one by one,
/// all confirmed; then the batch is acked. If any of that fails the whole batch is handed
/// back: its finished tasks re-publish their saved results (or, once the coordinator recorded
/// them, are acked at their recorded status) without reaching their devices again, and a copy
/// already forwarded meets the same idempotency key.
async fn settle_batch(
    ctx: &Context,
    delivery: Delivery,
    tasks: Vec<DeviceTask>,
    outcomes: Vec<Outcome>,
) {
    if outcomes.iter().all(|o| *o == Outcome::Requeue) {
        // Nothing was done (the worker stops, or the infrastructure failed every task).
        if let Err(e) = delivery.acker.nack(requeue()).await {
            tracing::warn!(error.message = %e, "could not settle a delivery");
        }
        return;
    }
    let mut groups: std::collections::BTreeMap<Option<usize>, Vec<DeviceTask>> =
        std::collections::BTreeMap::new();
    let mut dead = Vec::new();
    for (task, outcome) in tasks.into_iter().zip(outcomes) {
        match outcome {
            Outcome::Ack => {}
            Outcome::Forward { to, task } => {
                let retry = match to {
                    ForwardTo::Tasks => None,
                    ForwardTo::Retry(n) => Some(n),
                };
                groups.entry(retry).or_default().push(task);
            }
            Outcome::Requeue => groups.entry(None).or_default().push(task),
            Outcome::DeadLetter(reason) => dead.push((task, reason)),
        }
    }
    let settled = async {
        let per_message = usize::from(ctx.settings.amqp.tasks_per_message.max(1));
        let mut confirms = Vec::new();
        for (retry, tasks) in &groups {
            for chunk in tasks.chunks(per_message) {
                confirms.push(
                    shared::topology::send_tasks(&ctx.publisher, &ctx.names, *retry, chunk).await?,
                );
            }
        }
        for (task, reason) in &dead {
            tracing::error!(%reason, queue = %ctx.names.tasks_queue(), execution_id = %task.execution_id, "dead-lettering a task");
            ctx.metrics
                .outcomes
                .with_label_values(&["dead_lettered"])
                .inc();
            let mut headers = delivery.properties.headers().clone().unwrap_or_default();
            shared::amqp::set_header(&mut headers, shared::topology::HEADER_ATTEMPT, &task.attempts.to_string());
            let properties = shared::amqp::properties(
                shared::messages::TASK_TYPE,
                &task.execution_id.to_string(),
                headers,
            );
            shared::topology::dead_letter(
                &ctx.publisher,
                &ctx.names,
                &ctx.names.tasks_queue(),
                &shared::messages::encode(task)?,
                &properties,
                reason,
            )
            .await?;
        }
        for confirm in confirms {
            confirm.wait().await?;
        }
        Ok::<(), AmqpError>(())
    }
    .await;
    ack_or_hand_back(
        delivery,
        settled,
        "could not settle a batch's tasks; handing the batch back",
    )
    .await;
}

/// Acks `delivery` once what it led to was published (`published`), else hands it back.
async fn ack_or_hand_back(delivery: Delivery, published: Result<(), AmqpError>, failure: &str) {
    let settled = match published {
        Ok(()) => delivery.acker.ack(BasicAckOptions::default()).await,
        Err(e) => {
            tracing::warn!(error.message = %e, error.cause_chain = %shared::telemetry::chain(&e), "{failure}");
            delivery.acker.nack(requeue()).await
        }
    };
    if let Err(e) = settled {
        tracing::warn!(error.message = %e, "could not settle a delivery");
    }
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

#[cfg(test)]
mod tests {
    use super::prefetch;

    #[test]
    fn the_prefetch_holds_about_twice_the_tasks_the_permits_take() {
        // One task a message: as many messages as permits.
        assert_eq!(prefetch(1024, 1), 1024);
        // 32 a message: 64 messages, 2,048 tasks for 1,024 permits.
        assert_eq!(prefetch(1024, 32), 64);
        assert_eq!(prefetch(1000, 32), 64);
        // Small workers still take a message, and never more messages than permits.
        assert_eq!(prefetch(4, 32), 2);
        assert_eq!(prefetch(1, 32), 1);
        assert_eq!(prefetch(3, 2), 3);
        assert_eq!(prefetch(0, 0), 1);
    }
}
