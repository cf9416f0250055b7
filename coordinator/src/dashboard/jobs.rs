//! The jobs pages: the list (progress, rate and ETA per job, filters), and one job (live
//! counters, a chart of outcomes per second, waves and gates, top errors leading to their
//! devices, readings with histograms, the device table with a state filter, a search and
//! server-side pages, the audit trail, and the actions the caller's role allows).
//!
//! It never writes: the buttons call the API.

use std::sync::Arc;

use axum::{
    extract::{Path, Query, State},
    response::{IntoResponse, Response},
};
use maud::{Markup, html};
use redis::AsyncCommands as _;
use shared::{
    now_ms,
    state::{DeviceStatus, ExecutionState, JobState},
};

use super::{COUNTERS, SignedIn, at_gate, bar, count, duration, escape, not_found, page, time};
use crate::{
    access::Role,
    app::AppState,
    jobs::{self, DeviceEntry, JobView},
};

/// Jobs listed, the newest first.
const LISTED: usize = 200;

/// Errors shown on a job's page, the most frequent first.
const TOP_ERRORS: usize = 10;

/// Audit entries shown on a job's page, the newest first.
const TRAIL: usize = 20;

/// Devices shown per page of a job's device table.
const DEVICES_PER_PAGE: usize = 100;

/// Failures read to list the devices of one error.
const ERROR_DEVICES: usize = 1000;

/// Devices finished per second since the job was created (until it finished), and the
/// seconds left at that pace while it runs.
pub(super) fn pace(job: &JobView, now: u64) -> (f64, Option<f64>) {
    let end = job.finished_at_ms.unwrap_or(now);
    let secs = (end.saturating_sub(job.created_at_ms) as f64 / 1000.0).max(0.001);
    let rate = job.terminal as f64 / secs;
    let eta = (!job.state.is_finished() && job.pending > 0 && rate > 0.0)
        .then(|| job.pending as f64 / rate);
    (rate, eta)
}

/// Devices that did not succeed.
fn failures(job: &JobView) -> u64 {
    job.failed + job.rejected + job.timed_out + job.unhealthy + job.rolled_back
}

#[derive(serde::Deserialize)]
pub(super) struct ListQuery {
    state: Option<String>,
    name: Option<String>,
    creator: Option<String>,
}

/// Keeps a filter that has something in it.
fn given(v: Option<&String>) -> Option<&str> {
    v.map(|s| s.trim()).filter(|s| !s.is_empty())
}

pub(super) async fn list(
    State(app): State<Arc<AppState>>,
    SignedIn { caller, csrf }: SignedIn,
    Query(q): Query<ListQuery>,
) -> Response {
    let mut redis = app.redis.clone();
    let listed = match jobs::list(&mut redis, &app.names, None, LISTED).await {
        Ok(p) => p.jobs,
        Err(e) => return crate::api::unavailable(e),
    };
    let state = given(q.state.as_ref());
    let name = given(q.name.as_ref());
    let creator = given(q.creator.as_ref());
    let shown: Vec<&JobView> = listed
        .iter()
        .filter(|j| state.is_none_or(|s| j.state.as_str() == s))
        .filter(|j| name.is_none_or(|n| j.name.as_deref().is_some_and(|m| m.contains(n))))
        .filter(|j| creator.is_none_or(|c| j.created_by == c))
        .collect();
    let now = now_ms();
    page(
        "Jobs",
        Some(&caller),
        &csrf,
        None,
        html! {
            h1 { "Jobs" }
            form.filter method="get" action="/ui/jobs" {
                select name="state" {
                    option value="" { "every state" }
                    @for s in JobState::ALL {
                        option value=(s.as_str()) selected[state == Some(s.as_str())] { (s.as_str()) }
                    }
                }
                input type="search" name="name" placeholder="name contains" value=[name];
                input type="search" name="creator" placeholder="created by" value=[creator];
                input type="submit" value="Filter";
            }
            table id="jobs" {
                thead { tr { th { "job" } th { "state" } th { "action" } th { "progress" } th { "done" } th { "failed" } th { "rate" } th { "ETA" } th { "waves" } th { "created" } } }
                tbody {
                    @for j in &shown {
                        @let (rate, eta) = pace(j, now);
                        tr data-job-id=(j.job_id) {
                            td { a href=(format!("/ui/jobs/{}", j.job_id)) { (j.name.as_deref().unwrap_or("(unnamed)")) } br; small { (j.job_id) } }
                            td.state { (j.state.as_str()) }
                            td { (j.action) }
                            td { (bar(j)) }
                            td { (j.terminal) " / " (j.targeted) }
                            td { (failures(j)) }
                            td { (format!("{rate:.0}/s")) }
                            td { (eta.map_or_else(|| "—".to_owned(), duration)) }
                            td { (j.spec.rollout.waves.len()) }
                            td { (time(j.created_at_ms)) br; small { (j.created_by) } }
                        }
                    }
                }
            }
            @if shown.is_empty() { p { "No job." } }
        },
    )
    .into_response()
}

#[derive(serde::Deserialize)]
pub(super) struct JobQuery {
    /// Devices in this state only.
    status: Option<String>,
    /// The next page of devices.
    cursor: Option<String>,
    /// One device, by id.
    device: Option<String>,
    /// The devices whose last error is this.
    error: Option<String>,
}

/// The devices the table shows, and where its next page starts.
async fn device_rows(
    app: &AppState,
    id: uuid::Uuid,
    q: &JobQuery,
    status: Option<ExecutionState>,
) -> anyhow::Result<(Vec<DeviceEntry>, Option<String>)> {
    let mut redis = app.redis.clone();
    if let Some(device) = given(q.device.as_ref()) {
        let raw: Option<String> = redis.hget(app.names.job_status(id), device).await?;
        let found = raw
            .and_then(|r| serde_json::from_str::<DeviceStatus>(&r).ok())
            .map(|status| DeviceEntry {
                device_id: device.to_owned(),
                status,
            });
        return Ok((found.into_iter().collect(), None));
    }
    if let Some(error) = given(q.error.as_ref()) {
        let report = crate::report::build(&mut redis, &app.names, id, ERROR_DEVICES).await?;
        let devices = report
            .map(|r| r.failures)
            .unwrap_or_default()
            .into_iter()
            .filter(|d| d.status.error.as_deref() == Some(error))
            .take(DEVICES_PER_PAGE)
            .collect();
        return Ok((devices, None));
    }
    let cursor = q.cursor.as_deref().and_then(|c| c.parse().ok());
    let p = jobs::devices(&mut redis, &app.names, id, status, cursor, DEVICES_PER_PAGE).await?;
    Ok((p.devices, p.next_cursor))
}

/// What the caller may do to `job` from its page: (API action, label).
fn actions(job: &JobView, role: Role) -> Vec<(&'static str, &'static str)> {
    let mut a = Vec::new();
    if role < Role::Operator {
        return a;
    }
    if job.state.is_finished() {
        // Follow-up jobs: the failed and timed-out devices again, or the rollback action.
        if job.failed + job.timed_out > 0 {
            a.push(("rerun", "Rerun the failed and timed-out devices"));
        }
        if job.spec.rollback.is_some() && job.succeeded > 0 {
            a.push(("rollback", "Roll back"));
        }
        return a;
    }
    let gate = at_gate(job);
    match job.state {
        JobState::InProgress => a.push(("pause", "Pause")),
        JobState::Paused => a.push(("resume", "Resume")),
        _ => {}
    }
    if gate && job.state == JobState::InProgress {
        a.push(("approve", "Approve next wave"));
    }
    if !job.state.is_stopping() {
        a.push(("cancel", "Cancel"));
    }
    a
}

/// A metric's histogram: a bar per bucket, as tall as its share of the largest.
fn histogram(r: &crate::readings::MetricSummary) -> Markup {
    let top = r.histogram.iter().copied().max().unwrap_or(0).max(1);
    let width = (r.max - r.min) / r.histogram.len().max(1) as f64;
    html! {
        div.hist {
            @for (i, n) in r.histogram.iter().enumerate() {
                @let from = r.min + width * i as f64;
                span title=(format!("{from:.3} – {:.3}: {n} devices", from + width))
                    style=(format!("height:{:.0}%", 100.0 * *n as f64 / top as f64)) {}
            }
        }
    }
}

pub(super) async fn one(
    State(app): State<Arc<AppState>>,
    SignedIn { caller, csrf }: SignedIn,
    Path(id): Path<String>,
    Query(q): Query<JobQuery>,
) -> Response {
    let Ok(id) = id.parse::<uuid::Uuid>() else {
        return not_found(format!("no job {id}"));
    };
    let mut redis = app.redis.clone();
    let job = match jobs::get(&mut redis, &app.names, id).await {
        Ok(Some(j)) => j,
        Ok(None) => return not_found(format!("no job {id}")),
        Err(e) => return crate::api::unavailable(e),
    };
    let status = q
        .status
        .as_deref()
        .filter(|s| !s.is_empty() && *s != "all")
        .and_then(ExecutionState::parse);
    let (devices, next_cursor) = match device_rows(&app, id, &q, status).await {
        Ok(d) => d,
        Err(e) => return crate::api::unavailable(e),
    };
    // Top errors and readings (a failure report without its device list), and the job's
    // audit trail.
    let report = match crate::report::build(&mut redis, &app.names, id, 0).await {
        Ok(r) => r,
        Err(e) => return crate::api::unavailable(e),
    };
    let mut errors: Vec<(String, u64)> = report
        .as_ref()
        .map(|r| r.errors.clone().into_iter().collect())
        .unwrap_or_default();
    errors.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    errors.truncate(TOP_ERRORS);
    let readings = report.and_then(|r| r.readings).unwrap_or_default();
    let trail = match crate::audit::page(
        &mut redis,
        &app.names,
        &crate::audit::Filter {
            job_id: Some(id.to_string()),
            limit: Some(TRAIL),
            ..Default::default()
        },
    )
    .await
    {
        Ok(Ok(p)) => p.entries,
        Ok(Err(_)) => vec![],
        Err(e) => return crate::api::unavailable(e),
    };
    let actions = actions(&job, caller.role);
    let (rate, eta) = pace(&job, now_ms());
    let title = job.name.clone().unwrap_or_else(|| id.to_string());
    let status_filter = status.map(ExecutionState::as_str);
    let searched = given(q.device.as_ref());
    let error = given(q.error.as_ref());
    page(
        &title,
        Some(&caller),
        &csrf,
        Some(&job),
        html! {
            h1 { (title) }
            p {
                "State: " span.state id="job-state" { (job.state.as_str()) }
                @if let Some(r) = &job.state_reason { " — " (r) }
                " · " (job.action) " · created " (time(job.created_at_ms))
                @if !job.created_by.is_empty() { " by " (job.created_by) }
            }
            (bar(&job))
            div.counts {
                div { "targeted" b id="count-targeted" { (job.targeted) } }
                @for (key, label) in COUNTERS {
                    div { (label) b id=(format!("count-{key}")) { (count(&job, key)) } }
                }
                div { "waiting" b id="count-waiting" { (job.waiting) } }
                div { "rate" b id="job-rate" { (format!("{rate:.0}/s")) } }
                div { "ETA" b id="job-eta" { (eta.map_or_else(|| "—".to_owned(), duration)) } }
            }
            @if !actions.is_empty() {
                div.actions {
                    @for (action, label) in &actions {
                        button data-action=(format!("/v1/jobs/{id}/{action}")) { (label) }
                    }
                }
                p.error id="action-result" {}
            }
            @if !job.state.is_finished() {
                h2 { "Outcomes per second" }
                p.hint { "Since this page opened: devices succeeded (green) and failed (red) each second, and the failure rate (line, 0–100 %)." }
                svg id="chart" viewBox="0 0 600 120" preserveAspectRatio="none" {}
            }
            @if let Some(r) = &job.rollout {
                h2 { "Waves" }
                p id="rollout-phase" { "Phase: " (r.phase.phase) @if let Some(w) = r.phase.wave { ", wave " (w) } }
                table id="waves" {
                    thead { tr { th { "wave" } th { "devices" } th { "counts" } } }
                    tbody {
                        @for w in &r.waves {
                            tr {
                                td { (w.index) " " (w.name) }
                                td { (w.size) }
                                td { @for (k, v) in &w.counts { (k) ": " (v) " " } }
                            }
                        }
                    }
                }
            }
            @if !errors.is_empty() {
                h2 { "Top errors" }
                table id="errors" {
                    thead { tr { th { "devices" } th { "error" } } }
                    tbody {
                        @for (error, n) in &errors {
                            tr { td { (n) } td { a href=(format!("/ui/jobs/{id}?error={}#devices", escape(error))) { (error) } } }
                        }
                    }
                }
            }
            @if !readings.is_empty() {
                h2 { "Readings" }
                table id="readings" {
                    thead { tr { th { "metric" } th { "devices" } th { "min" } th { "p50" } th { "mean" } th { "p95" } th { "max" } th { "histogram" } } }
                    tbody {
                        @for (metric, r) in &readings {
                            tr { td { (metric) } td { (r.count) } td { (r.min) } td { (r.p50) } td { (format!("{:.3}", r.mean)) } td { (r.p95) } td { (r.max) } td { (histogram(r)) } }
                        }
                    }
                }
            }
            h2 { "Devices" }
            form.filter method="get" action=(format!("/ui/jobs/{id}")) {
                select name="status" {
                    option value="" { "every state" }
                    @for s in ExecutionState::ALL {
                        option value=(s.as_str()) selected[status_filter == Some(s.as_str())] { (s.as_str()) }
                    }
                }
                input type="submit" value="Show";
            }
            form.filter method="get" action=(format!("/ui/jobs/{id}")) {
                input type="search" name="device" placeholder="device id" value=[searched];
                input type="submit" value="Find";
            }
            @if let Some(e) = error { p { "Devices whose last error is " q { (e) } " (at most " (DEVICES_PER_PAGE) "):" } }
            table id="devices" {
                thead { tr { th { "device" } th { "state" } th { "attempts" } th { "last error" } th { "updated" } } }
                tbody {
                    @for d in &devices {
                        tr {
                            td { a href=(format!("/ui/devices/{}", escape(&d.device_id))) { (d.device_id) } }
                            td { (d.status.state.as_str()) }
                            td { (d.status.attempts) }
                            td { (d.status.error.as_deref().unwrap_or("")) }
                            td { (time(d.status.updated_at_ms)) }
                        }
                    }
                }
            }
            @if devices.is_empty() { p { "No device here." } }
            @if let Some(next) = &next_cursor {
                p { a id="next-page" href=(format!("/ui/jobs/{id}?status={}&cursor={next}#devices", status_filter.unwrap_or(""))) { "Next " (DEVICES_PER_PAGE) " →" } }
            }
            @if !trail.is_empty() {
                h2 { "Audit trail" }
                table id="trail" {
                    thead { tr { th { "when" } th { "who" } th { "what" } th { "outcome" } } }
                    tbody {
                        @for e in &trail {
                            tr { td { (time(e.at_ms)) } td { (e.actor) } td { (e.action) } td { (e.outcome) } }
                        }
                    }
                }
            }
        },
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(state: JobState, terminal: u64, targeted: u64, created: u64) -> JobView {
        let spec: shared::job::JobSpec = serde_json::from_value(serde_json::json!({
            "action": {"type": "reboot"},
            "target": {"devices": ["d1"]}
        }))
        .expect("spec");
        JobView {
            job_id: uuid::Uuid::nil(),
            name: None,
            state,
            action: "reboot".into(),
            created_at_ms: created,
            created_by: String::new(),
            finished_at_ms: None,
            targeted,
            planning_done: true,
            terminal,
            succeeded: terminal,
            failed: 0,
            rejected: 0,
            timed_out: 0,
            unhealthy: 0,
            rolled_back: 0,
            canceled: 0,
            skipped: 0,
            pending: targeted - terminal,
            waiting: 0,
            state_reason: None,
            rollout: None,
            spec,
        }
    }

    #[test]
    fn the_eta_is_what_is_left_at_the_pace_so_far() {
        // 1,000 of 4,000 done in 10 s: 100/s, 30 s left.
        let (rate, eta) = pace(&job(JobState::InProgress, 1000, 4000, 0), 10_000);
        assert_eq!(rate, 100.0);
        assert_eq!(eta, Some(30.0));
        // A finished job has no ETA; nothing done yet, none either.
        assert_eq!(
            pace(&job(JobState::Completed, 4000, 4000, 0), 10_000).1,
            None
        );
        assert_eq!(pace(&job(JobState::InProgress, 0, 4000, 0), 10_000).1, None);
    }
}
