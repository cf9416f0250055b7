//! Reading and cancelling jobs, for the API.
//!
//! Owns the views served to users: a job's state and counters, the job list, per-device
//! status pages with a state filter. Cancelling flips the job to
//! CANCELING (only from IN_PROGRESS, atomically) and tells the workers at once over the
//! control exchange. It never records device outcomes.

use lapin::types::FieldTable;
use redis::{AsyncCommands, Script, aio::ConnectionManager};
use serde::Serialize;
use shared::{
    amqp::{self, Outgoing, Publisher},
    messages::{self, CONTROL_TYPE, ControlMessage},
    now_ms,
    state::{DeviceStatus, ExecutionState, JobState},
    store::{self, JobRecord, StoreError},
    topology::Names,
};
use uuid::Uuid;

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    /// Id.
    pub job_id: Uuid,
    /// Name.
    pub name: Option<String>,
    /// State.
    pub state: JobState,
    /// Action kind.
    pub action: String,
    /// Creation time (ms).
    pub created_at_ms: u64,
    /// End time (ms).
    pub finished_at_ms: Option<u64>,
    /// Devices targeted so far (final once `planning_done`).
    pub targeted: u64,
    /// Whether every target has been planned.
    pub planning_done: bool,
    /// Devices in a terminal state.
    pub terminal: u64,
    /// Terminal counts.
    pub succeeded: u64,
    /// Terminal counts.
    pub failed: u64,
    /// Terminal counts.
    pub rejected: u64,
    /// Terminal counts.
    pub timed_out: u64,
    /// Terminal counts.
    pub canceled: u64,
    /// Terminal counts.
    pub skipped: u64,
    /// Devices not terminal yet.
    pub pending: u64,
    /// The job document.
    pub spec: shared::job::JobSpec,
}

impl From<JobRecord> for JobView {
    fn from(r: JobRecord) -> Self {
        let c = |s| r.count(s);
        JobView {
            job_id: r.id,
            name: r.spec.name.clone(),
            state: r.state,
            action: r.spec.action.kind().to_owned(),
            created_at_ms: r.created_at_ms,
            finished_at_ms: r.finished_at_ms,
            targeted: r.planned,
            planning_done: r.planning_done,
            terminal: r.terminal(),
            succeeded: c(ExecutionState::Succeeded),
            failed: c(ExecutionState::Failed),
            rejected: c(ExecutionState::Rejected),
            timed_out: c(ExecutionState::TimedOut),
            canceled: c(ExecutionState::Canceled),
            skipped: c(ExecutionState::Skipped),
            pending: r.planned.saturating_sub(r.terminal()),
            spec: r.spec,
        }
    }
}

/// Reads one job.
///
/// # Errors
/// Redis errors or a corrupt record.
pub async fn get(
    redis: &mut ConnectionManager,
    names: &Names,
    id: Uuid,
) -> Result<Option<JobView>, StoreError> {
    Ok(store::load_job(redis, names, id).await?.map(JobView::from))
}

/// A page of jobs, newest first.
#[derive(Debug, Clone, Serialize)]
pub struct JobPage {
    /// The jobs.
    pub jobs: Vec<JobView>,
    /// Where the next page starts (the last job's id), when there may be more.
    pub next_cursor: Option<String>,
}

/// The newest jobs, `limit` of them, starting after job `cursor` when given (ordered by
/// creation time, then id, newest first).
///
/// # Errors
/// Redis errors.
pub async fn list(
    redis: &mut ConnectionManager,
    names: &Names,
    cursor: Option<Uuid>,
    limit: usize,
) -> Result<JobPage, StoreError> {
    let entries: Vec<(String, f64)> = match cursor {
        None => {
            redis
                .zrevrange_withscores(names.jobs(), 0, limit.saturating_sub(1) as isize)
                .await?
        }
        Some(after) => {
            let Some(score): Option<f64> = redis.zscore(names.jobs(), after.to_string()).await?
            else {
                return Ok(JobPage {
                    jobs: Vec::new(),
                    next_cursor: None,
                });
            };
            // Jobs created in the same millisecond share a score and come in reverse id
            // order: skip those up to the cursor.
            let after = after.to_string();
            let page: Vec<(String, f64)> = redis
                .zrevrangebyscore_limit_withscores(
                    names.jobs(),
                    score,
                    "-inf",
                    0,
                    limit as isize + 64,
                )
                .await?;
            page.into_iter()
                .filter(|(id, s)| *s < score || id.as_str() < after.as_str())
                .take(limit)
                .collect()
        }
    };
    let next_cursor = (entries.len() >= limit)
        .then(|| entries.last().map(|(id, _)| id.clone()))
        .flatten();
    let mut jobs = Vec::with_capacity(entries.len());
    for (id, _) in entries {
        if let Ok(id) = Uuid::parse_str(&id)
            && let Some(v) = get(redis, names, id).await?
        {
            jobs.push(v);
        }
    }
    Ok(JobPage { jobs, next_cursor })
}

/// One device's status in a listing.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceEntry {
    /// Device id.
    pub device_id: String,
    /// Its status.
    #[serde(flatten)]
    pub status: DeviceStatus,
}

/// A page of device statuses.
#[derive(Debug, Clone, Serialize)]
pub struct DevicePage {
    /// The entries.
    pub devices: Vec<DeviceEntry>,
    /// Cursor of the next page (`None` at the end).
    pub next_cursor: Option<String>,
}

/// Lists device statuses, optionally only those in `state`, a page at a time.
///
/// # Errors
/// Redis errors.
pub async fn devices(
    redis: &mut ConnectionManager,
    names: &Names,
    id: Uuid,
    state: Option<ExecutionState>,
    cursor: Option<u64>,
    limit: usize,
) -> Result<DevicePage, StoreError> {
    let mut cursor: u64 = cursor.unwrap_or(0);
    let limit = limit.clamp(1, 10_000);
    let mut devices = Vec::new();
    // SCAN pages may come back short (even empty) with more to follow: keep scanning until
    // the page is full or the scan is complete.
    loop {
        let (next, pairs) = scan_statuses(redis, names, id, state, cursor, limit).await?;
        devices.extend(
            pairs
                .into_iter()
                .filter_map(|(device_id, json)| {
                    let status: DeviceStatus = serde_json::from_str(&json).ok()?;
                    Some(DeviceEntry { device_id, status })
                })
                .filter(|e| state.is_none_or(|s| e.status.state == s)),
        );
        cursor = next;
        if cursor == 0 || devices.len() >= limit {
            break;
        }
    }
    devices.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    Ok(DevicePage {
        devices,
        next_cursor: (cursor != 0).then(|| cursor.to_string()),
    })
}

/// One SCAN step over a job's statuses: the per-state set for terminal states, the status
/// hash otherwise. Returns the next cursor and (device, status JSON) pairs.
async fn scan_statuses(
    redis: &mut ConnectionManager,
    names: &Names,
    id: Uuid,
    state: Option<ExecutionState>,
    cursor: u64,
    count: usize,
) -> Result<(u64, Vec<(String, String)>), StoreError> {
    match state {
        Some(s) if s.is_terminal() => {
            let (next, ids): (u64, Vec<String>) = redis::cmd("SSCAN")
                .arg(names.job_state_set(id, s))
                .arg(cursor)
                .arg("COUNT")
                .arg(count)
                .query_async(redis)
                .await?;
            let values: Vec<Option<String>> = if ids.is_empty() {
                Vec::new()
            } else {
                redis::cmd("HMGET")
                    .arg(names.job_status(id))
                    .arg(&ids)
                    .query_async(redis)
                    .await?
            };
            let pairs = ids
                .into_iter()
                .zip(values)
                .filter_map(|(d, v)| v.map(|v| (d, v)))
                .collect();
            Ok((next, pairs))
        }
        _ => {
            let (next, flat): (u64, Vec<String>) = redis::cmd("HSCAN")
                .arg(names.job_status(id))
                .arg(cursor)
                .arg("COUNT")
                .arg(count)
                .query_async(redis)
                .await?;
            let pairs = flat
                .chunks_exact(2)
                .map(|c| (c[0].clone(), c[1].clone()))
                .collect();
            Ok((next, pairs))
        }
    }
}

/// Why a cancel did nothing.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// No such job.
    #[error("no job {0}")]
    NotFound(Uuid),
    /// The job is already over or being canceled.
    #[error("job {id} is {state}; only IN_PROGRESS jobs can be canceled")]
    NotCancelable {
        /// Job.
        id: Uuid,
        /// Its state.
        state: String,
    },
    /// Redis failed.
    #[error("cannot cancel the job")]
    Store(#[from] StoreError),
    /// The broadcast failed (the cancel still holds; workers notice within their cache TTL).
    #[error("job canceled, but the workers could not be told at once")]
    Broadcast(#[from] shared::amqp::AmqpError),
}

/// Cancels a job: queued and unpublished executions end CANCELED; deliveries already under
/// way finish.
///
/// # Errors
/// See [`CancelError`].
pub async fn cancel(
    redis: &mut ConnectionManager,
    publisher: &Publisher,
    names: &Names,
    id: Uuid,
) -> Result<(), CancelError> {
    let script = Script::new(
        r"
local s = redis.call('HGET', KEYS[1], 'state')
if not s then return 'MISSING' end
if s ~= 'IN_PROGRESS' then return s end
redis.call('HSET', KEYS[1], 'state', 'CANCELING', 'updated_at_ms', ARGV[1], 'canceled_at_ms', ARGV[1])
return 'OK'
",
    );
    let answer: String = script
        .key(names.job(id))
        .arg(now_ms())
        .invoke_async(redis)
        .await
        .map_err(StoreError::from)?;
    match answer.as_str() {
        "OK" => {}
        "MISSING" => return Err(CancelError::NotFound(id)),
        state => {
            return Err(CancelError::NotCancelable {
                id,
                state: state.to_owned(),
            });
        }
    }
    tracing::info!(job_id = %id, "job canceling");
    let payload = messages::encode(&ControlMessage::JobCanceled { job_id: id })
        .map_err(shared::amqp::AmqpError::from)?;
    match publisher
        .publish(Outgoing {
            exchange: &names.control_exchange(),
            routing_key: "",
            payload: &payload,
            properties: amqp::properties(CONTROL_TYPE, &id.to_string(), FieldTable::default()),
        })
        .await
    {
        // No worker is listening: nobody to tell.
        Ok(()) | Err(shared::amqp::AmqpError::Unroutable { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
