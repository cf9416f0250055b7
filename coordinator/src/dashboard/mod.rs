//! The dashboard: server-rendered pages served by the coordinator at `/`, for operators who
//! want to see and steer rollouts from a browser.
//!
//! Owns the pages (jobs, a job with live counters and its devices, a device with its jobs),
//! sign-in and sign-out, and the two assets (a stylesheet and one small script), compiled into
//! the binary. A browser signs in with an API token (or an OIDC token), kept in an
//! `HttpOnly`, `SameSite=Strict` cookie and checked on every request like a bearer token.
//! Pages only read; every action a page offers (pause, resume, approve, cancel) is a call of
//! the same API the CLI uses, with the page's CSRF token, so the same authorization and audit
//! apply. It never changes a job itself.

use std::sync::Arc;

use axum::{
    Form, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use maud::{DOCTYPE, Markup, html};
use shared::state::{ExecutionState, JobState};

use crate::{
    access::{Caller, Role},
    api::guard::{self, SESSION_COOKIE},
    app::AppState,
    jobs::{self, JobView},
};

const CSS: &str = include_str!("app.css");
const JS: &str = include_str!("app.js");

/// The dashboard's routes (each listed as public in [`crate::access::policy`]: a page renders
/// only for a signed-in caller and sends anyone else to sign in).
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/jobs") }))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/jobs", get(jobs_page))
        .route("/ui/jobs/{id}", get(job_page))
        .route("/ui/devices/{id}", get(device_page))
        .route("/ui/assets/{file}", get(asset))
}

async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "app.css" => (CSS, "text/css; charset=utf-8"),
        "app.js" => (JS, "text/javascript; charset=utf-8"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

/// A whole page around `body`.
fn page(
    title: &str,
    caller: Option<&Caller>,
    csrf: &str,
    job: Option<&str>,
    body: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="csrf-token" content=(csrf);
                title { (title) " · fleetbatch" }
                link rel="stylesheet" href="/ui/assets/app.css";
            }
            body data-job=[job] {
                header {
                    a href="/ui/jobs" { b { "fleetbatch" } }
                    a href="/ui/jobs" { "Jobs" }
                    @if let Some(c) = caller {
                        span.who { (c.subject) " (" (c.role.as_str()) ")" }
                        form method="post" action="/ui/logout" { input type="submit" value="Sign out"; }
                    }
                }
                main { (body) }
                script src="/ui/assets/app.js" {}
            }
        }
    }
}

/// The signed-in caller of a page, or the way to the sign-in page.
async fn signed_in(app: &AppState, headers: &HeaderMap) -> Result<(Caller, String), Response> {
    match guard::page_caller(app, headers).await {
        Some((caller, secret)) => {
            let csrf = if secret.is_empty() {
                String::new()
            } else {
                guard::csrf_token(&secret)
            };
            Ok((caller, csrf))
        }
        None => Err(Redirect::to("/ui/login").into_response()),
    }
}

async fn login_page() -> Markup {
    login_form(None)
}

fn login_form(error: Option<&str>) -> Markup {
    page(
        "Sign in",
        None,
        "",
        None,
        html! {
            h1 { "Sign in" }
            p { "With an API token (" code { "fleetbatch token create" } ") or a token from your identity provider." }
            @if let Some(e) = error { p.error { (e) } }
            form method="post" action="/ui/login" {
                input type="password" name="token" placeholder="token" size="70" autocomplete="off" required;
                " "
                input type="submit" value="Sign in";
            }
        },
    )
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

/// Checks the token like any bearer token and keeps it in the session cookie.
async fn login(State(app): State<Arc<AppState>>, Form(form): Form<LoginForm>) -> Response {
    let secret = form.token.trim();
    match guard::resolve(&app, secret).await {
        Ok(caller) => {
            tracing::info!(subject = caller.subject, "dashboard sign-in");
            let secure = if app.settings.coordinator.tls.cert_file.is_some() {
                "; Secure"
            } else {
                ""
            };
            let cookie =
                format!("{SESSION_COOKIE}={secret}; HttpOnly; SameSite=Strict; Path=/{secure}");
            (
                StatusCode::SEE_OTHER,
                [
                    (header::SET_COOKIE, cookie),
                    (header::LOCATION, "/ui/jobs".into()),
                ],
            )
                .into_response()
        }
        Err(guard::Resolved::Refused(why)) => {
            (StatusCode::UNAUTHORIZED, login_form(Some(&why))).into_response()
        }
        Err(guard::Resolved::Unavailable(e)) => e.into_response(),
    }
}

async fn logout() -> Response {
    (
        StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
            ),
            (header::LOCATION, "/ui/login".to_owned()),
        ],
    )
        .into_response()
}

/// The terminal counters shown, in order: (key in the job view, label).
const COUNTERS: [(&str, &str); 9] = [
    ("succeeded", "succeeded"),
    ("failed", "failed"),
    ("rejected", "rejected"),
    ("timed_out", "timed out"),
    ("unhealthy", "unhealthy"),
    ("rolled_back", "rolled back"),
    ("canceled", "canceled"),
    ("skipped", "skipped"),
    ("pending", "pending"),
];

fn count(job: &JobView, key: &str) -> u64 {
    match key {
        "succeeded" => job.succeeded,
        "failed" => job.failed,
        "rejected" => job.rejected,
        "timed_out" => job.timed_out,
        "unhealthy" => job.unhealthy,
        "rolled_back" => job.rolled_back,
        "canceled" => job.canceled,
        "skipped" => job.skipped,
        "pending" => job.pending,
        "waiting" => job.waiting,
        "targeted" => job.targeted,
        _ => 0,
    }
}

/// A progress bar: a segment per terminal state, as a share of the targeted devices.
fn bar(job: &JobView) -> Markup {
    let width = |n: u64| {
        if job.targeted == 0 {
            0.0
        } else {
            100.0 * n as f64 / job.targeted as f64
        }
    };
    html! {
        div.bar id="bar" title=(format!("{} of {} devices done", job.terminal, job.targeted)) {
            @for (key, _) in &COUNTERS[..8] {
                span class=(key) data-count=(key) style=(format!("width:{:.2}%", width(count(job, key)))) {}
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct JobsQuery {
    state: Option<String>,
    name: Option<String>,
}

async fn jobs_page(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<JobsQuery>,
) -> Response {
    let (caller, csrf) = match signed_in(&app, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let mut redis = app.redis.clone();
    let listed = match jobs::list(&mut redis, &app.names, None, 200).await {
        Ok(p) => p.jobs,
        Err(e) => return crate::api::unavailable(e),
    };
    let state = q.state.as_deref().filter(|s| !s.is_empty());
    let name = q.name.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let shown: Vec<&JobView> = listed
        .iter()
        .filter(|j| state.is_none_or(|s| j.state.as_str() == s))
        .filter(|j| name.is_none_or(|n| j.name.as_deref().is_some_and(|m| m.contains(n))))
        .collect();
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
                input type="submit" value="Filter";
            }
            table {
                thead { tr { th { "job" } th { "state" } th { "action" } th { "progress" } th { "done" } th { "failed" } th { "created" } } }
                tbody {
                    @for j in &shown {
                        tr data-job-id=(j.job_id) {
                            td { a href=(format!("/ui/jobs/{}", j.job_id)) { (j.name.as_deref().unwrap_or("(unnamed)")) } br; small { (j.job_id) } }
                            td.state { (j.state.as_str()) }
                            td { (j.action) }
                            td { (bar(j)) }
                            td { (j.terminal) " / " (j.targeted) }
                            td { (j.failed + j.rejected + j.timed_out + j.unhealthy + j.rolled_back) }
                            td { (time(j.created_at_ms)) }
                        }
                    }
                }
            }
            @if shown.is_empty() { p { "No job." } }
        },
    )
    .into_response()
}

/// A time for people (UTC).
fn time(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(String::new, |t| {
            t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
        })
}

#[derive(serde::Deserialize)]
struct DevicesQuery {
    status: Option<String>,
    cursor: Option<String>,
}

/// Errors shown on a job's page, the most frequent first.
const TOP_ERRORS: usize = 10;

/// Audit entries shown on a job's page, the newest first.
const TRAIL: usize = 20;

/// Devices shown per page of a job's device table.
const DEVICES_PER_PAGE: usize = 100;

async fn job_page(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<DevicesQuery>,
) -> Response {
    let (caller, csrf) = match signed_in(&app, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let Ok(id) = id.parse::<uuid::Uuid>() else {
        return (StatusCode::NOT_FOUND, format!("no job {id}")).into_response();
    };
    let mut redis = app.redis.clone();
    let job = match jobs::get(&mut redis, &app.names, id).await {
        Ok(Some(j)) => j,
        Ok(None) => return (StatusCode::NOT_FOUND, format!("no job {id}")).into_response(),
        Err(e) => return crate::api::unavailable(e),
    };
    let status = q
        .status
        .as_deref()
        .filter(|s| !s.is_empty() && *s != "all")
        .and_then(ExecutionState::parse);
    let cursor = q.cursor.as_deref().and_then(|c| c.parse().ok());
    let devices =
        match jobs::devices(&mut redis, &app.names, id, status, cursor, DEVICES_PER_PAGE).await {
            Ok(p) => p,
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
    let operator = caller.role >= Role::Operator;
    let gate = job
        .rollout
        .as_ref()
        .is_some_and(|r| r.phase.phase == "approval" || r.phase.phase == "gate");
    let actions: Vec<(&str, &str)> = if !operator {
        vec![]
    } else if job.state.is_finished() {
        // Follow-up jobs: the failed and timed-out devices again, or the rollback action.
        let mut a = Vec::new();
        if job.failed + job.timed_out > 0 {
            a.push(("rerun", "Rerun the failed and timed-out devices"));
        }
        if job.spec.rollback.is_some() && job.succeeded > 0 {
            a.push(("rollback", "Roll back"));
        }
        a
    } else {
        let mut a = Vec::new();
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
    };
    let title = job.name.clone().unwrap_or_else(|| id.to_string());
    let status_filter = status.map(ExecutionState::as_str);
    page(
        &title,
        Some(&caller),
        &csrf,
        Some(&id.to_string()),
        html! {
            h1 { (title) }
            p {
                "State: " span.state id="job-state" { (job.state.as_str()) }
                @if let Some(r) = &job.state_reason { " — " (r) }
                " · " (job.action) " · created " (time(job.created_at_ms))
            }
            (bar(&job))
            div.counts {
                div { "targeted" b id="count-targeted" { (job.targeted) } }
                @for (key, label) in COUNTERS {
                    div { (label) b id=(format!("count-{key}")) { (count(&job, key)) } }
                }
                div { "waiting" b id="count-waiting" { (job.waiting) } }
            }
            @if !actions.is_empty() {
                div.actions {
                    @for (action, label) in &actions {
                        button data-action=(format!("/v1/jobs/{id}/{action}")) { (label) }
                    }
                }
                p.error id="action-result" {}
            }
            @if let Some(r) = &job.rollout {
                h2 { "Waves" }
                p { "Phase: " (r.phase.phase) @if let Some(w) = r.phase.wave { ", wave " (w) } }
                table {
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
                            tr { td { (n) } td { (error) } }
                        }
                    }
                }
            }
            @if !readings.is_empty() {
                h2 { "Readings" }
                table id="readings" {
                    thead { tr { th { "metric" } th { "devices" } th { "min" } th { "p50" } th { "mean" } th { "p95" } th { "max" } } }
                    tbody {
                        @for (metric, r) in &readings {
                            tr { td { (metric) } td { (r.count) } td { (r.min) } td { (r.p50) } td { (format!("{:.3}", r.mean)) } td { (r.p95) } td { (r.max) } }
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
            table id="devices" {
                thead { tr { th { "device" } th { "state" } th { "attempts" } th { "last error" } th { "updated" } } }
                tbody {
                    @for d in &devices.devices {
                        tr {
                            td { a href=(format!("/ui/devices/{}", d.device_id)) { (d.device_id) } }
                            td { (d.status.state.as_str()) }
                            td { (d.status.attempts) }
                            td { (d.status.error.as_deref().unwrap_or("")) }
                            td { (time(d.status.updated_at_ms)) }
                        }
                    }
                }
            }
            @if let Some(next) = &devices.next_cursor {
                p { a id="next-page" href=(format!("/ui/jobs/{id}?status={}&cursor={next}", status_filter.unwrap_or(""))) { "Next " (DEVICES_PER_PAGE) " →" } }
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

async fn device_page(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let (caller, csrf) = match signed_in(&app, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let mut redis = app.redis.clone();
    let device = match crate::registry::get(&mut redis, &app.names, &id).await {
        Ok(d) => d,
        Err(e) => return crate::api::unavailable(e),
    };
    let lined = match crate::api::device_jobs(&app, &id).await {
        Ok(j) => j,
        Err(e) => return e.into_response(),
    };
    let Some(device) = device else {
        return (StatusCode::NOT_FOUND, format!("no device {id:?}")).into_response();
    };
    let attributes = serde_json::to_value(&device).unwrap_or_default();
    page(
        &id,
        Some(&caller),
        &csrf,
        None,
        html! {
            h1 { "Device " (id) }
            table {
                tbody {
                    @if let Some(map) = attributes.as_object() {
                        @for (k, v) in map {
                            tr { th { (k) } td { (v.as_str().map_or_else(|| v.to_string(), str::to_owned)) } }
                        }
                    }
                }
            }
            h2 { "Unfinished jobs, in the order the device gets them" }
            table {
                thead { tr { th { "job" } th { "job state" } th { "priority" } th { "device state" } th { "attempts" } th { "last error" } } }
                tbody {
                    @for j in &lined {
                        tr {
                            td { a href=(format!("/ui/jobs/{}", j["job_id"].as_str().unwrap_or_default())) { (j["name"].as_str().unwrap_or("(unnamed)")) } }
                            td { (j["job_state"].as_str().unwrap_or_default()) }
                            td { (j["priority"]) }
                            td { (j["state"].as_str().unwrap_or_default()) }
                            td { (j["attempts"]) }
                            td { (j["error"].as_str().unwrap_or_default()) }
                        }
                    }
                }
            }
            @if lined.is_empty() { p { "None." } }
        },
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_utc_dates() {
        assert_eq!(time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(time(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }
}
