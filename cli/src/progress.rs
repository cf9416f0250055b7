//! Following a job: a progress bar with counts per state, rate and ETA, and the summary.

use std::time::{Duration, Instant};

use anyhow::Context;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use shared::state::JobState;

use crate::client::Client;

pub(crate) fn count(job: &Value, field: &str) -> u64 {
    job.get(field).and_then(Value::as_u64).unwrap_or(0)
}

pub(crate) fn is_finished(job: &Value) -> bool {
    job.get("state")
        .and_then(Value::as_str)
        .and_then(JobState::parse)
        .is_some_and(JobState::is_finished)
}

fn message(job: &Value) -> String {
    format!(
        "{} ok {} failed {} rejected {} timed out {} canceled {} skipped",
        count(job, "succeeded"),
        count(job, "failed"),
        count(job, "rejected"),
        count(job, "timed_out"),
        count(job, "canceled"),
        count(job, "skipped"),
    )
}

/// Polls the job until it finishes (or `timeout`), drawing a progress bar on stderr.
pub(crate) async fn follow(
    client: &Client,
    job_id: &str,
    expected: Option<u64>,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let bar = ProgressBar::new(expected.unwrap_or(0));
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {per_sec} ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    loop {
        let job: Value = client.get(&format!("/v1/jobs/{job_id}")).await?;
        let targeted = count(&job, "targeted");
        if expected.is_none() || targeted > bar.length().unwrap_or(0) {
            bar.set_length(targeted.max(expected.unwrap_or(0)));
        }
        bar.set_position(count(&job, "terminal"));
        bar.set_message(message(&job));
        if is_finished(&job) {
            bar.finish();
            return Ok(job);
        }
        if started.elapsed() > timeout {
            bar.abandon();
            anyhow::bail!("job {job_id} did not finish within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Follows a job through its Server-Sent Events stream (`/v1/jobs/{id}/events`) until the
/// `finished` event, drawing a progress bar on stderr.
pub(crate) async fn watch(client: &Client, job_id: &str) -> anyhow::Result<Value> {
    let resp = client.stream(&format!("/v1/jobs/{job_id}/events")).await?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {per_sec} ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut events = resp.bytes_stream().eventsource();
    while let Some(event) = events.next().await {
        let event = event.context("reading the job's event stream")?;
        let job: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
        match event.event.as_str() {
            "progress" => {
                bar.set_length(count(&job, "targeted"));
                bar.set_position(count(&job, "terminal"));
                bar.set_message(message(&job));
            }
            "finished" => {
                bar.finish();
                return Ok(job);
            }
            _ => {}
        }
    }
    bar.abandon();
    anyhow::bail!("the event stream of job {job_id} ended before the job finished")
}

/// A table of the job's counters.
pub(crate) fn summary(job: &Value) -> String {
    let mut out = String::new();
    let name = job.get("name").and_then(Value::as_str).unwrap_or("-");
    out.push_str(&format!(
        "job {} ({name}): {}\n",
        job.get("job_id").and_then(Value::as_str).unwrap_or("?"),
        job.get("state").and_then(Value::as_str).unwrap_or("?")
    ));
    out.push_str(&format!(
        "  {:<12} {:>10}\n",
        "targeted",
        count(job, "targeted")
    ));
    for f in [
        "succeeded",
        "failed",
        "rejected",
        "timed_out",
        "canceled",
        "skipped",
        "pending",
    ] {
        out.push_str(&format!("  {f:<12} {:>10}\n", count(job, f)));
    }
    for f in ["unhealthy", "rolled_back"] {
        if count(job, f) > 0 {
            out.push_str(&format!("  {f:<12} {:>10}\n", count(job, f)));
        }
    }
    if let Some(reason) = job.get("state_reason").and_then(Value::as_str) {
        out.push_str(&format!("  reason: {reason}\n"));
    }
    if let Some(rollout) = job.get("rollout") {
        out.push_str(&format!(
            "  rollout: {} wave {}\n",
            rollout.get("phase").and_then(Value::as_str).unwrap_or("-"),
            rollout
                .get("wave")
                .and_then(Value::as_u64)
                .map_or(0, |w| w + 1)
        ));
        for w in rollout
            .get("waves")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let c = |k: &str| w["counts"].get(k).and_then(Value::as_u64).unwrap_or(0);
            out.push_str(&format!(
                "    {:<16} size {:>8}  finished {:>8}  succeeded {:>8}  failed {:>6}\n",
                w.get("name").and_then(Value::as_str).unwrap_or("-"),
                w.get("size").and_then(Value::as_u64).unwrap_or(0),
                c("terminal"),
                c("succeeded"),
                c("failed") + c("rejected") + c("timed_out"),
            ));
        }
    }
    out
}
