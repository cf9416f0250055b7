//! Reading and cancelling jobs, for the API.
//!
//! Owns the views served to users: a job's state and counters, the job list, per-device
//! status pages with a state filter. Cancelling flips the job to
//! CANCELING (only from IN_PROGRESS, atomically) and tells the workers at once over the
//! control exchange. It never records device outcomes.

use redis::{AsyncCommands, Script};
use serde::Serialize;
use shared::redis_conn::RedisConn;
use shared::{
    amqp::Publisher,
    messages::ControlMessage,
    now_ms,
    state::{DeviceStatus, ExecutionState, JobState},
    store::{self, JobRecord, StoreError},
    topology::Names,
};
use uuid::Uuid;

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
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
    /// Who created it: a token's subject, `schedule:{id}` or `job:{id}`.
    pub created_by: String,
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
    /// Terminal counts: installed but reported unhealthy or silent within the health window.
    pub unhealthy: u64,
    /// Terminal counts: installed but the device rolled itself back.
    pub rolled_back: u64,
    /// Terminal counts.
    pub canceled: u64,
    /// Terminal counts.
    pub skipped: u64,
    /// Devices not terminal yet.
    pub pending: u64,
    /// Of those, devices waiting without a worker: outside their maintenance window, for
    /// their device to come online, or held by a pause (`WAITING_FOR_WINDOW`,
    /// `WAITING_FOR_DEVICE`). Read for a single job, 0 in lists.
    pub waiting: u64,
    /// Why the job is PAUSED, ABORTING or ABORTED (or was last paused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<String>,
    /// Where a rollout with waves stands, wave by wave.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutView>,
    /// The job document.
    #[schema(value_type = Object)]
    pub spec: shared::job::JobSpec,
}

/// A rollout with waves, as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RolloutView {
    /// The planner's phase and wave.
    #[serde(flatten)]
    pub phase: store::RolloutPhase,
    /// Every wave with its size and counters.
    pub waves: Vec<store::WaveProgress>,
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
            created_by: r.created_by.clone(),
            finished_at_ms: r.finished_at_ms,
            targeted: r.planned,
            planning_done: r.planning_done,
            terminal: r.terminal(),
            succeeded: c(ExecutionState::Succeeded),
            failed: c(ExecutionState::Failed),
            rejected: c(ExecutionState::Rejected),
            timed_out: c(ExecutionState::TimedOut),
            unhealthy: c(ExecutionState::Unhealthy),
            rolled_back: c(ExecutionState::RolledBack),
            canceled: c(ExecutionState::Canceled),
            skipped: c(ExecutionState::Skipped),
            pending: r.planned.saturating_sub(r.terminal()),
            waiting: 0,
            state_reason: r.state_reason,
            rollout: None,
            spec: r.spec,
        }
    }
}

/// Reads one job.
///
/// # Errors
/// Redis errors or a corrupt record.
pub async fn get(
    redis: &mut RedisConn,
    names: &Names,
    id: Uuid,
) -> Result<Option<JobView>, StoreError> {
    let Some(record) = store::load_job(redis, names, id).await? else {
        return Ok(None);
    };
    let waves = store::load_waves(redis, names, &record).await?;
    let phase = record.rollout.clone();
    let mut view = JobView::from(record);
    view.waiting = shared::parking::parked_of_job(redis, names, id).await?;
    if !waves.is_empty() {
        view.rollout = Some(RolloutView { phase, waves });
    }
    Ok(Some(view))
}

/// A page of jobs, newest first.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
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
    redis: &mut RedisConn,
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

/// A device's part in one job, for its history.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeviceHistoryEntry {
    /// The job.
    pub job_id: Uuid,
    /// Its name.
    pub name: Option<String>,
    /// Its state.
    pub job_state: JobState,
    /// Its action kind.
    pub action: String,
    /// When it was created (ms).
    pub created_at_ms: u64,
    /// The device's status in it (state, attempts, last error, readings).
    #[serde(flatten)]
    pub status: DeviceStatus,
}

/// Device `device`'s status in each of the newest `jobs` jobs that reached it, newest
/// first (jobs whose planner has not reached the device yet are not listed).
///
/// # Errors
/// Redis errors.
pub async fn device_history(
    redis: &mut RedisConn,
    names: &Names,
    device: &str,
    jobs: usize,
) -> Result<Vec<DeviceHistoryEntry>, StoreError> {
    let ids: Vec<String> = redis
        .zrevrange(names.jobs(), 0, jobs.saturating_sub(1) as isize)
        .await?;
    let ids: Vec<Uuid> = ids.iter().filter_map(|i| i.parse().ok()).collect();
    let mut pipe = redis::pipe();
    for id in &ids {
        pipe.hget(names.job_status(*id), device);
    }
    let raw: Vec<Option<String>> = pipe.query_async(redis).await?;
    let mut history = Vec::new();
    for (id, raw) in ids.into_iter().zip(raw) {
        let Some(status) = raw.and_then(|r| serde_json::from_str::<DeviceStatus>(&r).ok()) else {
            continue;
        };
        if let Some(job) = store::load_job(redis, names, id).await? {
            history.push(DeviceHistoryEntry {
                job_id: id,
                name: job.spec.name.clone(),
                job_state: job.state,
                action: job.spec.action.kind().to_owned(),
                created_at_ms: job.created_at_ms,
                status,
            });
        }
    }
    Ok(history)
}

/// One device's status in a listing.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeviceEntry {
    /// Device id.
    pub device_id: String,
    /// Its status.
    #[serde(flatten)]
    pub status: DeviceStatus,
}

/// A page of device statuses.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
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
    redis: &mut RedisConn,
    names: &Names,
    id: Uuid,
    state: Option<ExecutionState>,
    cursor: Option<DeviceCursor>,
    limit: usize,
) -> Result<DevicePage, StoreError> {
    let DeviceCursor {
        mut scan,
        mut after,
    } = cursor.unwrap_or_default();
    let limit = limit.clamp(1, 10_000);
    let mut devices = Vec::new();
    // SCAN steps may come back short (even empty) with more to follow, or longer than asked
    // (a small hash comes back whole): keep scanning until the page is full or the scan is
    // complete, and cut a long step at the limit, resuming inside it by device id.
    let next_cursor = loop {
        let (next, pairs) = scan_statuses(redis, names, id, state, scan, limit).await?;
        let mut step: Vec<DeviceEntry> = pairs
            .into_iter()
            .filter(|(device_id, _)| after.as_ref().is_none_or(|a| device_id > a))
            .filter_map(|(device_id, json)| {
                let status: DeviceStatus = serde_json::from_str(&json).ok()?;
                Some(DeviceEntry { device_id, status })
            })
            .filter(|e| state.is_none_or(|s| e.status.state == s))
            .collect();
        step.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        let room = limit - devices.len();
        if step.len() > room {
            step.truncate(room);
            let last = step.last().map(|e| e.device_id.clone());
            devices.extend(step);
            break Some(DeviceCursor { scan, after: last });
        }
        devices.extend(step);
        (scan, after) = (next, None);
        if scan == 0 {
            break None;
        }
        if devices.len() >= limit {
            break Some(DeviceCursor { scan, after: None });
        }
    };
    devices.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    Ok(DevicePage {
        devices,
        next_cursor: next_cursor.map(|c| c.to_string()),
    })
}

/// Where a listing of a job's devices resumes: a SCAN cursor, and within the SCAN step at
/// it, the device id the previous page ended on. Written `scan` or `scan:device`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceCursor {
    scan: u64,
    after: Option<String>,
}

impl std::str::FromStr for DeviceCursor {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let (scan, after) = match s.split_once(':') {
            Some((scan, device)) if shared::device::validate_id(device).is_ok() => {
                (scan, Some(device.to_owned()))
            }
            Some(_) => return Err(()),
            None => (s, None),
        };
        Ok(Self {
            scan: scan.parse().map_err(|_| ())?,
            after,
        })
    }
}

impl std::fmt::Display for DeviceCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.after {
            Some(device) => write!(f, "{}:{device}", self.scan),
            None => write!(f, "{}", self.scan),
        }
    }
}

/// One SCAN step over a job's statuses: the per-state set for terminal states, the status
/// hash otherwise. Returns the next cursor and (device, status JSON) pairs.
async fn scan_statuses(
    redis: &mut RedisConn,
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
    #[error("job {id} is {state}; only SCHEDULED, IN_PROGRESS or PAUSED jobs can be canceled")]
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
    redis: &mut RedisConn,
    publisher: &Publisher,
    names: &Names,
    id: Uuid,
) -> Result<(), CancelError> {
    let script = Script::new(
        r"
local s = redis.call('HGET', KEYS[1], 'state')
if not s then return 'MISSING' end
if s ~= 'IN_PROGRESS' and s ~= 'PAUSED' and s ~= 'SCHEDULED' then return s end
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
    crate::steer::tell_workers(
        publisher,
        names,
        id,
        ControlMessage::JobCanceled { job_id: id },
    )
    .await?;
    crate::steer::wake(redis, names, id).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pages_never_exceed_their_limit_and_together_list_every_device_once() {
        let mut redis = shared::store::connect(&shared::config::RedisSettings::for_tests(), "")
            .await
            .expect("redis");
        let names = Names::new(&format!("u{}", Uuid::new_v4().simple()));
        let id = Uuid::now_v7();
        // Five small statuses: Redis keeps the hash compact and returns it whole from one
        // HSCAN step, whatever COUNT says.
        let all: Vec<String> = (0..5).map(|i| format!("dev-{i}")).collect();
        for d in &all {
            let () = redis
                .hset(
                    names.job_status(id),
                    d,
                    r#"{"state":"SUCCEEDED","updated_at_ms":1}"#,
                )
                .await
                .expect("hset");
        }
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = devices(&mut redis, &names, id, None, cursor, 2)
                .await
                .expect("page");
            assert!(page.devices.len() <= 2, "{page:?}");
            seen.extend(page.devices.into_iter().map(|e| e.device_id));
            match page.next_cursor {
                Some(c) => cursor = Some(c.parse().expect("a cursor the API takes back")),
                None => break,
            }
        }
        let () = redis.del(names.job_status(id)).await.expect("del");
        seen.sort();
        assert_eq!(seen, all);
    }

    #[test]
    fn cursors_read_back_as_written_and_refuse_what_no_page_produces() {
        for c in ["0", "17", "17:dev-0001"] {
            let parsed: DeviceCursor = c.parse().expect(c);
            assert_eq!(parsed.to_string(), c);
        }
        for c in ["", "x", "17:", "17:a b", "-1", "17:dev:1"] {
            assert!(c.parse::<DeviceCursor>().is_err(), "{c:?}");
        }
    }
}
