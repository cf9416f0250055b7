//! Devices of dead-lettered tasks end at once, with the dead-letter reason.
//!
//! Owns the `<ns>.dead.watch` queue: a second queue on the dead-letter exchange, so the
//! operators' `<ns>.dead` keeps its copy of every message for inspection and replay. For a
//! dead-lettered task of a known job, for one of its targets, that nothing else holds (no
//! worker's claim, not parked: the dead copy was then a duplicate), the device ends FAILED
//! with the reason and the queue it came from, recorded by the outcome script (first outcome
//! wins: a device that already finished keeps its outcome). Without this the device would
//! wait for the reconciliation sweep (the job's deadline, or a long silence). Anything else
//! (results, bodies that do not decode, forged ids) is acked and left to the operators'
//! copy. It never publishes and never replays.

use shared::redis_conn::RedisConn;
use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use lapin::{
    Channel,
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions},
    types::FieldTable,
};
use redis::AsyncCommands;
use shared::{
    messages,
    state::{DeviceStatus, ExecutionState, execution_id},
    store::Scripts,
};
use tokio_util::sync::CancellationToken;

use crate::app::AppState;

/// Dead letters taken at once.
const PREFETCH: u16 = 50;

/// Consumes the watch queue until `stop` fires or the channel fails.
///
/// # Errors
/// The channel failed.
pub async fn run(
    app: Arc<AppState>,
    channel: Channel,
    tag: String,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            app.names.dead_watch_queue().into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let scripts = Scripts::new();
    let mut redis = app.redis.clone();
    loop {
        let delivery = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            next = consumer.next() => match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(e.into()),
                None => anyhow::bail!("the dead-letter watch consumer was cancelled"),
            },
        };
        match settle(&app, &scripts, &mut redis, &delivery).await {
            Ok(()) => {
                delivery.acker.ack(BasicAckOptions::default()).await?;
            }
            Err(e) => {
                // Redis trouble: the message comes back, the operators' copy is untouched.
                tracing::warn!(error.message = %e, error.cause_chain = %shared::telemetry::chain(e.as_ref()), "could not record a dead-lettered task; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
                delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await?;
            }
        }
    }
}

/// Ends the devices of a dead-lettered tasks message (one task or a batch of them), each
/// when nothing holds it.
async fn settle(
    app: &AppState,
    scripts: &Scripts,
    redis: &mut RedisConn,
    delivery: &Delivery,
) -> anyhow::Result<()> {
    let Ok(tasks) = messages::decode_tasks(&delivery.data) else {
        return Ok(());
    };
    for task in &tasks {
        settle_task(app, scripts, redis, delivery, task).await?;
    }
    Ok(())
}

/// Ends the device of one dead-lettered task, when it is one and nothing holds it.
async fn settle_task(
    app: &AppState,
    scripts: &Scripts,
    redis: &mut RedisConn,
    delivery: &Delivery,
    task: &shared::messages::DeviceTask,
) -> anyhow::Result<()> {
    if execution_id(task.job_id, &task.device_id) != task.execution_id {
        return Ok(());
    }
    let raw: Option<String> = redis
        .hget(app.names.job_status(task.job_id), &task.device_id)
        .await?;
    let Some(old) = raw.and_then(|r| serde_json::from_str::<DeviceStatus>(&r).ok()) else {
        return Ok(());
    };
    if old.state.is_terminal() {
        return Ok(());
    }
    let headers = delivery.properties.headers().as_ref();
    let why = crate::deadletters::reason(headers).unwrap_or_else(|| "no reason given".into());
    let from = crate::deadletters::source_queue(headers).unwrap_or_else(|| "a queue".into());
    let reason = format!("dead-lettered from {from}: {why}");
    let lost = vec![(
        task.device_id.clone(),
        old,
        (ExecutionState::Failed, reason),
    )];
    let lost = crate::reconcile::unheld(redis, &app.names, task.job_id, lost).await?;
    let now = shared::now_ms();
    let ended: Vec<(String, DeviceStatus)> = lost
        .into_iter()
        .map(|(device, old, (state, reason))| {
            tracing::warn!(job_id = %task.job_id, device_id = %device, %reason, "device of a dead-lettered task ends FAILED");
            (device, crate::reconcile::ended(old, state, reason, now))
        })
        .collect();
    if ended.is_empty() {
        tracing::info!(job_id = %task.job_id, device_id = %task.device_id, "a dead-lettered task's execution is held elsewhere; its device goes on");
    }
    crate::reconcile::end(app, scripts, redis, task.job_id, ended).await
}
