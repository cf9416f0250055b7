//! The deployment's pages: schedules (pause and resume for operators), dead letters (replay
//! for admins), API tokens and the audit log (admins only, as their API routes).
//!
//! It never writes: the buttons call the API.

use std::sync::Arc;

use axum::{
    extract::{Query, State},
    response::{IntoResponse, Response},
};
use maud::html;

use super::{SignedIn, escape, forbidden, page, time};
use crate::{access::Role, app::AppState};

/// Dead letters shown (they stay on their queue).
const DEAD_LETTERS: usize = 100;

/// Audit entries per page.
const AUDIT_PAGE: usize = 100;

pub(super) async fn schedules(
    State(app): State<Arc<AppState>>,
    SignedIn { caller, csrf }: SignedIn,
) -> Response {
    let mut redis = app.redis.clone();
    let mut views = Vec::new();
    let ids = match crate::recurring::list(&mut redis, &app.names).await {
        Ok(ids) => ids,
        Err(e) => return crate::api::unavailable(e),
    };
    for id in ids {
        match crate::recurring::get(&mut redis, &app.names, id).await {
            Ok(Some(v)) => views.push(v),
            Ok(None) => {}
            Err(e) => return crate::api::unavailable(e),
        }
    }
    let operator = caller.role >= Role::Operator;
    page(
        "Schedules",
        Some(&caller),
        &csrf,
        None,
        html! {
            h1 { "Schedules" }
            table id="schedules" {
                thead { tr { th { "schedule" } th { "state" } th { "cron" } th { "next" } th { "newest jobs" } th { "created" } @if operator { th {} } } }
                tbody {
                    @for s in &views {
                        tr {
                            td { (s.name.as_deref().unwrap_or("(unnamed)")) br; small { (s.schedule_id) } }
                            td.state { (s.state) }
                            td { code { (s.cron) } " " (s.time_zone) }
                            td { (s.next_occurrence_ms.map(time).unwrap_or_default()) }
                            td { @for r in s.runs.iter().take(3) { a href=(format!("/ui/jobs/{}", r.job_id)) { (time(r.occurrence_ms)) } br; } }
                            td { (time(s.created_at_ms)) br; small { (s.created_by) } }
                            @if operator {
                                td {
                                    @if s.state == "ACTIVE" {
                                        button data-action=(format!("/v1/schedules/{}/pause", s.schedule_id)) { "Pause" }
                                    } @else {
                                        button data-action=(format!("/v1/schedules/{}/resume", s.schedule_id)) { "Resume" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            @if views.is_empty() { p { "No schedule." } }
            p.error id="action-result" {}
        },
    )
    .into_response()
}

pub(super) async fn dead_letters(
    State(app): State<Arc<AppState>>,
    SignedIn { caller, csrf }: SignedIn,
) -> Response {
    let Some(broker) = app.broker() else {
        return crate::api::unavailable(anyhow::anyhow!(
            "not connected to RabbitMQ at the moment; try again shortly"
        ));
    };
    let letters = match crate::deadletters::list(&broker.connection, &app.names, DEAD_LETTERS).await
    {
        Ok(l) => l,
        Err(e) => return crate::api::unavailable(e),
    };
    page(
        "Dead letters",
        Some(&caller),
        &csrf,
        None,
        html! {
            h1 { "Dead letters" }
            p.hint { "Messages a queue could not deliver or a consumer could not read, with why. Listing them leaves them on their queue." }
            @if caller.role >= Role::Admin && !letters.is_empty() {
                div.actions { button data-action="/v1/dlq/replay" { "Replay every dead letter" } }
                p.error id="action-result" {}
            }
            table id="dead-letters" {
                thead { tr { th { "message" } th { "type" } th { "from" } th { "reason" } th { "bytes" } th { "content" } } }
                tbody {
                    @for l in &letters {
                        tr {
                            td { small { (l.message_id.as_deref().unwrap_or("")) } }
                            td { (l.message_type.as_deref().unwrap_or("")) }
                            td { (l.source_queue.as_deref().unwrap_or("")) }
                            td { (l.reason.as_deref().unwrap_or("")) }
                            td { (l.size) }
                            td { small { (l.decoded.as_ref().map_or_else(|| l.head_hex.clone().unwrap_or_default(), |d| d.to_string())) } }
                        }
                    }
                }
            }
            @if letters.is_empty() { p { "No dead letter." } }
        },
    )
    .into_response()
}

pub(super) async fn tokens(
    State(app): State<Arc<AppState>>,
    SignedIn { caller, csrf }: SignedIn,
) -> Response {
    if caller.role < Role::Admin {
        return forbidden(Role::Admin);
    }
    let mut redis = app.redis.clone();
    let tokens = match crate::access::tokens::list(&mut redis, &app.names).await {
        Ok(t) => t,
        Err(e) => return crate::api::unavailable(e),
    };
    page(
        "Tokens",
        Some(&caller),
        &csrf,
        None,
        html! {
            h1 { "API tokens" }
            p.hint { "Create tokens with " code { "fleetbatch token create" } " (the secret is shown once)." }
            table id="tokens" {
                thead { tr { th { "name" } th { "role" } th { "groups" } th { "created" } th { "expires" } th { "revoked" } th {} } }
                tbody {
                    @for t in &tokens {
                        tr {
                            td { (t.name) br; small { (t.id) } }
                            td { (t.role.as_str()) }
                            td { (t.groups.join(", ")) }
                            td { (time(t.created_at_ms)) br; small { (t.created_by) } }
                            td { (t.expires_at_ms.map(time).unwrap_or_default()) }
                            td { (t.revoked_at_ms.map(time).unwrap_or_default()) }
                            td { @if t.revoked_at_ms.is_none() { button data-method="DELETE" data-action=(format!("/v1/tokens/{}", t.id)) { "Revoke" } } }
                        }
                    }
                }
            }
            p.error id="action-result" {}
        },
    )
    .into_response()
}

pub(super) async fn audit(
    State(app): State<Arc<AppState>>,
    SignedIn { caller, csrf }: SignedIn,
    Query(mut filter): Query<crate::audit::Filter>,
) -> Response {
    if caller.role < Role::Admin {
        return forbidden(Role::Admin);
    }
    for f in [
        &mut filter.actor,
        &mut filter.job_id,
        &mut filter.outcome,
        &mut filter.action,
        &mut filter.cursor,
    ] {
        if f.as_deref().is_some_and(|v| v.trim().is_empty()) {
            *f = None;
        }
    }
    filter.limit = Some(AUDIT_PAGE);
    let mut redis = app.redis.clone();
    let (entries, next, problem) = match crate::audit::page(&mut redis, &app.names, &filter).await {
        Ok(Ok(p)) => (p.entries, p.next_cursor, None),
        Ok(Err(problem)) => (vec![], None, Some(problem)),
        Err(e) => return crate::api::unavailable(e),
    };
    let keep = |v: &Option<String>| v.clone().unwrap_or_default();
    let next_link = next.map(|c| {
        format!(
            "/ui/audit?actor={}&job_id={}&outcome={}&action={}&cursor={}",
            escape(&keep(&filter.actor)),
            escape(&keep(&filter.job_id)),
            escape(&keep(&filter.outcome)),
            escape(&keep(&filter.action)),
            escape(&c)
        )
    });
    page(
        "Audit log",
        Some(&caller),
        &csrf,
        None,
        html! {
            h1 { "Audit log" }
            form.filter method="get" action="/ui/audit" {
                input type="search" name="actor" placeholder="who" value=(keep(&filter.actor));
                input type="search" name="job_id" placeholder="job id" value=(keep(&filter.job_id));
                select name="outcome" {
                    option value="" { "every outcome" }
                    @for o in ["ok", "refused", "error"] {
                        option value=(o) selected[filter.outcome.as_deref() == Some(o)] { (o) }
                    }
                }
                input type="search" name="action" placeholder="action starts with" value=(keep(&filter.action));
                input type="submit" value="Filter";
            }
            @if let Some(p) = &problem { p.error { (p) } }
            table id="audit" {
                thead { tr { th { "when" } th { "who" } th { "role" } th { "what" } th { "job" } th { "status" } th { "outcome" } th { "from" } } }
                tbody {
                    @for e in &entries {
                        tr {
                            td { (time(e.at_ms)) }
                            td { (e.actor) }
                            td { (e.role) }
                            td { (e.action) }
                            td { @if let Some(j) = &e.job_id { a href=(format!("/ui/jobs/{j}")) { small { (j) } } } }
                            td { (e.status) }
                            td { (e.outcome) }
                            td { (e.remote) }
                        }
                    }
                }
            }
            @if entries.is_empty() { p { "No entry." } }
            @if let Some(link) = &next_link { p { a id="next-page" href=(link) { "Older →" } } }
        },
    )
    .into_response()
}
