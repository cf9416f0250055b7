//! The dashboard: server-rendered pages served by the coordinator at `/`, for operators who
//! want to see and steer rollouts from a browser.
//!
//! Owns the pages and the two assets (a stylesheet and one small script), compiled into the
//! binary: jobs ([`jobs`]: the list, a job with live counters, chart, waves, errors,
//! readings and devices), a new job with its dry run ([`create`]), devices ([`fleet`]:
//! search with the query language, a device with its history), and the deployment
//! ([`admin`]: schedules, dead letters, tokens, the audit log). A browser signs in with an
//! API token (or an OIDC token), kept in an `HttpOnly`, `SameSite=Strict` cookie and checked
//! on every request like a bearer token. Pages only read; every action a page offers is a
//! call of the same API the CLI uses, with the page's CSRF token, so the same authorization
//! and audit apply. It never changes anything itself.

use std::sync::Arc;

use axum::{
    Form, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use maud::{DOCTYPE, Markup, html};

use crate::{
    access::{Caller, Role},
    api::guard::{self, SESSION_COOKIE},
    app::AppState,
    jobs::JobView,
};

mod admin;
mod create;
mod fleet;
mod jobs;
mod sso;

const CSS: &str = include_str!("app.css");
const JS: &str = include_str!("app.js");

/// The dashboard's routes (each listed as public in [`crate::access::policy`]: a page renders
/// only for a signed-in caller and sends anyone else to sign in).
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/jobs") }))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/oidc/start", get(sso::start))
        .route("/ui/oidc/callback", get(sso::callback))
        .route("/ui/jobs", get(jobs::list))
        .route("/ui/jobs/{id}", get(jobs::one))
        .route("/ui/new", get(create::editor))
        .route("/ui/devices", get(fleet::search))
        .route("/ui/devices/{id}", get(fleet::one))
        .route("/ui/schedules", get(admin::schedules))
        .route("/ui/deadletters", get(admin::dead_letters))
        .route("/ui/tokens", get(admin::tokens))
        .route("/ui/audit", get(admin::audit))
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
    job: Option<&JobView>,
    body: Markup,
) -> Markup {
    let gate = job
        .filter(|j| j.rollout.is_some())
        .map(|j| if at_gate(j) { "1" } else { "0" });
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
            body data-job=[job.map(|j| j.job_id)] data-state=[job.map(|j| j.state.as_str())] data-gate=[gate] data-live=[job.filter(|j| !j.state.is_finished()).map(|_| "1")] {
                header {
                    a href="/ui/jobs" { b { "fleetbatch" } }
                    @if let Some(c) = caller {
                        nav {
                            a href="/ui/jobs" { "Jobs" }
                            @if c.role >= Role::Operator { a href="/ui/new" { "New job" } }
                            a href="/ui/devices" { "Devices" }
                            a href="/ui/schedules" { "Schedules" }
                            a href="/ui/deadletters" { "Dead letters" }
                            @if c.role >= Role::Admin {
                                a href="/ui/tokens" { "Tokens" }
                                a href="/ui/audit" { "Audit log" }
                            }
                        }
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

/// Whether a wave of `job` waits at its gate (for its devices' outcomes or an approval).
fn at_gate(job: &JobView) -> bool {
    job.rollout
        .as_ref()
        .is_some_and(|r| r.phase.phase == "approval" || r.phase.phase == "gate")
}

/// A page refused to a signed-in caller whose role is below `needed`.
fn forbidden(needed: Role) -> Response {
    (
        StatusCode::FORBIDDEN,
        format!("this page needs the {} role", needed.as_str()),
    )
        .into_response()
}

/// An answer for something that is not there.
fn not_found(what: String) -> Response {
    (StatusCode::NOT_FOUND, what).into_response()
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

/// A duration for people: `42 s`, `7 min 5 s`, `3 h 12 min`.
fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// A query string value, escaped.
fn escape(v: &str) -> String {
    url::form_urlencoded::byte_serialize(v.as_bytes()).collect()
}

/// The signed-in caller of a page and the page's CSRF token; anyone else is sent to sign in.
struct SignedIn {
    caller: Caller,
    csrf: String,
}

impl axum::extract::FromRequestParts<Arc<AppState>> for SignedIn {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        app: &Arc<AppState>,
    ) -> Result<Self, Response> {
        signed_in(app, &parts.headers)
            .await
            .map(|(caller, csrf)| Self { caller, csrf })
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

async fn login_page(State(app): State<Arc<AppState>>) -> Markup {
    login_form(None, app.settings.coordinator.auth.oidc.sign_in())
}

/// The session cookie for `secret` (an API token or the provider's ID token).
fn session_cookie(app: &AppState, secret: &str) -> String {
    let secure = if app.settings.coordinator.tls.cert_file.is_some() {
        "; Secure"
    } else {
        ""
    };
    format!("{SESSION_COOKIE}={secret}; HttpOnly; SameSite=Strict; Path=/{secure}")
}

/// The sign-in page; `sso`: with the way to the identity provider.
fn login_form(error: Option<&str>, sso: bool) -> Markup {
    page(
        "Sign in",
        None,
        "",
        None,
        html! {
            h1 { "Sign in" }
            p { "With an API token (" code { "fleetbatch token create" } ") or a token from your identity provider." }
            @if let Some(e) = error { p.error id="sign-in-error" { (e) } }
            @if sso {
                p { a.button id="sso" href="/ui/oidc/start" { "Sign in with your identity provider" } }
                p.hint { "Or paste a token:" }
            }
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
            let cookie = session_cookie(&app, secret);
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
            let sso = app.settings.coordinator.auth.oidc.sign_in();
            (StatusCode::UNAUTHORIZED, login_form(Some(&why), sso)).into_response()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_in_the_largest_units() {
        assert_eq!(duration(0.4), "0 s");
        assert_eq!(duration(59.6), "1 min 0 s");
        assert_eq!(duration(425.0), "7 min 5 s");
        assert_eq!(duration(11_520.0), "3 h 12 min");
        assert_eq!(duration(-3.0), "0 s");
    }

    #[test]
    fn times_read_as_utc_dates() {
        assert_eq!(time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(time(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }
}
