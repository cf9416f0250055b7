//! Readings of data-retrieval jobs: the summary across a batch, and the per-device export.
//!
//! Owns the statistics (count, min, max, mean, p50, p95 per metric, percentiles by the
//! nearest-rank method) and the CSV and NDJSON renderings of a job's results. Readings are
//! stored with each device's terminal status, so they are counted exactly once whatever the
//! retries. It never writes to Redis.

use shared::redis_conn::RedisConn;
use std::collections::BTreeMap;

use futures::StreamExt as _;

use serde::Serialize;
use shared::{job::Action, state::ExecutionState, store::StoreError, topology::Names};
use uuid::Uuid;

use crate::jobs::{self, DeviceEntry};

/// Statistics of one metric over the devices that reported it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct MetricSummary {
    /// Devices that reported the metric.
    pub count: u64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Median (nearest rank).
    pub p50: f64,
    /// 95th percentile (nearest rank).
    pub p95: f64,
    /// A histogram: devices per [`BUCKETS`]th of `[min, max]`, equal widths from `min` (the
    /// last bucket includes `max`; a single value puts every device in the first).
    pub histogram: Vec<u64>,
}

/// Buckets of a metric's histogram.
pub const BUCKETS: usize = 10;

/// Counts sorted, finite `values` into [`BUCKETS`] equal-width buckets over their range.
fn histogram(values: &[f64]) -> Vec<u64> {
    let mut buckets = vec![0u64; BUCKETS];
    let (min, max) = (values[0], values[values.len() - 1]);
    let width = (max - min) / BUCKETS as f64;
    for v in values {
        let i = if width > 0.0 {
            (((v - min) / width) as usize).min(BUCKETS - 1)
        } else {
            0
        };
        buckets[i] += 1;
    }
    buckets
}

/// The nearest-rank percentile `p` (0-100] of sorted `values`.
fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summarises `values`; `None` when there are none.
pub fn summarize(mut values: Vec<f64>) -> Option<MetricSummary> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let sum: f64 = values.iter().sum();
    Some(MetricSummary {
        count: values.len() as u64,
        min: values[0],
        max: values[values.len() - 1],
        mean: sum / values.len() as f64,
        p50: nearest_rank(&values, 50.0),
        p95: nearest_rank(&values, 95.0),
        histogram: histogram(&values),
    })
}

/// Calls `each` for every device status of a job, a page at a time.
async fn for_each_device(
    redis: &mut RedisConn,
    names: &Names,
    id: Uuid,
    state: Option<ExecutionState>,
    mut each: impl FnMut(DeviceEntry),
) -> Result<(), StoreError> {
    let mut cursor: Option<String> = None;
    loop {
        let page = jobs::devices(
            redis,
            names,
            id,
            state,
            cursor.as_deref().and_then(|c| c.parse().ok()),
            5000,
        )
        .await?;
        page.devices.into_iter().for_each(&mut each);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return Ok(()),
        }
    }
}

/// Per-metric summary of a data-retrieval job's readings (from devices that SUCCEEDED);
/// `None` for other jobs or unknown ids.
///
/// # Errors
/// Redis errors.
pub async fn summary(
    redis: &mut RedisConn,
    names: &Names,
    id: Uuid,
) -> Result<Option<BTreeMap<String, MetricSummary>>, StoreError> {
    let Some(job) = shared::store::load_job(redis, names, id).await? else {
        return Ok(None);
    };
    let Action::DataRetrieval(d) = &job.spec.action else {
        return Ok(None);
    };
    let mut values: BTreeMap<String, Vec<f64>> =
        d.metrics.iter().map(|m| (m.clone(), Vec::new())).collect();
    for_each_device(redis, names, id, Some(ExecutionState::Succeeded), |e| {
        for (k, v) in e.status.readings.into_iter().flatten() {
            if let Some(list) = values.get_mut(&k) {
                list.push(v);
            }
        }
    })
    .await?;
    Ok(Some(
        values
            .into_iter()
            .filter_map(|(k, v)| summarize(v).map(|s| (k, s)))
            .collect(),
    ))
}

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Comma-separated values with a header; one column per metric.
    Csv,
    /// One JSON object per line.
    Ndjson,
}

/// Every device's result (state, attempts, error, readings) as a stream of chunks, one page
/// of devices (sorted by id within the page) at a time, so an export of any size holds one
/// page in memory. `None` for unknown jobs. A Redis failure mid-way ends the stream with the
/// error (the client sees a truncated transfer).
///
/// # Errors
/// Redis errors before the first chunk.
pub async fn export(
    redis: &RedisConn,
    names: &Names,
    id: Uuid,
    format: Format,
) -> Result<Option<impl futures::Stream<Item = Result<bytes::Bytes, StoreError>> + use<>>, StoreError>
{
    let mut conn = redis.clone();
    let Some(job) = shared::store::load_job(&mut conn, names, id).await? else {
        return Ok(None);
    };
    let metrics = match &job.spec.action {
        Action::DataRetrieval(d) => d.metrics.clone(),
        _ => Vec::new(),
    };
    let header = match format {
        Format::Csv => {
            let mut header = vec!["device_id", "state", "attempts", "error", "updated_at_ms"];
            header.extend(metrics.iter().map(String::as_str));
            render_csv(&[], &header, &[])?
        }
        Format::Ndjson => Vec::new(),
    };
    let names = names.clone();
    // State: the connection, and where the next page starts (`None`: the scan is done).
    let pages = futures::stream::try_unfold(
        (conn, Some(None::<jobs::DeviceCursor>)),
        move |(mut conn, cursor)| {
            let names = names.clone();
            let metrics = metrics.clone();
            async move {
                let Some(cursor) = cursor else {
                    return Ok(None);
                };
                let page = jobs::devices(&mut conn, &names, id, None, cursor, EXPORT_PAGE).await?;
                let next = match page.next_cursor {
                    Some(c) => Some(Some(c.parse().map_err(|()| StoreError::Corrupt {
                        key: "(export cursor)".into(),
                        problem: c,
                    })?)),
                    None => None,
                };
                let chunk = match format {
                    Format::Ndjson => render_ndjson(&page.devices),
                    Format::Csv => render_csv(&page.devices, &[], &metrics)?,
                };
                Ok(Some((bytes::Bytes::from(chunk), (conn, next))))
            }
        },
    );
    Ok(Some(
        futures::stream::once(async move { Ok(bytes::Bytes::from(header)) }).chain(pages),
    ))
}

/// Devices per page of an export.
const EXPORT_PAGE: usize = 2000;

fn render_ndjson(entries: &[DeviceEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let line = serde_json::json!({
            "device_id": e.device_id,
            "state": e.status.state.as_str(),
            "attempts": e.status.attempts,
            "error": e.status.error,
            "updated_at_ms": e.status.updated_at_ms,
            "readings": e.status.readings,
        });
        out.extend_from_slice(line.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

/// CSV rows of `entries` (after a `header` row when one is given).
fn render_csv(
    entries: &[DeviceEntry],
    header: &[&str],
    metrics: &[String],
) -> Result<Vec<u8>, StoreError> {
    let mut w = csv::Writer::from_writer(Vec::new());
    if !header.is_empty() {
        w.write_record(header).map_err(csv_error)?;
    }
    for e in entries {
        let mut row = vec![
            e.device_id.clone(),
            e.status.state.as_str().to_owned(),
            e.status.attempts.to_string(),
            e.status.error.clone().unwrap_or_default(),
            e.status.updated_at_ms.to_string(),
        ];
        row.extend(metrics.iter().map(|m| {
            e.status
                .readings
                .as_ref()
                .and_then(|r| r.get(m))
                .map(f64::to_string)
                .unwrap_or_default()
        }));
        w.write_record(&row).map_err(csv_error)?;
    }
    w.into_inner().map_err(|e| csv_error(e.into_error().into()))
}

fn csv_error(e: csv::Error) -> StoreError {
    StoreError::Corrupt {
        key: "(CSV export)".into(),
        problem: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_use_nearest_rank_percentiles() {
        let s = summarize((1..=100).map(f64::from).collect()).expect("values");
        assert_eq!(s.count, 100);
        assert_eq!((s.min, s.max), (1.0, 100.0));
        assert_eq!(s.mean, 50.5);
        assert_eq!((s.p50, s.p95), (50.0, 95.0));
        let one = summarize(vec![7.5]).expect("one");
        assert_eq!((one.p50, one.p95, one.mean), (7.5, 7.5, 7.5));
        assert!(summarize(vec![f64::NAN]).is_none());
        assert!(summarize(vec![]).is_none());
    }

    #[test]
    fn histograms_count_every_value_once_in_equal_widths() {
        // 1..=100: ten values per tenth, the maximum in the last bucket.
        let s = summarize((1..=100).map(f64::from).collect()).expect("values");
        assert_eq!(s.histogram, vec![10; BUCKETS]);
        let skewed = summarize(vec![0.0, 0.0, 0.0, 1.0, 10.0]).expect("values");
        assert_eq!(skewed.histogram, vec![3, 1, 0, 0, 0, 0, 0, 0, 0, 1]);
        let same = summarize(vec![4.0; 3]).expect("values");
        assert_eq!(same.histogram.iter().sum::<u64>(), 3);
        assert_eq!(same.histogram[0], 3);
    }
}
