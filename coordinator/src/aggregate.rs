//! The results consumer.
//!
//! Owns the results queue: it takes results in batches (up to the prefetch), records each
//! device's first terminal outcome in one pipelined round trip ([`shared::store::Scripts`]),
//! and only then acks the batch. A result counted twice is impossible: a redelivered or
//! duplicate result finds its device already terminal and changes nothing. An undecodable
//! result is dead-lettered with the reason. If Redis is unreachable the batch is retried, not
//! acked. It never publishes tasks.

use shared::redis_conn::RedisConn;
use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use lapin::{
    Channel,
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions},
    types::FieldTable,
};
use shared::{
    amqp::Publisher,
    backoff,
    messages::{self, TaskResult},
    state::{DeviceStatus, ExecutionState},
    store::{Reporter, Scripts, TerminalStatus},
    topology::{self, Names},
};
use tokio_util::sync::CancellationToken;

/// Results recorded per Redis pipeline.
const RECORD_CHUNK: usize = 2000;

/// What the aggregator needs.
#[derive(Debug)]
pub struct Aggregator {
    /// Names.
    pub names: Names,
    /// Redis.
    pub redis: RedisConn,
    /// For dead-lettering.
    pub publisher: Publisher,
    /// Status scripts.
    pub scripts: Scripts,
    /// Results per batch, and the consumer prefetch.
    pub prefetch: u16,
    /// Fires on shutdown.
    pub shutdown: CancellationToken,
    /// Metrics.
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// Webhooks.
    pub notifier: crate::notify::Notifier,
    /// Device-supplied text (errors) is cut to this many bytes before it is stored.
    pub max_device_text_bytes: usize,
}

/// Consumes results until shutdown or a channel failure.
///
/// # Errors
/// The channel failed.
pub async fn run(agg: Arc<Aggregator>, channel: Channel, tag: String) -> anyhow::Result<()> {
    channel
        .basic_qos(agg.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            agg.names.results_queue().into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut redis = agg.redis.clone();
    // A broker that closes the connection does not always end the consumer's stream at once:
    // look at the channel every second, so a lost broker ends the session (and readiness
    // says so) promptly.
    let mut watch = tokio::time::interval(Duration::from_secs(1));
    loop {
        let first = tokio::select! {
            biased;
            _ = agg.shutdown.cancelled() => return Ok(()),
            _ = watch.tick() => {
                if !channel.status().connected() {
                    anyhow::bail!("the results channel is no longer connected");
                }
                continue;
            }
            next = consumer.next() => match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(e.into()),
                // Ended without our cancel: the channel is gone.
                None => anyhow::bail!("the results consumer ended: the channel is gone"),
            },
        };
        // Take whatever else is already here, up to the prefetch, without waiting.
        let mut batch = vec![first];
        while batch.len() < usize::from(agg.prefetch) {
            match tokio::time::timeout(Duration::from_millis(2), consumer.next()).await {
                Ok(Some(Ok(d))) => batch.push(d),
                Ok(Some(Err(e))) => return Err(e.into()),
                Ok(None) | Err(_) => break,
            }
        }
        // A broker lost mid-batch can leave an ack or a publish waiting forever: give up
        // the batch then. Its unacked results come back when the session is rebuilt, and
        // recording them again changes nothing (the first terminal outcome wins).
        tokio::select! {
            r = process_batch(&agg, &mut redis, batch) => r?,
            () = lost(&channel) => {
                anyhow::bail!("the results channel was lost while recording a batch")
            }
        }
    }
}

/// Resolves once `channel` is no longer connected (checked every 250 ms).
async fn lost(channel: &Channel) {
    let mut every = tokio::time::interval(Duration::from_millis(250));
    loop {
        every.tick().await;
        if !channel.status().connected() {
            return;
        }
    }
}

async fn process_batch(
    agg: &Aggregator,
    redis: &mut RedisConn,
    batch: Vec<Delivery>,
) -> anyhow::Result<()> {
    let mut results: Vec<(TaskResult, &Delivery)> = Vec::with_capacity(batch.len());
    for d in &batch {
        match messages::decode_results(&d.data) {
            Ok(rs) => results.extend(rs.into_iter().map(|r| (r, d))),
            Err(e) => {
                let reason = format!("undecodable result: {e}: {e:?}");
                tracing::error!(%reason, queue = %agg.names.results_queue(), "dead-lettering a result");
                agg.metrics.dead_lettered.inc();
                match topology::dead_letter(
                    &agg.publisher,
                    &agg.names,
                    &agg.names.results_queue(),
                    &d.data,
                    &d.properties,
                    &reason,
                )
                .await
                {
                    Ok(()) => d.acker.ack(BasicAckOptions::default()).await?,
                    Err(_) => {
                        d.acker
                            .reject(BasicRejectOptions { requeue: false })
                            .await?
                    }
                };
            }
        }
    }
    // Results are checked, not trusted: a well-formed result that cannot be a worker's
    // report of its task is kept as evidence and never counted.
    let mut checked = Vec::with_capacity(results.len());
    for (r, d) in results {
        match refusal(&r) {
            None => checked.push((r, d)),
            Some(reason) => dead_letter_result(agg, &r, d, &reason).await?,
        }
    }
    let results = checked;
    let now = shared::now_ms();
    let statuses: Vec<DeviceStatus> = results
        .iter()
        .map(|(r, _)| status_of(r, now, agg.max_device_text_bytes))
        .collect();
    let outcomes: Vec<TerminalStatus<'_>> = results
        .iter()
        .zip(&statuses)
        .map(|((r, _), status)| TerminalStatus {
            job_id: r.job_id,
            device_id: &r.device_id,
            status,
        })
        .collect();
    // A batch of messages may hold many results each: record them a bounded pipeline at a
    // time.
    for (chunk, chunk_results) in outcomes
        .chunks(RECORD_CHUNK)
        .zip(results.chunks(RECORD_CHUNK))
    {
        // Nothing is acked until it is recorded: wait for Redis.
        let recorded = backoff::until_ok(
            backoff::outage(Duration::from_millis(100), Duration::from_secs(5)),
            &agg.shutdown,
            || {
                let mut redis = redis.clone();
                async move {
                    agg.scripts
                        .record_terminal(&mut redis, &agg.names, chunk, Reporter::Device)
                        .await
                }
            },
            |e, delay| tracing::warn!(error.message = %e, error.cause_chain = %shared::telemetry::chain(e), retry_in_ms = delay.as_millis() as u64, "recording results failed; retrying"),
        )
        .await;
        let Ok(summary) = recorded else {
            return Ok(());
        };
        // A result naming a job that does not exist, or a device the job does not target,
        // is kept as evidence in the dead-letter queue, alone (its message may carry results
        // of other jobs, recorded above).
        for &i in &summary.unknown_jobs {
            let (r, d) = &chunk_results[i];
            dead_letter_result(agg, r, d, &format!("unknown job {}", r.job_id)).await?;
        }
        for &i in &summary.untargeted {
            let (r, d) = &chunk_results[i];
            let reason = format!("device {} is not a target of job {}", r.device_id, r.job_id);
            dead_letter_result(agg, r, d, &reason).await?;
        }
        let now = shared::now_ms();
        for (i, ((r, _), counted)) in chunk_results.iter().zip(&summary.counted).enumerate() {
            if summary.unknown_jobs.contains(&i) || summary.untargeted.contains(&i) {
                continue;
            }
            agg.metrics
                .results_recorded
                .with_label_values(&[r.state.counter()])
                .inc();
            if let Some(seconds) = latency_seconds(r, now) {
                agg.metrics.task_latency_seconds.observe(seconds);
            }
            if reports_failure(r.state, *counted) {
                agg.notifier.device_failed(
                    r.job_id,
                    &r.device_id,
                    r.state.as_str(),
                    r.error.as_deref(),
                    r.attempts,
                );
            }
        }
        agg.metrics
            .results_duplicate
            .inc_by(summary.duplicates as u64);
        for job_id in &summary.finished_jobs {
            agg.notifier.job_finished(redis, &agg.names, *job_id).await;
        }
        if summary.duplicates > 0 {
            tracing::debug!(duplicates = summary.duplicates, "duplicate results ignored");
        }
    }
    if let Some((_, last)) = results.iter().max_by_key(|(_, d)| d.delivery_tag) {
        last.acker.ack(BasicAckOptions { multiple: true }).await?;
    }
    Ok(())
}

/// Moves one result to the dead-letter queue with `reason` (a security event: counted and
/// logged).
async fn dead_letter_result(
    agg: &Aggregator,
    r: &TaskResult,
    d: &Delivery,
    reason: &str,
) -> anyhow::Result<()> {
    tracing::error!(%reason, job_id = %r.job_id, device_id = %r.device_id, security_event = "result_refused", "dead-lettering a result");
    agg.metrics.dead_lettered.inc();
    let payload = messages::encode(r)?;
    let properties = shared::amqp::properties(
        messages::RESULT_TYPE,
        &r.execution_id.to_string(),
        d.properties.headers().clone().unwrap_or_default(),
    );
    topology::dead_letter(
        &agg.publisher,
        &agg.names,
        &agg.names.results_queue(),
        &payload,
        &properties,
        reason,
    )
    .await?;
    Ok(())
}

/// Why a decoded result cannot be a worker's report of its task, if it cannot: a state that
/// is not terminal, a device id no task carries, or an execution id that is not the one of
/// its job and device.
fn refusal(r: &TaskResult) -> Option<String> {
    if !r.state.is_terminal() {
        return Some(format!("result in non-terminal state {}", r.state.as_str()));
    }
    if let Err(e) = shared::device::validate_id(&r.device_id) {
        return Some(format!("device id: {e}"));
    }
    let expected = shared::state::execution_id(r.job_id, &r.device_id);
    if r.execution_id != expected {
        return Some(format!(
            "execution id {} is not the one of job {} on device {} ({expected})",
            r.execution_id, r.job_id, r.device_id
        ));
    }
    None
}

/// The status recorded for a result, at `now_ms` (with the task's publishing time, the
/// device's end-to-end latency). What the device wrote is bounded before it is stored: the
/// error cut to `max_text` bytes (on a character boundary), at most
/// [`shared::job::MAX_METRICS`] readings with names of at most 64 bytes.
fn status_of(r: &TaskResult, now_ms: u64, max_text: usize) -> DeviceStatus {
    DeviceStatus {
        state: r.state,
        attempts: r.attempts,
        error: r.error.as_deref().map(|e| truncate(e, max_text)),
        updated_at_ms: now_ms,
        next_attempt_at_ms: None,
        worker: Some(r.worker.clone()),
        published_at_ms: (r.published_at_ms > 0).then_some(r.published_at_ms),
        readings: r.readings.as_ref().map(|m| {
            m.iter()
                .filter(|(k, _)| k.len() <= 64)
                .take(shared::job::MAX_METRICS)
                .map(|(k, v)| (k.clone(), *v))
                .collect()
        }),
    }
}

/// `text` cut to at most `max` bytes on a character boundary, marked with `…` when cut.
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Seconds from publishing the task to recording its result, when the task says when it was
/// published.
fn latency_seconds(r: &TaskResult, now_ms: u64) -> Option<f64> {
    (r.published_at_ms > 0).then(|| now_ms.saturating_sub(r.published_at_ms) as f64 / 1000.0)
}

/// Whether a result is a device failure to report by webhook: counted (the device's first
/// outcome) and not a success, a cancel or a skip.
fn reports_failure(state: ExecutionState, counted: bool) -> bool {
    counted
        && matches!(
            state,
            ExecutionState::Failed
                | ExecutionState::Rejected
                | ExecutionState::TimedOut
                | ExecutionState::Unhealthy
                | ExecutionState::RolledBack
        )
}

#[cfg(test)]
mod tests {
    use shared::messages::WIRE_VERSION;
    use uuid::Uuid;

    use super::*;

    fn result(state: ExecutionState, published_at_ms: u64) -> TaskResult {
        TaskResult {
            version: WIRE_VERSION,
            job_id: Uuid::nil(),
            execution_id: Uuid::nil(),
            device_id: "d1".into(),
            state,
            attempts: 3,
            error: Some("e".into()),
            worker: "w1".into(),
            published_at_ms,
            finished_at_ms: 0,
            readings: Some([("t".to_owned(), 1.0)].into()),
        }
    }

    #[test]
    fn results_that_cannot_be_a_workers_report_are_refused_with_the_reason() {
        let job = Uuid::now_v7();
        let good = TaskResult {
            job_id: job,
            execution_id: shared::state::execution_id(job, "d1"),
            ..result(ExecutionState::Succeeded, 0)
        };
        assert_eq!(refusal(&good), None);
        let progress = TaskResult {
            state: ExecutionState::InProgress,
            ..good.clone()
        };
        assert!(refusal(&progress).is_some_and(|r| r.contains("non-terminal")));
        let other_device = TaskResult {
            device_id: "d2".into(),
            ..good.clone()
        };
        assert!(refusal(&other_device).is_some_and(|r| r.contains("execution id")));
        let bad_id = TaskResult {
            device_id: "a:b".into(),
            ..good
        };
        assert!(refusal(&bad_id).is_some_and(|r| r.contains("device id")));
    }

    #[test]
    fn a_result_is_recorded_as_the_status_the_worker_reported() {
        let s = status_of(&result(ExecutionState::Failed, 1_000), 5_000, 1024);
        assert_eq!(s.state, ExecutionState::Failed);
        assert_eq!(s.attempts, 3);
        assert_eq!(s.error.as_deref(), Some("e"));
        assert_eq!(s.updated_at_ms, 5_000);
        assert_eq!(s.worker.as_deref(), Some("w1"));
        assert_eq!(s.published_at_ms, Some(1_000));
        assert_eq!(s.readings, result(ExecutionState::Failed, 0).readings);
        assert_eq!(s.next_attempt_at_ms, None);
        assert_eq!(
            status_of(&result(ExecutionState::Failed, 0), 5_000, 1024).published_at_ms,
            None
        );
    }

    #[test]
    fn device_supplied_text_and_readings_are_bounded_before_they_are_stored() {
        let long = TaskResult {
            error: Some("é".repeat(2000)),
            readings: Some(
                (0..200)
                    .map(|i| (format!("m{i:03}"), 1.0))
                    .chain([("x".repeat(65), 2.0)])
                    .collect(),
            ),
            ..result(ExecutionState::Failed, 0)
        };
        let s = status_of(&long, 1, 100);
        let e = s.error.expect("error");
        assert!(e.len() <= 100 && e.ends_with('…'), "{} bytes", e.len());
        let readings = s.readings.expect("readings");
        assert_eq!(readings.len(), shared::job::MAX_METRICS);
        assert!(readings.keys().all(|k| k.len() <= 64));
        assert_eq!(truncate("short", 100), "short");
    }

    #[test]
    fn latency_is_measured_only_from_a_known_publishing_time() {
        assert_eq!(
            latency_seconds(&result(ExecutionState::Succeeded, 1_000), 3_500),
            Some(2.5)
        );
        assert_eq!(
            latency_seconds(&result(ExecutionState::Succeeded, 0), 3_500),
            None
        );
        assert_eq!(
            latency_seconds(&result(ExecutionState::Succeeded, 1), 1),
            Some(0.0)
        );
    }

    #[test]
    fn only_counted_failures_rejections_and_timeouts_are_reported() {
        for state in [
            ExecutionState::Failed,
            ExecutionState::Rejected,
            ExecutionState::TimedOut,
        ] {
            assert!(reports_failure(state, true), "{state:?}");
            assert!(!reports_failure(state, false), "{state:?} twice");
        }
        for state in [
            ExecutionState::Succeeded,
            ExecutionState::Canceled,
            ExecutionState::Skipped,
        ] {
            assert!(!reports_failure(state, true), "{state:?}");
        }
    }
}
