//! `/v1/devices` and `/v1/groups`: importing, listing and counting registered devices.

use std::sync::Arc;

use axum::{
    Json,
    body::Body,
    extract::{Query, State},
    http::{HeaderMap, StatusCode, header},
};
use futures::TryStreamExt;
use redis::AsyncCommands;
use serde::Deserialize;
use serde_json::json;
use shared::device::AttributeFilter;
use tokio::io::AsyncBufReadExt;

use super::{ApiError, ApiResult};
use crate::{
    app::AppState,
    registry::{self, ImportFormat, ImportReport, LineError},
};

#[derive(Debug, Deserialize)]
pub(super) struct ImportQuery {
    format: Option<ImportFormat>,
}

/// Streams an import: CSV (header row) or NDJSON; invalid records are reported by line.
pub(super) async fn import(
    State(app): State<Arc<AppState>>,
    Query(q): Query<ImportQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<ImportReport>> {
    let format = q.format.unwrap_or_else(|| {
        let ct = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if ct.contains("csv") {
            ImportFormat::Csv
        } else {
            ImportFormat::Ndjson
        }
    });
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let reader = tokio_util::io::StreamReader::new(stream);
    let mut lines = tokio::io::BufReader::new(reader).lines();
    let mut redis = app.redis.clone();
    let mut report = ImportReport::default();
    let mut batch = Vec::with_capacity(1000);
    let mut columns: Option<Vec<usize>> = None;
    let mut line_no = 0u64;
    let fail = |report: &mut ImportReport, line: u64, error: String| {
        report.failed += 1;
        if report.errors.len() < registry::MAX_REPORTED_ERRORS {
            report.errors.push(LineError { line, error });
        }
    };
    while let Some(line) = lines
        .next_line()
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("reading the body: {e}")))?
    {
        line_no += 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parsed = match (format, &columns) {
            (ImportFormat::Ndjson, _) => registry::parse_ndjson_line(line),
            (ImportFormat::Csv, None) => {
                columns = Some(registry::parse_csv_header(line).map_err(|e| {
                    ApiError::new(StatusCode::BAD_REQUEST, format!("line {line_no}: {e}"))
                })?);
                continue;
            }
            (ImportFormat::Csv, Some(cols)) => registry::parse_csv_line(line, cols),
        };
        match parsed {
            Ok(d) => batch.push(d),
            Err(e) => fail(&mut report, line_no, e),
        }
        if batch.len() >= 1000 {
            registry::write_batch(&mut redis, &app.names, &batch)
                .await
                .map_err(ApiError::internal)?;
            report.imported += batch.len() as u64;
            batch.clear();
        }
    }
    registry::write_batch(&mut redis, &app.names, &batch)
        .await
        .map_err(ApiError::internal)?;
    report.imported += batch.len() as u64;
    tracing::info!(
        imported = report.imported,
        failed = report.failed,
        "devices imported"
    );
    Ok(Json(report))
}

/// Which devices a listing or count covers, and the page. `after` is the older name of
/// `cursor`, still accepted.
#[derive(Debug, Deserialize)]
pub(super) struct DeviceQuery {
    group: Option<String>,
    model: Option<String>,
    hardware_revision: Option<String>,
    firmware_version: Option<String>,
    /// `tag=key=value`, repeatable in spirit: one tag per query (`key=value`).
    tag: Option<String>,
    #[serde(alias = "after")]
    cursor: Option<String>,
    limit: Option<usize>,
}

impl DeviceQuery {
    fn filter(&self) -> ApiResult<AttributeFilter> {
        let mut tags = std::collections::BTreeMap::new();
        if let Some(t) = &self.tag {
            let (k, v) = t.split_once('=').ok_or_else(|| {
                ApiError::new(StatusCode::BAD_REQUEST, format!("{t:?} is not key=value"))
                    .with_field("tag")
            })?;
            tags.insert(k.to_owned(), v.to_owned());
        }
        Ok(AttributeFilter {
            model: self.model.clone(),
            hardware_revision: self.hardware_revision.clone(),
            firmware_version: self.firmware_version.clone(),
            tags,
        })
    }
    fn key(&self, app: &AppState) -> String {
        match &self.group {
            Some(g) => app.names.group(g),
            None => app.names.devices(),
        }
    }
}

/// One page of devices in id order; `next_cursor` continues it.
pub(super) async fn list(
    State(app): State<Arc<AppState>>,
    Query(q): Query<DeviceQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let filter = q.filter()?;
    let mut redis = app.redis.clone();
    let page = registry::scan(
        &mut redis,
        &app.names,
        &q.key(&app),
        &filter,
        q.cursor.as_deref(),
        Some(limit),
    )
    .await
    .map_err(ApiError::internal)?;
    Ok(Json(
        json!({"devices": page.devices, "next_cursor": page.next_cursor}),
    ))
}

/// How many devices match.
pub(super) async fn count(
    State(app): State<Arc<AppState>>,
    Query(q): Query<DeviceQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let filter = q.filter()?;
    let mut redis = app.redis.clone();
    let key = q.key(&app);
    if filter.is_empty() {
        let n: u64 = redis.zcard(&key).await.map_err(ApiError::internal)?;
        return Ok(Json(json!({"count": n})));
    }
    let page = registry::scan(&mut redis, &app.names, &key, &filter, None, None)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(json!({"count": page.matched})))
}

/// Every group with its size (an empty registry has none).
pub(super) async fn groups(State(app): State<Arc<AppState>>) -> ApiResult<Json<serde_json::Value>> {
    let mut redis = app.redis.clone();
    let mut groups: Vec<String> = redis
        .smembers(app.names.groups())
        .await
        .map_err(ApiError::internal)?;
    groups.sort();
    if groups.is_empty() {
        return Ok(Json(json!({"groups": []})));
    }
    let mut pipe = redis::pipe();
    for g in &groups {
        pipe.zcard(app.names.group(g));
    }
    let counts: Vec<u64> = pipe
        .query_async(&mut redis)
        .await
        .map_err(ApiError::internal)?;
    let list: Vec<_> = groups
        .into_iter()
        .zip(counts)
        .map(|(g, n)| json!({"group": g, "devices": n}))
        .collect();
    Ok(Json(json!({"groups": list})))
}
