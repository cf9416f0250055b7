//! The API's OpenAPI 3.1 description, served at `/openapi.json`, and a page reading it at
//! `/docs`.
//!
//! Owns the document: every route of [`super::router`] (the `#[utoipa::path]` beside each
//! handler; routes one handler serves under several paths are described here), the
//! schemas of the answers, and the bearer security scheme. A unit test keeps the document
//! and the access policy's route table in step. It never handles a request of the API.

use axum::{Json, response::IntoResponse};
use maud::html;
use utoipa::{
    Modify, OpenApi, ToSchema,
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
};

/// Every error: what is wrong and, when one is at fault, the field.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    /// What is wrong.
    error: String,
    /// The field at fault (a spec's path such as `rollout.waves[1].percent`, a header, a
    /// query parameter).
    field: Option<String>,
}

/// A job made by a create (or found again by its idempotency key).
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct Created {
    /// The job.
    job_id: uuid::Uuid,
    /// Set when the idempotency key had made this job before.
    idempotent_replay: Option<bool>,
}

/// A page of devices.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct DeviceList {
    /// The devices, in id order.
    devices: Vec<shared::device::Device>,
    /// Where the next page starts, while there may be more.
    next_cursor: Option<String>,
}

/// A count.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct Count {
    /// How many devices match.
    count: u64,
}

/// A device's jobs.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct DeviceJobs {
    /// The device.
    device_id: String,
    /// The unfinished jobs in its line, in the order it gets them.
    #[schema(value_type = Vec<Object>)]
    jobs: Vec<serde_json::Value>,
    /// Its status in each of the newest jobs that reached it, newest first.
    history: Vec<crate::jobs::DeviceHistoryEntry>,
}

/// Routes served by a handler documented under another path (described only: the router
/// calls that handler).
#[allow(dead_code)]
mod aliases {
    use super::ErrorBody;

    #[utoipa::path(get, path = "/healthz", tag = "operations", summary = "The process is alive",
        responses((status = 200, description = "alive", body = String, content_type = "text/plain")))]
    pub(super) fn healthz() {}

    #[utoipa::path(post, path = "/v1/jobs/{id}/resume", tag = "jobs", summary = "Resume a paused job (and release a failed gate)",
        params(("id" = String, Path)),
        responses((status = 200, description = "done", body = Object),
            (status = "4XX", description = "refused", body = ErrorBody)))]
    pub(super) fn resume_job() {}

    #[utoipa::path(post, path = "/v1/jobs/{id}/approve", tag = "jobs", summary = "Approve the next wave",
        params(("id" = String, Path)),
        responses((status = 200, description = "done", body = Object),
            (status = "4XX", description = "refused", body = ErrorBody)))]
    pub(super) fn approve_job() {}

    #[utoipa::path(post, path = "/v1/jobs/{id}/rollback", tag = "jobs", summary = "The job's rollback action for its devices that ended in the given states",
        params(("id" = String, Path), ("dry_run" = Option<bool>, Query), ("idempotency-key" = Option<String>, Header)),
        request_body(content = Object, content_type = "application/json"),
        responses((status = 201, description = "created", body = super::Created),
            (status = 200, description = "the dry run, or a repeated create", body = Object),
            (status = "4XX", description = "refused", body = ErrorBody)))]
    pub(super) fn rollback_job() {}

    #[utoipa::path(post, path = "/v1/schedules/{id}/resume", tag = "schedules", summary = "Restart a paused schedule from now",
        params(("id" = String, Path)),
        responses((status = 200, description = "done", body = Object),
            (status = "4XX", description = "refused", body = ErrorBody)))]
    pub(super) fn resume_schedule() {}
}

/// Every route needs a bearer token (an API token or an OIDC token), but the probes.
struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "fleetbatch",
        description = "Batch jobs on fleets of IoT devices: the coordinator's API. Every route but the probes takes `Authorization: Bearer <token>`; the role each needs is in docs/security.md."
    ),
    modifiers(&Bearer),
    security(("bearer" = [])),
    paths(
        aliases::healthz,
        super::health::readyz,
        super::health::metrics,
        super::devices::import,
        super::devices::list,
        super::devices::count,
        super::devices::get_one,
        super::devices::update,
        super::devices::delete,
        super::devices::jobs,
        super::devices::groups,
        super::queries::list,
        super::queries::put,
        super::queries::delete,
        super::jobs::create,
        super::jobs::list,
        super::jobs::get,
        super::jobs::delete,
        super::jobs::cancel,
        super::jobs::steer,
        aliases::resume_job,
        aliases::approve_job,
        super::jobs::follow_up_job,
        aliases::rollback_job,
        super::jobs::devices,
        super::jobs::report,
        super::jobs::results,
        super::events::stream,
        super::schedules::create,
        super::schedules::list,
        super::schedules::get,
        super::schedules::delete,
        super::schedules::steer,
        aliases::resume_schedule,
        super::templates::create,
        super::templates::list,
        super::templates::get,
        super::templates::delete,
        super::templates::create_job,
        super::dlq::list,
        super::dlq::replay,
        super::access::create,
        super::access::list,
        super::access::revoke,
        super::access::audit_log,
        super::access::whoami,

    )
)]
pub struct ApiDoc;

/// `GET /openapi.json`.
pub(super) async fn document() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}

/// `GET /docs`: the routes, their parameters and answers, read from the document.
pub(super) async fn docs() -> impl IntoResponse {
    let doc = ApiDoc::openapi();
    let text = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or_default().to_owned();
    let paths = serde_json::to_value(&doc.paths).unwrap_or_default();
    html! {
        (maud::DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "fleetbatch API" }
                link rel="stylesheet" href="/ui/assets/app.css";
            }
            body {
                header { a href="/ui/jobs" { b { "fleetbatch" } } span { "API" } }
                main {
                    h1 { "fleetbatch API" }
                    p { (doc.info.description.clone().unwrap_or_default()) }
                    p { "The whole description: " a href="/openapi.json" { "/openapi.json" } " (OpenAPI 3.1)." }
                    table id="routes" {
                        thead { tr { th { "method" } th { "path" } th { "what" } th { "parameters" } th { "answers" } } }
                        tbody {
                            @if let Some(paths) = paths.as_object() {
                                @for (path, ops) in paths {
                                    @if let Some(ops) = ops.as_object() {
                                        @for (method, op) in ops {
                                            tr {
                                                td { code { (method.to_uppercase()) } }
                                                td { code { (path) } }
                                                td { (text(op, "summary")) }
                                                td {
                                                    @for p in op["parameters"].as_array().into_iter().flatten() {
                                                        code { (text(p, "name")) } " (" (text(p, "in")) ") "
                                                    }
                                                }
                                                td {
                                                    @if let Some(r) = op["responses"].as_object() {
                                                        @for (status, _) in r { (status) " " }
                                                    }
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn the_document_describes_exactly_the_apis_routes() {
        let doc = ApiDoc::openapi();
        let described: BTreeSet<(String, String)> = doc
            .paths
            .paths
            .iter()
            .flat_map(|(path, item)| {
                let v = serde_json::to_value(item).expect("path item");
                v.as_object()
                    .expect("operations")
                    .keys()
                    .filter(|k| ["get", "post", "put", "patch", "delete"].contains(&k.as_str()))
                    .map(|m| (m.to_uppercase(), path.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        // The access policy lists every route the router serves (a test walks them all);
        // the dashboard's pages and the description itself are not API routes.
        let routed: BTreeSet<(String, String)> = crate::access::policy::ROUTES
            .iter()
            .filter(|(_, path, _)| {
                !(*path == "/"
                    || path.starts_with("/ui/")
                    || *path == "/openapi.json"
                    || *path == "/docs")
            })
            .map(|(m, path, _)| (m.to_string(), (*path).to_owned()))
            .collect();
        let missing: Vec<_> = routed.difference(&described).collect();
        let extra: Vec<_> = described.difference(&routed).collect();
        assert!(missing.is_empty(), "routes not described: {missing:?}");
        assert!(extra.is_empty(), "described but not routed: {extra:?}");
        let json = serde_json::to_value(&doc).expect("json");
        assert_eq!(json["openapi"], "3.1.0");
    }
}
