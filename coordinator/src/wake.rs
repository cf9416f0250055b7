//! Wakes parked tasks: publishes the tasks of the parking lot ([`shared::parking`]) that are
//! due (their window opened, their device came online, their job was canceled, resumed or
//! reached its deadline) back to the tasks exchange, in their job's trace, several of a job's
//! tasks to a message (`amqp.tasks_per_message`).
//!
//! Owns that loop and nothing else. Every coordinator runs it; the lot hands each due task to
//! one taker at a time (leased), and a taker that dies before its publish is confirmed leaves
//! the task due again when the lease lapses, so a task is published at least once and the
//! workers' idempotency keys make a second copy harmless. It never decides anything about a
//! device: the worker that takes the woken copy does.

use shared::redis_conn::RedisConn;
use std::{collections::HashMap, sync::Arc, time::Duration};

use redis::AsyncCommands;
use shared::{amqp::Publisher, now_ms, parking, topology::Names};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

/// How many due tasks one round takes.
const BATCH: usize = 1_000;
/// Pause between rounds when nothing is due.
const IDLE: Duration = Duration::from_millis(250);

/// Runs until `stop` fires.
pub async fn run(
    names: Names,
    per_message: usize,
    mut redis: RedisConn,
    publisher: Publisher,
    metrics: Arc<crate::metrics::Metrics>,
    stop: CancellationToken,
) {
    loop {
        let woken = match round(&names, per_message, &mut redis, &publisher).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error.message = %e, error.cause_chain = %shared::telemetry::chain(e.as_ref()), "waking parked tasks failed; retrying");
                0
            }
        };
        metrics.tasks_woken.inc_by(woken as u64);
        if let Ok(n) = parking::parked_total(&mut redis, &names).await {
            metrics.tasks_parked.set(n as i64);
        }
        if woken < BATCH {
            tokio::select! {
                _ = tokio::time::sleep(IDLE) => {}
                _ = stop.cancelled() => return,
            }
        } else if stop.is_cancelled() {
            return;
        }
    }
}

/// One round: take what is due, publish it per job in the job's trace, release it.
async fn round(
    names: &Names,
    per_message: usize,
    redis: &mut RedisConn,
    publisher: &Publisher,
) -> anyhow::Result<usize> {
    let taken = parking::take_due(redis, names, now_ms(), BATCH).await?;
    if taken.is_empty() {
        return Ok(0);
    }
    let mut by_job: HashMap<Uuid, Vec<&parking::Taken>> = HashMap::new();
    for t in &taken {
        by_job.entry(t.task.job_id).or_default().push(t);
    }
    for (job_id, tasks) in by_job {
        let span = tracing::info_span!(
            "publish fleetbatch.tasks",
            otel.kind = "producer",
            messaging.system = "rabbitmq",
            messaging.destination.name = %names.tasks_exchange(),
            job_id = %job_id,
            messaging.batch.message_count = tasks.len().div_ceil(per_message),
            tasks = tasks.len(),
            woken = true,
        );
        let trace: Option<String> = redis.hget(names.job(job_id), "trace").await.unwrap_or(None);
        if let Some(t) = trace.filter(|t| !t.is_empty()) {
            shared::amqp::continue_traceparent(&span, &t);
        }
        async {
            let mut pending = Vec::with_capacity(tasks.len().div_ceil(per_message));
            for chunk in tasks.chunks(per_message) {
                let chunk: Vec<_> = chunk.iter().map(|t| t.task.clone()).collect();
                pending.push(shared::topology::send_tasks(publisher, names, None, &chunk).await?);
            }
            for confirm in pending {
                confirm.wait().await?;
            }
            anyhow::Ok(())
        }
        .instrument(span)
        .await?;
        let published: Vec<parking::Taken> = tasks.into_iter().cloned().collect();
        parking::release(redis, names, &published).await?;
    }
    Ok(taken.len())
}
