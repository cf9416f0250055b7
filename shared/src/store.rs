//! Redis: the connection, the job record both sides read, and the atomic scripts that change
//! a device's execution state.
//!
//! Owns the layout of a job in Redis (see [`crate::topology::Names`] for key names) and the
//! rule that makes counters exact: a device's first terminal outcome is recorded, and the
//! counters incremented, in one Lua script, so no crash or duplicate result can count a
//! device twice or leave a count behind its status. It never decides outcomes.

use std::collections::{BTreeMap, HashMap};

use redis::{AsyncCommands, Script, aio::ConnectionManager};
use serde::Serialize;
use uuid::Uuid;

pub use crate::redis_conn::RedisConn;
use crate::{
    config::RedisSettings,
    job::JobSpec,
    state::{DeviceStatus, ExecutionState, JobState},
    topology::Names,
};

/// Errors reading or writing Redis.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis is unreachable or returned an error.
    #[error("redis operation failed")]
    Redis(#[from] redis::RedisError),
    /// A stored record does not parse.
    #[error("stored record {key} is corrupt: {problem}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong.
        problem: String,
    },
}

impl StoreError {
    /// Whether retrying later may succeed (connection trouble rather than bad data).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Redis(e) => {
                e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_timeout()
                    || e.is_connection_refusal()
            }
            StoreError::Corrupt { .. } => false,
        }
    }
}

/// Connects to one node with a [`ConnectionManager`], which multiplexes every caller over one
/// connection and reconnects on its own after Redis restarts; or, with
/// `redis.cluster_urls`, to a Redis Cluster. `home` is a key in the deployment's hash slot
/// ([`Names::key_prefix`]): keyless commands (`SCAN`, `INFO`) are sent to its master.
///
/// # Errors
/// Bad URL or Redis unreachable.
pub async fn connect(settings: &RedisSettings, home: &str) -> Result<RedisConn, StoreError> {
    let timeout = std::time::Duration::from_millis(settings.response_timeout_ms.max(1));
    if !settings.cluster_urls.is_empty() {
        let mut builder = redis::cluster::ClusterClientBuilder::new(settings.cluster_urls.clone())
            .retries(8)
            .max_retry_wait(2_000)
            .connection_timeout(std::time::Duration::from_secs(5))
            .response_timeout(timeout);
        if let Some(certs) = certificates(settings)? {
            builder = builder.certs(certs);
        }
        let conn = builder.build()?.get_async_connection().await?;
        return Ok(RedisConn::Cluster {
            conn,
            home: home.into(),
        });
    }
    let client = client(settings)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_number_of_retries(6)
        .set_max_delay(std::time::Duration::from_secs(2))
        .set_connection_timeout(Some(std::time::Duration::from_secs(5)))
        .set_response_timeout(Some(timeout));
    Ok(RedisConn::Node(
        ConnectionManager::new_with_config(client, config).await?,
    ))
}

/// The TLS files the settings name, if any.
fn certificates(settings: &RedisSettings) -> Result<Option<redis::TlsCertificates>, StoreError> {
    let read = |path: &std::path::Path, field: &str| {
        std::fs::read(path).map_err(|e| {
            redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "cannot read a TLS file",
                format!("redis.{field} {}: {e}", path.display()),
            ))
        })
    };
    let root_cert = settings
        .ca_file
        .as_deref()
        .map(|p| read(p, "ca_file"))
        .transpose()?;
    let client_tls = match (&settings.client_cert_file, &settings.client_key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read(cert, "client_cert_file")?,
            client_key: read(key, "client_key_file")?,
        }),
        (None, None) => None,
        _ => {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "redis.client_cert_file and redis.client_key_file go together",
            ))
            .into());
        }
    };
    if root_cert.is_none() && client_tls.is_none() {
        return Ok(None);
    }
    Ok(Some(redis::TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// The client the settings describe: a `rediss://` URL with a CA file or client
/// certificate gets them; any other URL is opened as it is.
fn client(settings: &RedisSettings) -> Result<redis::Client, StoreError> {
    match certificates(settings)? {
        None => Ok(redis::Client::open(settings.url.as_str())?),
        Some(certs) => Ok(redis::Client::build_with_tls(settings.url.as_str(), certs)?),
    }
}

/// Deletes every key matching `pattern` (e.g. `<namespace>:*`), scanning in batches so a
/// large keyspace never blocks Redis. Returns how many keys were deleted.
///
/// # Errors
/// Redis errors.
pub async fn delete_matching(conn: &mut RedisConn, pattern: &str) -> Result<u64, StoreError> {
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        if !keys.is_empty() {
            let n: u64 = redis::cmd("UNLINK").arg(&keys).query_async(conn).await?;
            deleted += n;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// A job as stored.
#[derive(Debug, Clone, Serialize)]
pub struct JobRecord {
    /// Job id.
    pub id: Uuid,
    /// The validated spec.
    pub spec: JobSpec,
    /// Lifecycle state.
    pub state: JobState,
    /// Creation time (ms).
    pub created_at_ms: u64,
    /// Who created it (empty for jobs stored before this was recorded).
    pub created_by: String,
    /// When the job reached COMPLETED or CANCELED (ms).
    pub finished_at_ms: Option<u64>,
    /// Devices targeted so far (all of them once `planning_done`).
    pub planned: u64,
    /// Whether the planner has gone through every target.
    pub planning_done: bool,
    /// Counters per execution state, plus `terminal`.
    pub counts: BTreeMap<String, u64>,
    /// The signed job document, when the deployment signs documents.
    pub signed: Option<crate::signing::SignedDocument>,
    /// Why the job is PAUSED, ABORTING or ABORTED (or was last paused).
    pub state_reason: Option<String>,
    /// Where a rollout with waves stands.
    pub rollout: RolloutPhase,
}

/// Where a rollout with waves stands, as the planner records it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct RolloutPhase {
    /// `splitting` (assigning devices to waves), `publishing`, `gate` (waiting for the
    /// wave's gate), `soak`, `approval`, `done`; empty before planning starts.
    pub phase: String,
    /// The wave being published or judged (from 0).
    pub wave: Option<u64>,
    /// The highest wave whose gate an operator released (approve, or resume after a
    /// failed gate).
    pub released: Option<u64>,
}

impl JobRecord {
    /// Count of one state.
    pub fn count(&self, state: ExecutionState) -> u64 {
        self.counts.get(state.counter()).copied().unwrap_or(0)
    }
    /// Devices in a terminal state.
    pub fn terminal(&self) -> u64 {
        self.counts.get("terminal").copied().unwrap_or(0)
    }
    /// Finished devices by outcome, as gates and abort criteria judge them.
    pub fn tally(&self) -> crate::rollout::Tally {
        tally_of(&self.counts)
    }
    /// When devices not finished by then end TIMED_OUT.
    pub fn deadline_ms(&self) -> Option<u64> {
        self.spec
            .retry
            .deadline_secs
            .map(|s| self.created_at_ms + s * 1000)
    }
}

/// Finished devices by outcome from a counters hash (a job's or a wave's).
pub fn tally_of<'a>(
    counts: impl IntoIterator<Item = (&'a String, &'a u64)>,
) -> crate::rollout::Tally {
    let counts: HashMap<&str, u64> = counts.into_iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let c = |s: ExecutionState| counts.get(s.counter()).copied().unwrap_or(0);
    crate::rollout::Tally {
        succeeded: c(ExecutionState::Succeeded),
        failed: c(ExecutionState::Failed),
        rejected: c(ExecutionState::Rejected),
        timed_out: c(ExecutionState::TimedOut),
        unhealthy: c(ExecutionState::Unhealthy) + c(ExecutionState::RolledBack),
        canceled: c(ExecutionState::Canceled),
    }
}

/// One wave of a job, as reports show it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct WaveProgress {
    /// Index, from 0.
    pub index: usize,
    /// Name.
    pub name: String,
    /// Devices assigned to it (0 until the planner has split the targets).
    pub size: u64,
    /// Counters per execution state, plus `terminal`.
    pub counts: BTreeMap<String, u64>,
}

/// Every wave of a job with its size and counters (empty for a job without waves).
///
/// # Errors
/// Redis errors.
pub async fn load_waves(
    conn: &mut RedisConn,
    names: &Names,
    job: &JobRecord,
) -> Result<Vec<WaveProgress>, StoreError> {
    let waves = &job.spec.rollout.waves;
    if waves.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for i in 0..waves.len() {
        pipe.zcard(names.job_wave(job.id, i));
    }
    let sizes: Vec<u64> = pipe.query_async(conn).await?;
    let all: HashMap<String, u64> = conn.hgetall(names.job_wave_counts(job.id)).await?;
    Ok(sizes
        .into_iter()
        .enumerate()
        .map(|(i, size)| WaveProgress {
            index: i,
            name: waves[i].label(i),
            size,
            counts: wave_counts(&all, i).into_iter().collect(),
        })
        .collect())
}

/// Wave `wave`'s counters out of the job's wave counts hash ([`Names::job_wave_counts`]).
pub fn wave_counts(all: &HashMap<String, u64>, wave: usize) -> HashMap<String, u64> {
    let prefix = format!("{wave}:");
    all.iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?.to_owned(), *v)))
        .collect()
}

/// Reads a job record with its counters. `None` if there is no such job.
///
/// # Errors
/// Redis errors or a corrupt record.
pub async fn load_job(
    conn: &mut RedisConn,
    names: &Names,
    id: Uuid,
) -> Result<Option<JobRecord>, StoreError> {
    let key = names.job(id);
    let (fields, counts): (HashMap<String, String>, HashMap<String, u64>) = redis::pipe()
        .hgetall(&key)
        .hgetall(names.job_counts(id))
        .query_async(conn)
        .await?;
    if fields.is_empty() {
        return Ok(None);
    }
    let corrupt = |problem: String| StoreError::Corrupt {
        key: key.clone(),
        problem,
    };
    let spec: JobSpec = serde_json::from_str(fields.get("spec").map(String::as_str).unwrap_or(""))
        .map_err(|e| corrupt(format!("spec: {e}")))?;
    let state = fields
        .get("state")
        .and_then(|s| JobState::parse(s))
        .ok_or_else(|| corrupt("state missing or unknown".into()))?;
    let num = |f: &str| fields.get(f).and_then(|v| v.parse::<u64>().ok());
    Ok(Some(JobRecord {
        id,
        spec,
        state,
        created_at_ms: num("created_at_ms").unwrap_or(0),
        created_by: fields.get("created_by").cloned().unwrap_or_default(),
        finished_at_ms: num("finished_at_ms"),
        planned: num("planned").unwrap_or(0),
        planning_done: num("planning_done") == Some(1),
        state_reason: fields
            .get("state_reason")
            .filter(|s| !s.is_empty())
            .cloned(),
        rollout: RolloutPhase {
            phase: fields.get("phase").cloned().unwrap_or_default(),
            wave: num("wave"),
            released: num("released_wave"),
        },
        counts: counts.into_iter().collect(),
        signed: match fields.get("signed").filter(|s| !s.is_empty()) {
            Some(raw) => {
                Some(serde_json::from_str(raw).map_err(|e| corrupt(format!("signed: {e}")))?)
            }
            None => None,
        },
    }))
}

/// Reads just a job's state (the worker's liveness check).
///
/// # Errors
/// Redis errors.
pub async fn load_job_state(
    conn: &mut RedisConn,
    names: &Names,
    id: Uuid,
) -> Result<Option<JobState>, StoreError> {
    let state: Option<String> = conn.hget(names.job(id), "state").await?;
    Ok(state.as_deref().and_then(JobState::parse))
}

// Shared by the scripts below: when planning is done and every planned device is terminal,
// move the job to its final state exactly once. Expects `terminal` to hold the terminal count
// and KEYS[1] (job), KEYS[5] (active set), ARGV[5] (now), ARGV[6] (job id).
const FINISH_IF_DONE_LUA: &str = r#"
local function finish_if_done(terminal)
  local j = redis.call('HMGET', KEYS[1], 'planning_done', 'planned', 'state')
  local finals = {IN_PROGRESS = 'COMPLETED', PAUSED = 'COMPLETED', CANCELING = 'CANCELED', ABORTING = 'ABORTED'}
  local final = finals[j[3] or '']
  if j[1] == '1' and tonumber(j[2]) == terminal and final then
    redis.call('HSET', KEYS[1], 'state', final, 'finished_at_ms', ARGV[5], 'updated_at_ms', ARGV[5])
    redis.call('SREM', KEYS[5], ARGV[6])
    return 2
  end
  return 1
end
"#;

/// Lua helpers over a device's status JSON, for scripts that check or update it:
/// `is_terminal(raw)` (false for a missing or unreadable status) and `attempts_of(raw)`.
/// Statuses are serialized with `state` first and `attempts` second, so both are read by
/// pattern, without decoding the document; anything else is decoded.
pub const STATUS_LUA: &str = r#"
local function state_of(raw)
  local st = string.match(raw, '^{"state":"([A-Z_]+)"')
  if st then return st end
  local ok, doc = pcall(cjson.decode, raw)
  if ok and type(doc) == 'table' and type(doc['state']) == 'string' then return doc['state'] end
  return nil
end
local function is_terminal(raw)
  if not raw then return false end
  local st = state_of(raw)
  if not st then return false end
  return st ~= 'QUEUED' and st ~= 'IN_PROGRESS' and st ~= 'RETRY_SCHEDULED' and st ~= 'VERIFYING'
    and st ~= 'WAITING_FOR_WINDOW' and st ~= 'WAITING_FOR_DEVICE'
end
local function attempts_of(raw)
  if not raw then return 0 end
  return tonumber(string.match(raw, '"attempts":(%d+)')) or 0
end
"#;

/// `record_terminal`, for several devices of one job in one call: KEYS job, counts, status,
/// active, wave-of, parked due, wave counts, then five a device: its state set, device
/// record, device lane, parked tasks and idempotency record; ARGV now, job-id, `1` for
/// devices' results (each device must already have a status: only targets have one), then
/// four a device: device, counter, status-json, state. For each device only the first
/// terminal outcome counts; with a device's result the worker's saved result (`d:...`) is
/// removed, as the recorded status now answers every copy of the task. A
/// device with a wave counts in its wave's counters too; a device that SUCCEEDED at a
/// firmware job (`sets_firmware` on the job) runs that version from then on. The job leaves
/// the device's lane; if another job waits there, the device's parked tasks are due now. When
/// planning is done and every planned device is terminal the job moves to its final state,
/// once. Returns a code a device, in order: -1 (no such job), -2 (not a target), 0 (already
/// terminal: ignored), 1 (recorded), 2 (recorded, and the job is now finished).
fn record_terminal_script() -> Script {
    Script::new(&format!(
        r#"{STATUS_LUA}
local n = (#ARGV - 3) / 4
local codes = {{}}
if redis.call('EXISTS', KEYS[1]) == 0 then
  for i = 1, n do codes[i] = -1 end
  return codes
end
local j = redis.call('HMGET', KEYS[1], 'planning_done', 'planned', 'state', 'sets_firmware')
local finals = {{IN_PROGRESS = 'COMPLETED', PAUSED = 'COMPLETED', CANCELING = 'CANCELED', ABORTING = 'ABORTED'}}
local final = finals[j[3] or '']
local planned = tonumber(j[2])
local fw = j[4]
-- Counters are summed here and written once a call; the job's terminal count is kept
-- current for the completion check.
local waved = redis.call('EXISTS', KEYS[5]) == 1
local terminal = tonumber(redis.call('HGET', KEYS[2], 'terminal')) or 0
local counts, wave_counts = {{}}, {{}}
local function add(t, field) t[field] = (t[field] or 0) + 1 end
for i = 1, n do
  local a, k = 3 + (i - 1) * 4, 7 + (i - 1) * 5
  local device, counter, status, state = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local raw = redis.call('HGET', KEYS[3], device)
  if ARGV[3] == '1' and raw then
    local saved = redis.call('GET', KEYS[k + 5])
    if saved and string.sub(saved, 1, 2) == 'd:' then redis.call('DEL', KEYS[k + 5]) end
  end
  if ARGV[3] == '1' and not raw then
    codes[i] = -2
  elseif is_terminal(raw) then
    codes[i] = 0
  else
    redis.call('HSET', KEYS[3], device, status)
    redis.call('SADD', KEYS[k + 1], device)
    add(counts, counter)
    local wave = waved and redis.call('HGET', KEYS[5], device)
    if wave then
      add(wave_counts, wave .. ':' .. counter)
      add(wave_counts, wave .. ':terminal')
    end
    if state == 'SUCCEEDED' and fw and fw ~= '' and redis.call('EXISTS', KEYS[k + 2]) == 1 then
      redis.call('HSET', KEYS[k + 2], 'fw', fw)
    end
    if redis.call('ZREM', KEYS[k + 3], ARGV[2]) == 1 and redis.call('EXISTS', KEYS[k + 3]) == 1 then
      for _, id in ipairs(redis.call('SMEMBERS', KEYS[k + 4])) do
        redis.call('ZADD', KEYS[6], 'XX', ARGV[1], id)
      end
    end
    add(counts, 'terminal')
    terminal = terminal + 1
    codes[i] = 1
    if final and j[1] == '1' and planned == terminal then
      redis.call('HSET', KEYS[1], 'state', final, 'finished_at_ms', ARGV[1], 'updated_at_ms', ARGV[1])
      redis.call('SREM', KEYS[4], ARGV[2])
      final = nil
      codes[i] = 2
    end
  end
end
for field, by in pairs(counts) do redis.call('HINCRBY', KEYS[2], field, by) end
for field, by in pairs(wave_counts) do redis.call('HINCRBY', KEYS[7], field, by) end
return codes
"#
    ))
}

/// Devices recorded by one call of the recording script at most, so one call never holds
/// Redis for long.
const RECORD_CHUNK: usize = 200;

/// `finish_planning`: KEYS job, counts, -, -, active; ARGV -, -, planned, -, now, job-id.
fn finish_planning_script() -> Script {
    Script::new(&format!(
        r#"{FINISH_IF_DONE_LUA}
redis.call('HSET', KEYS[1], 'planning_done', '1', 'planned', ARGV[3])
local terminal = tonumber(redis.call('HGET', KEYS[2], 'terminal') or '0')
return finish_if_done(terminal)
"#
    ))
}

/// `record_progress`: KEYS status; ARGV device, status-json. Sets a non-terminal status
/// unless the device is already terminal. Returns 1 if set.
fn record_progress_script() -> Script {
    Script::new(&format!(
        r#"{STATUS_LUA}
if is_terminal(redis.call('HGET', KEYS[1], ARGV[1])) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"#
    ))
}

/// One terminal outcome to record.
#[derive(Debug, Clone)]
pub struct TerminalStatus<'a> {
    /// The job.
    pub job_id: Uuid,
    /// The device.
    pub device_id: &'a str,
    /// What is recorded for it.
    pub status: &'a DeviceStatus,
}

/// What recording a batch of outcomes did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordSummary {
    /// Outcomes counted.
    pub recorded: usize,
    /// Outcomes ignored because the device already had one.
    pub duplicates: usize,
    /// Jobs that reached their final state in this batch.
    pub finished_jobs: Vec<Uuid>,
    /// Whether each outcome (in input order) was counted (false: a duplicate, or an
    /// unknown job).
    pub counted: Vec<bool>,
    /// Indexes (in input order) of outcomes naming a job that does not exist: nothing was
    /// written for them.
    pub unknown_jobs: Vec<usize>,
    /// Indexes of devices' results for a device the job does not target: nothing written.
    pub untargeted: Vec<usize>,
}

/// Who reports an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporter {
    /// The planner (SKIPPED, CANCELED before sending): the device may have no status yet.
    Planner,
    /// A device's result through a worker: counted only for a device the job targets (one
    /// the planner marked QUEUED before its task existed).
    Device,
}

/// The state-changing scripts, loaded once per process.
#[derive(Debug, Clone)]
pub struct Scripts {
    record_terminal: std::sync::Arc<Script>,
    finish_planning: std::sync::Arc<Script>,
    record_progress: std::sync::Arc<Script>,
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}

impl Scripts {
    /// Compiles the scripts (loading happens lazily, and again after a Redis restart).
    pub fn new() -> Self {
        Self {
            record_terminal: std::sync::Arc::new(record_terminal_script()),
            finish_planning: std::sync::Arc::new(finish_planning_script()),
            record_progress: std::sync::Arc::new(record_progress_script()),
        }
    }

    async fn load_all(&self, conn: &mut RedisConn) -> Result<(), StoreError> {
        for s in [
            &self.record_terminal,
            &self.finish_planning,
            &self.record_progress,
        ] {
            s.load_async(conn).await?;
        }
        Ok(())
    }

    /// Records a batch of terminal outcomes in one round trip; for each device only the first
    /// terminal outcome counts. Safe to repeat: a replayed batch changes nothing.
    ///
    /// # Errors
    /// Redis errors; on error nothing or part of the batch was recorded, and replaying the
    /// whole batch is correct.
    pub async fn record_terminal(
        &self,
        conn: &mut RedisConn,
        names: &Names,
        outcomes: &[TerminalStatus<'_>],
        reporter: Reporter,
    ) -> Result<RecordSummary, StoreError> {
        let targets_only = if reporter == Reporter::Device {
            "1"
        } else {
            ""
        };
        if outcomes.is_empty() {
            return Ok(RecordSummary::default());
        }
        let now = crate::now_ms().to_string();
        let mut pipe = redis::pipe();
        // One call per run of consecutive outcomes of the same job (up to RECORD_CHUNK).
        let mut start = 0;
        while start < outcomes.len() {
            let job_id = outcomes[start].job_id;
            let end = outcomes[start..]
                .iter()
                .take(RECORD_CHUNK)
                .position(|o| o.job_id != job_id)
                .map_or((start + RECORD_CHUNK).min(outcomes.len()), |n| start + n);
            let run = &outcomes[start..end];
            pipe.cmd("EVALSHA")
                .arg(self.record_terminal.get_hash())
                .arg(7 + 5 * run.len())
                .arg(names.job(job_id))
                .arg(names.job_counts(job_id))
                .arg(names.job_status(job_id))
                .arg(names.active_jobs())
                .arg(names.job_wave_of(job_id))
                .arg(names.parked_due())
                .arg(names.job_wave_counts(job_id));
            for o in run {
                pipe.arg(names.job_state_set(job_id, o.status.state))
                    .arg(names.device(o.device_id))
                    .arg(names.device_lane(o.device_id))
                    .arg(names.parked_device(o.device_id))
                    .arg(names.idempotency(crate::state::execution_id(job_id, o.device_id)));
            }
            pipe.arg(&now).arg(job_id.to_string()).arg(targets_only);
            for o in run {
                let json = serde_json::to_string(o.status).map_err(|e| StoreError::Corrupt {
                    key: names.job_status(o.job_id),
                    problem: e.to_string(),
                })?;
                pipe.arg(o.device_id)
                    .arg(o.status.state.counter())
                    .arg(json)
                    .arg(o.status.state.as_str());
            }
            start = end;
        }
        let codes: Vec<Vec<i64>> = self.run(conn, &pipe).await?;
        let codes: Vec<i64> = codes.into_iter().flatten().collect();
        if codes.len() != outcomes.len() {
            return Err(StoreError::Corrupt {
                key: names.active_jobs(),
                problem: format!(
                    "the recording script answered {} codes for {} outcomes",
                    codes.len(),
                    outcomes.len()
                ),
            });
        }
        let mut summary = RecordSummary::default();
        for (i, (c, o)) in codes.into_iter().zip(outcomes).enumerate() {
            summary.counted.push(c > 0);
            match c {
                -1 => summary.unknown_jobs.push(i),
                -2 => summary.untargeted.push(i),
                0 => summary.duplicates += 1,
                2 => {
                    summary.recorded += 1;
                    summary.finished_jobs.push(o.job_id);
                }
                _ => summary.recorded += 1,
            }
        }
        Ok(summary)
    }

    /// Marks planning done with its final target count; finishes the job if every device is
    /// already terminal. Returns whether the job finished now.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn finish_planning(
        &self,
        conn: &mut RedisConn,
        names: &Names,
        job_id: Uuid,
        planned: u64,
    ) -> Result<bool, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("EVALSHA")
            .arg(self.finish_planning.get_hash())
            .arg(5)
            .arg(names.job(job_id))
            .arg(names.job_counts(job_id))
            .arg(names.job_status(job_id))
            .arg(names.job_status(job_id))
            .arg(names.active_jobs())
            .arg("")
            .arg("")
            .arg(planned)
            .arg("")
            .arg(crate::now_ms())
            .arg(job_id.to_string());
        let codes: Vec<i64> = self.run(conn, &pipe).await?;
        Ok(codes.first() == Some(&2))
    }

    /// Sets a non-terminal status (e.g. RETRY_SCHEDULED) unless the device already finished.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn record_progress(
        &self,
        conn: &mut RedisConn,
        names: &Names,
        job_id: Uuid,
        device_id: &str,
        status: &DeviceStatus,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(status).map_err(|e| StoreError::Corrupt {
            key: names.job_status(job_id),
            problem: e.to_string(),
        })?;
        let mut pipe = redis::pipe();
        pipe.cmd("EVALSHA")
            .arg(self.record_progress.get_hash())
            .arg(1)
            .arg(names.job_status(job_id))
            .arg(device_id)
            .arg(json);
        let _: Vec<i64> = self.run(conn, &pipe).await?;
        Ok(())
    }

    /// Runs a pipeline of EVALSHA calls, loading the scripts first if Redis lost them (after a
    /// restart). The scripts are idempotent, so re-running the pipeline is safe.
    async fn run<T: redis::FromRedisValue>(
        &self,
        conn: &mut RedisConn,
        pipe: &redis::Pipeline,
    ) -> Result<Vec<T>, StoreError> {
        match pipe.query_async::<Vec<T>>(conn).await {
            Ok(v) => Ok(v),
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.load_all(conn).await?;
                Ok(pipe.query_async(conn).await?)
            }
            Err(e) => Err(e.into()),
        }
    }
}

// ---- the device registry, as workers and planners read it ----

/// The attributes stored per device, in the order [`ATTRIBUTE_FIELDS`] reads them.
pub const ATTRIBUTE_FIELDS: [&str; 5] = ["model", "hw", "fw", "groups", "tags"];

/// Builds a [`Device`] from the fields read in [`ATTRIBUTE_FIELDS`] order.
pub fn from_fields(id: &str, f: &[Option<String>]) -> crate::device::Device {
    let get = |i: usize| f.get(i).cloned().flatten().unwrap_or_default();
    crate::device::Device {
        id: id.to_owned(),
        model: get(0),
        hardware_revision: get(1),
        firmware_version: get(2),
        groups: get(3)
            .split(',')
            .filter(|g| !g.is_empty())
            .map(str::to_owned)
            .collect(),
        tags: serde_json::from_str(&get(4)).unwrap_or_default(),
    }
}

/// Reads the attributes of a batch of devices; `None` for ids not in the registry.
///
/// # Errors
/// Redis errors.
pub async fn read_devices(
    redis: &mut RedisConn,
    names: &crate::topology::Names,
    ids: &[String],
) -> Result<Vec<Option<crate::device::Device>>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.cmd("HMGET")
            .arg(names.device(id))
            .arg(&ATTRIBUTE_FIELDS);
    }
    let rows: Vec<Vec<Option<String>>> = pipe.query_async(redis).await?;
    Ok(ids
        .iter()
        .zip(rows)
        .map(|(id, f)| {
            if f.iter().all(Option::is_none) {
                None
            } else {
                Some(from_fields(id, &f))
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_script_knows_every_non_terminal_state() {
        for st in crate::state::ExecutionState::ALL {
            let named = STATUS_LUA.contains(&format!("st ~= '{}'", st.as_str()));
            assert_eq!(
                named,
                !st.is_terminal(),
                "{st:?} in STATUS_LUA's is_terminal"
            );
        }
    }

    #[test]
    fn connection_trouble_is_transient_and_corrupt_data_is_not() {
        for kind in [
            std::io::ErrorKind::ConnectionRefused,
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::TimedOut,
            // Any other I/O failure is connection trouble too.
            std::io::ErrorKind::UnexpectedEof,
            std::io::ErrorKind::Other,
        ] {
            let e = StoreError::from(redis::RedisError::from(std::io::Error::from(kind)));
            assert!(e.is_transient(), "{kind:?}");
        }
        let corrupt = StoreError::Corrupt {
            key: "k".into(),
            problem: "p".into(),
        };
        assert!(!corrupt.is_transient());
        let refused = redis::RedisError::from((redis::ErrorKind::Parse, "bad reply"));
        assert!(!StoreError::from(refused).is_transient());
    }

    #[test]
    fn a_deadline_counts_from_the_jobs_creation() {
        let mut spec: JobSpec = serde_json::from_value(serde_json::json!({
            "target": {"groups": ["g"]},
            "action": {"type": "reboot"},
        }))
        .expect("spec");
        let record = |spec: JobSpec| JobRecord {
            id: Uuid::nil(),
            spec,
            state: JobState::InProgress,
            created_at_ms: 5_000,
            created_by: String::new(),
            finished_at_ms: None,
            planned: 0,
            planning_done: false,
            counts: BTreeMap::from([("succeeded".to_owned(), 3), ("terminal".to_owned(), 3)]),
            signed: None,
            state_reason: None,
            rollout: RolloutPhase::default(),
        };
        assert_eq!(record(spec.clone()).deadline_ms(), None);
        spec.retry.deadline_secs = Some(7);
        let r = record(spec);
        assert_eq!(r.deadline_ms(), Some(12_000));
        assert_eq!(r.count(ExecutionState::Succeeded), 3);
        assert_eq!(r.count(ExecutionState::Failed), 0);
        assert_eq!(r.terminal(), 3);
    }
}

/// The recording scripts against a real Redis (`FLEETBATCH_TEST_REDIS_URL`, default the local
/// one), each test in a namespace of its own.
#[cfg(test)]
mod redis_tests {
    use super::*;

    struct Fixture {
        conn: RedisConn,
        names: Names,
        scripts: Scripts,
        job: Uuid,
    }

    impl Fixture {
        /// A job IN_PROGRESS (or `state`), planned but not done planning.
        async fn new(state: &str) -> Self {
            let mut conn = connect(&RedisSettings::for_tests(), "")
                .await
                .expect("redis");
            let names = Names::new(&format!("u{}", Uuid::new_v4().simple()));
            let job = Uuid::now_v7();
            let spec = serde_json::json!({
                "target": {"groups": ["g"]},
                "action": {"type": "reboot"},
            });
            let _: () = redis::pipe()
                .hset_multiple(
                    names.job(job),
                    &[
                        ("spec", spec.to_string()),
                        ("state", state.to_owned()),
                        ("created_at_ms", "5".to_owned()),
                    ],
                )
                .sadd(names.active_jobs(), job.to_string())
                .query_async(&mut conn)
                .await
                .expect("job");
            Self {
                conn,
                names,
                scripts: Scripts::new(),
                job,
            }
        }

        fn status(state: ExecutionState, error: Option<&str>) -> DeviceStatus {
            DeviceStatus {
                state,
                attempts: 1,
                error: error.map(str::to_owned),
                updated_at_ms: 1,
                next_attempt_at_ms: None,
                worker: Some("w".into()),
                published_at_ms: None,
                readings: None,
            }
        }

        async fn record(&mut self, outcomes: &[(&str, ExecutionState)]) -> RecordSummary {
            let statuses: Vec<DeviceStatus> = outcomes
                .iter()
                .map(|(_, s)| Self::status(*s, None))
                .collect();
            let terminal: Vec<TerminalStatus<'_>> = outcomes
                .iter()
                .zip(&statuses)
                .map(|((d, _), status)| TerminalStatus {
                    job_id: self.job,
                    device_id: d,
                    status,
                })
                .collect();
            self.scripts
                .record_terminal(&mut self.conn, &self.names, &terminal, Reporter::Planner)
                .await
                .expect("record")
        }

        async fn job(&mut self) -> JobRecord {
            load_job(&mut self.conn, &self.names, self.job)
                .await
                .expect("load")
                .expect("exists")
        }

        async fn status_of(&mut self, device: &str) -> Option<DeviceStatus> {
            let raw: Option<String> = self
                .conn
                .hget(self.names.job_status(self.job), device)
                .await
                .expect("hget");
            raw.map(|r| serde_json::from_str(&r).expect("status json"))
        }

        async fn done(mut self) {
            delete_matching(&mut self.conn, &self.names.key_pattern())
                .await
                .expect("cleanup");
        }
    }

    #[tokio::test]
    async fn the_first_terminal_outcome_is_recorded_and_counted_once() {
        let mut f = Fixture::new("IN_PROGRESS").await;
        let s = f
            .record(&[
                ("d1", ExecutionState::Succeeded),
                ("d2", ExecutionState::Failed),
            ])
            .await;
        assert_eq!((s.recorded, s.duplicates), (2, 0));
        assert_eq!(s.counted, vec![true, true]);
        assert!(s.finished_jobs.is_empty() && s.unknown_jobs.is_empty());
        // A conflicting late outcome and a repeat change nothing.
        let s = f
            .record(&[
                ("d1", ExecutionState::Failed),
                ("d2", ExecutionState::Failed),
            ])
            .await;
        assert_eq!((s.recorded, s.duplicates), (0, 2));
        assert_eq!(s.counted, vec![false, false]);
        let job = f.job().await;
        assert_eq!(job.count(ExecutionState::Succeeded), 1);
        assert_eq!(job.count(ExecutionState::Failed), 1);
        assert_eq!(job.terminal(), 2);
        assert_eq!(
            f.status_of("d1").await.map(|s| s.state),
            Some(ExecutionState::Succeeded)
        );
        let members: Vec<String> = f
            .conn
            .smembers(f.names.job_state_set(f.job, ExecutionState::Succeeded))
            .await
            .expect("set");
        assert_eq!(members, vec!["d1"]);
        f.done().await;
    }

    #[tokio::test]
    async fn scripts_flushed_from_redis_are_loaded_again() {
        let mut f = Fixture::new("IN_PROGRESS").await;
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut f.conn)
            .await
            .expect("flush");
        let s = f.record(&[("d1", ExecutionState::Succeeded)]).await;
        assert_eq!(s.recorded, 1);
        f.done().await;
    }

    #[tokio::test]
    async fn delete_matching_removes_exactly_the_matching_keys() {
        let mut f = Fixture::new("IN_PROGRESS").await;
        let ns = f.names.key_prefix().to_owned();
        let mut pipe = redis::pipe();
        for i in 0..1_500 {
            pipe.set(format!("{ns}:gone:{i}"), 1).ignore();
        }
        pipe.set(format!("{ns}:kept"), 1).ignore();
        let _: () = pipe.query_async(&mut f.conn).await.expect("keys");
        let n = delete_matching(&mut f.conn, &format!("{ns}:gone:*"))
            .await
            .expect("delete");
        assert_eq!(n, 1_500);
        let kept: bool = f.conn.exists(format!("{ns}:kept")).await.expect("exists");
        assert!(kept);
        let left: Vec<String> = f.conn.keys(format!("{ns}:gone:*")).await.expect("keys");
        assert!(left.is_empty());
        f.done().await;
    }

    #[tokio::test]
    async fn progress_never_overwrites_a_terminal_status() {
        let mut f = Fixture::new("IN_PROGRESS").await;
        let parked = Fixture::status(ExecutionState::RetryScheduled, Some("offline"));
        f.scripts
            .record_progress(&mut f.conn, &f.names, f.job, "d1", &parked)
            .await
            .expect("progress");
        assert_eq!(
            f.status_of("d1").await.map(|s| s.state),
            Some(ExecutionState::RetryScheduled)
        );
        let s = f.record(&[("d1", ExecutionState::Succeeded)]).await;
        assert_eq!(
            s.recorded, 1,
            "a non-terminal status does not block the outcome"
        );
        f.scripts
            .record_progress(&mut f.conn, &f.names, f.job, "d1", &parked)
            .await
            .expect("progress");
        assert_eq!(
            f.status_of("d1").await.map(|s| s.state),
            Some(ExecutionState::Succeeded)
        );
        assert_eq!(f.job().await.terminal(), 1);
        f.done().await;
    }

    #[tokio::test]
    async fn a_job_finishes_once_planning_is_done_and_every_planned_device_is_terminal() {
        let mut f = Fixture::new("IN_PROGRESS").await;
        let s = f.record(&[("d1", ExecutionState::Succeeded)]).await;
        assert!(s.finished_jobs.is_empty(), "planning is not done");
        let finished = f
            .scripts
            .finish_planning(&mut f.conn, &f.names, f.job, 2)
            .await
            .expect("finish planning");
        assert!(!finished, "one of two devices is still running");
        assert_eq!(f.job().await.state, JobState::InProgress);
        let s = f.record(&[("d2", ExecutionState::Rejected)]).await;
        assert_eq!(s.finished_jobs, vec![f.job]);
        assert_eq!((s.recorded, s.counted.clone()), (1, vec![true]));
        assert_eq!(
            load_job_state(&mut f.conn, &f.names, f.job)
                .await
                .expect("state"),
            Some(JobState::Completed)
        );
        let job = f.job().await;
        assert_eq!(job.state, JobState::Completed);
        assert!(job.finished_at_ms.is_some());
        assert_eq!((job.planned, job.planning_done), (2, true));
        let active: bool = f
            .conn
            .sismember(f.names.active_jobs(), f.job.to_string())
            .await
            .expect("active");
        assert!(!active, "a finished job is no longer resumed");
        // A late duplicate does not finish it again.
        let s = f.record(&[("d2", ExecutionState::Failed)]).await;
        assert!(s.finished_jobs.is_empty());
        f.done().await;
    }

    #[tokio::test]
    async fn a_canceling_job_ends_canceled_and_planning_done_last_finishes_it_at_once() {
        let mut f = Fixture::new("CANCELING").await;
        f.record(&[("d1", ExecutionState::Canceled)]).await;
        let finished = f
            .scripts
            .finish_planning(&mut f.conn, &f.names, f.job, 1)
            .await
            .expect("finish planning");
        assert!(finished, "every planned device was already terminal");
        assert_eq!(f.job().await.state, JobState::Canceled);
        f.done().await;
    }

    #[tokio::test]
    async fn one_batch_over_several_jobs_answers_in_order_and_finishes_a_job_once() {
        let mut f = Fixture::new("IN_PROGRESS").await;
        let ghost = Uuid::now_v7();
        let _: () = f
            .conn
            .hset_multiple(
                f.names.job(f.job),
                &[("planning_done", "1"), ("planned", "3")],
            )
            .await
            .expect("planned");
        let ok = Fixture::status(ExecutionState::Succeeded, None);
        let failed = Fixture::status(ExecutionState::Failed, Some("boom"));
        let batch = [
            (f.job, "d1", &ok),
            (f.job, "d2", &failed),
            (ghost, "d1", &ok),
            (f.job, "d1", &failed),
            (f.job, "d3", &ok),
            (f.job, "d4", &ok),
        ];
        let outcomes: Vec<TerminalStatus<'_>> = batch
            .iter()
            .map(|(job_id, device_id, status)| TerminalStatus {
                job_id: *job_id,
                device_id,
                status,
            })
            .collect();
        let s = f
            .scripts
            .record_terminal(&mut f.conn, &f.names, &outcomes, Reporter::Planner)
            .await
            .expect("record");
        assert_eq!(s.counted, vec![true, true, false, false, true, true]);
        assert_eq!(s.unknown_jobs, vec![2]);
        assert_eq!((s.recorded, s.duplicates), (4, 1));
        assert_eq!(
            s.finished_jobs,
            vec![f.job],
            "finished at its third device, once"
        );
        let job = f.job().await;
        assert_eq!(job.state, JobState::Completed);
        assert_eq!(
            (
                job.count(ExecutionState::Succeeded),
                job.count(ExecutionState::Failed)
            ),
            (3, 1)
        );
        assert_eq!(
            f.status_of("d1").await.map(|s| s.state),
            Some(ExecutionState::Succeeded),
            "the first outcome of d1 stays"
        );
        f.done().await;
    }

    #[tokio::test]
    async fn a_devices_recorded_result_removes_its_saved_result_but_never_a_claim() {
        let mut f = Fixture::new("IN_PROGRESS").await;
        let running = Fixture::status(ExecutionState::InProgress, None);
        let idem = |d: &str| f.names.idempotency(crate::state::execution_id(f.job, d));
        let (saved, claimed) = (idem("d1"), idem("d2"));
        let _: () = redis::pipe()
            .hset(
                f.names.job_status(f.job),
                "d1",
                serde_json::to_string(&running).expect("json"),
            )
            .hset(
                f.names.job_status(f.job),
                "d2",
                serde_json::to_string(&running).expect("json"),
            )
            .set(&saved, "d:result")
            .set(&claimed, "c:worker-b")
            .query_async(&mut f.conn)
            .await
            .expect("setup");
        let ok = Fixture::status(ExecutionState::Succeeded, None);
        let outcomes = [
            TerminalStatus {
                job_id: f.job,
                device_id: "d1",
                status: &ok,
            },
            TerminalStatus {
                job_id: f.job,
                device_id: "d2",
                status: &ok,
            },
        ];
        let s = f
            .scripts
            .record_terminal(&mut f.conn, &f.names, &outcomes, Reporter::Device)
            .await
            .expect("record");
        assert_eq!(s.recorded, 2);
        let left: (Option<String>, Option<String>) = redis::pipe()
            .get(&saved)
            .get(&claimed)
            .query_async(&mut f.conn)
            .await
            .expect("get");
        assert_eq!(left, (None, Some("c:worker-b".into())));
        let _: () = f.conn.del(&claimed).await.expect("clean");
        f.done().await;
    }

    #[tokio::test]
    async fn an_outcome_for_a_job_that_does_not_exist_writes_nothing() {
        let mut f = Fixture::new("IN_PROGRESS").await;
        let real = f.job;
        f.job = Uuid::now_v7();
        let s = f.record(&[("d1", ExecutionState::Succeeded)]).await;
        assert_eq!(s.unknown_jobs, vec![0]);
        assert_eq!(s.counted, vec![false]);
        assert_eq!((s.recorded, s.duplicates), (0, 0));
        let keys: Vec<String> = f
            .conn
            .keys(format!("{}:job:{}*", f.names.key_prefix(), f.job))
            .await
            .expect("keys");
        assert!(keys.is_empty(), "{keys:?}");
        f.job = real;
        f.done().await;
    }
}
