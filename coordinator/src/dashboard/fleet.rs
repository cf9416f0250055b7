//! The device pages: search the registry with the device query language (as
//! `fleetbatch devices list --query` and the jobs' `target.query`), and one device with its
//! attributes, the unfinished jobs in its line, and its history across jobs (state,
//! attempts, last error, readings).
//!
//! It never writes.

use std::sync::Arc;

use axum::{
    extract::{Path, Query, State},
    response::{IntoResponse, Response},
};
use maud::html;

use super::{SignedIn, escape, not_found, page, time};
use crate::app::AppState;

/// Devices per page of a search.
const PER_PAGE: usize = 100;

#[derive(serde::Deserialize)]
pub(super) struct SearchQuery {
    query: Option<String>,
    cursor: Option<String>,
}

pub(super) async fn search(
    State(app): State<Arc<AppState>>,
    SignedIn { caller, csrf }: SignedIn,
    Query(q): Query<SearchQuery>,
) -> Response {
    let text = q.query.as_deref().map(str::trim).unwrap_or("");
    let parsed = (!text.is_empty())
        .then(|| shared::query::Query::parse(text))
        .transpose();
    let cursor = q
        .cursor
        .as_deref()
        .filter(|c| shared::device::validate_id(c).is_ok());
    let (found, problem) = match parsed {
        Ok(query) => {
            let mut redis = app.redis.clone();
            let scanned = crate::registry::scan(
                &mut redis,
                &app.names,
                &app.names.devices(),
                |d| query.as_ref().is_none_or(|q| q.matches(d)),
                cursor,
                Some(PER_PAGE),
            )
            .await;
            match scanned {
                Ok(p) => (Some(p), None),
                Err(e) => return crate::api::unavailable(e),
            }
        }
        Err(e) => (None, Some(e.to_string())),
    };
    page(
        "Devices",
        Some(&caller),
        &csrf,
        None,
        html! {
            h1 { "Devices" }
            form.filter method="get" action="/ui/devices" {
                input type="search" name="query" size="60" value=(text)
                    placeholder="firmware_version < 2.1.0 and tags.site = berlin";
                input type="submit" value="Search";
            }
            @if let Some(p) = &problem { p.error id="query-error" { "query: " (p) } }
            @if let Some(found) = &found {
                table id="found" {
                    thead { tr { th { "device" } th { "model" } th { "hardware" } th { "firmware" } th { "groups" } th { "tags" } } }
                    tbody {
                        @for d in &found.devices {
                            tr {
                                td { a href=(format!("/ui/devices/{}", escape(&d.id))) { (d.id) } }
                                td { (d.model) }
                                td { (d.hardware_revision) }
                                td { (d.firmware_version) }
                                td { (d.groups.join(", ")) }
                                td { @for (k, v) in &d.tags { (k) "=" (v) " " } }
                            }
                        }
                    }
                }
                @if found.devices.is_empty() { p { "No device matches." } }
                @if let Some(next) = &found.next_cursor {
                    p { a id="next-page" href=(format!("/ui/devices?query={}&cursor={}", escape(text), escape(next))) { "Next " (PER_PAGE) " →" } }
                }
            }
        },
    )
    .into_response()
}

pub(super) async fn one(
    State(app): State<Arc<AppState>>,
    SignedIn { caller, csrf }: SignedIn,
    Path(id): Path<String>,
) -> Response {
    let mut redis = app.redis.clone();
    let device = match crate::registry::get(&mut redis, &app.names, &id).await {
        Ok(d) => d,
        Err(e) => return crate::api::unavailable(e),
    };
    let lined = match crate::api::device_jobs(&app, &id).await {
        Ok(j) => j,
        Err(e) => return e.into_response(),
    };
    let history = match crate::api::device_history(&app, &id, crate::api::HISTORY_JOBS).await {
        Ok(h) => h,
        Err(e) => return e.into_response(),
    };
    let Some(device) = device else {
        return not_found(format!("no device {id:?}"));
    };
    let attributes = serde_json::to_value(&device).unwrap_or_default();
    page(
        &id,
        Some(&caller),
        &csrf,
        None,
        html! {
            h1 { "Device " (id) }
            table id="attributes" {
                tbody {
                    @if let Some(map) = attributes.as_object() {
                        @for (k, v) in map {
                            tr { th { (k) } td { (v.as_str().map_or_else(|| v.to_string(), str::to_owned)) } }
                        }
                    }
                }
            }
            h2 { "Unfinished jobs, in the order the device gets them" }
            table id="line" {
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
            h2 { "History, newest job first" }
            table id="history" {
                thead { tr { th { "job" } th { "action" } th { "job state" } th { "device state" } th { "attempts" } th { "last error" } th { "readings" } th { "updated" } } }
                tbody {
                    @for h in &history {
                        tr {
                            td { a href=(format!("/ui/jobs/{}", h.job_id)) { (h.name.as_deref().unwrap_or("(unnamed)")) } br; small { (time(h.created_at_ms)) } }
                            td { (h.action) }
                            td { (h.job_state.as_str()) }
                            td { (h.status.state.as_str()) }
                            td { (h.status.attempts) }
                            td { (h.status.error.as_deref().unwrap_or("")) }
                            td { @if let Some(r) = &h.status.readings { (serde_json::to_string(r).unwrap_or_default()) } }
                            td { (time(h.status.updated_at_ms)) }
                        }
                    }
                }
            }
            @if history.is_empty() { p { "No job has reached this device among the newest " (crate::api::HISTORY_JOBS) "." } }
        },
    )
    .into_response()
}
