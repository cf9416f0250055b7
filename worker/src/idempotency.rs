//! The idempotency record of one execution, in Redis.
//!
//! Owns the key `{ns}:idem:{execution_id}` and its three states, after zero2prod's
//! `try_processing` / `NextAction`:
//! - absent: nobody works on it; [`try_claim`] takes it with `SET NX PX` (a lease, so a claim
//!   left by a worker that died expires and the task is taken over), in the same round trip
//!   marking the device IN_PROGRESS and reading the attempts already recorded for it;
//! - `c:{worker}`: a worker holds the claim;
//! - `d:{result}`: finished; the stored [`TaskResult`] is re-published instead of delivering
//!   again, until the coordinator records the outcome and removes the record: from then on
//!   the device's terminal status answers every copy of the task (nothing is claimed).
//!
//! Between two attempts [`hold`] renews the claim and records the attempts made so far, so
//! whichever copy of the task runs next counts on from there.
//!
//! It never delivers, publishes or acks.

use shared::redis_conn::RedisConn;
use std::{
    sync::{Arc, LazyLock},
    time::Duration,
};

use redis::{AsyncCommands, Script};
use shared::{
    coalesce::{CoalesceError, ScriptBatcher, ScriptItem, script_batcher},
    messages::{self, DeviceTask, TaskResult, WireError},
    state::DeviceStatus,
    store,
    topology::Names,
};
use uuid::Uuid;

/// Errors of the idempotency store.
#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    /// Redis failed.
    #[error("idempotency store unavailable")]
    Redis(#[from] redis::RedisError),
    /// A stored result does not decode.
    #[error("stored result is corrupt")]
    Corrupt(#[from] WireError),
    /// Redis failed under a batched call (its error, shared by the batch's executions).
    #[error("idempotency store unavailable")]
    Batch(#[source] Arc<redis::RedisError>),
    /// The batching task is gone (the process is shutting down).
    #[error("idempotency store unavailable: batching stopped")]
    Stopped,
    /// A status could not be serialized (does not happen for these types).
    #[error("status not serializable")]
    Json(#[from] serde_json::Error),
}

/// What to do with a task, given its idempotency record.
#[derive(Debug, PartialEq)]
pub enum NextAction {
    /// The claim is ours: deliver. Carries the attempts already recorded for the device (by
    /// a holder that parked or handed back the task), which may exceed the task's own count
    /// when its updated copy could not be published.
    StartProcessing {
        /// Attempts recorded in the device's status, 0 if none.
        recorded_attempts: u32,
    },
    /// Already finished: re-publish this result and ack.
    ReturnSavedResult(Box<TaskResult>),
    /// The device's outcome is recorded (its saved result, no longer needed, was removed
    /// then): ack, nothing to publish.
    AlreadyRecorded,
    /// The job does not target the device (the planner marks every target QUEUED before its
    /// task exists): nothing was claimed or written.
    NotTargeted,
    /// Another worker holds the claim (it may be working, or dead until the lease ends).
    HeldByOther {
        /// The holder.
        holder: String,
    },
    /// Another job has the device (ahead in its lane, or already started on it): nothing
    /// was claimed or written; the task waits its turn.
    WaitForTurn {
        /// The job that has the device.
        behind: String,
    },
}

const CLAIM: &str = "c:";
const DONE: &[u8] = b"d:";

/// Claims with `SET NX PX` (or re-takes a claim of ours left by an earlier broker session of
/// this process), and in the same round trip marks the device IN_PROGRESS and reads the
/// attempts already recorded for it, so the count never goes back: a stale copy of the task
/// (a planner's re-published batch) starts from the recorded number, not from its own.
/// `claim(k, a, ids, first)`: KEYS[k..k+2] idempotency, status, device lane; ARGV[a..a+5]
/// claim, lease ms, device, in-progress status JSON, its attempts, the job id (one job at a
/// time per device) or '' (no lane check); the other jobs of the device's lane the caller
/// passed keys for are ARGV[ids..], their keys from KEYS[first] on (as `blocker` reads them).
/// One job at a time per device: an execution waits while a job ahead of it in the device's
/// lane is unfinished (sent to the device or not yet), or any other job of the lane has
/// started on the device. Jobs that finished on the device, ended or vanished leave the lane
/// here.
/// Returns {1, recorded attempts as a string}, {0, the record's value}, {2, ''} for a device
/// whose outcome is already recorded (nothing claimed: the device is never contacted again
/// for the job), {-1, ''} for a
/// device the job does not target (no status: the planner writes QUEUED before publishing),
/// {-2, job} while `job` has the device, or {-3, the lane's jobs joined by ','} when the lane
/// holds a job the caller passed no keys for (nothing was claimed or written: call again
/// with them).
const CLAIM_LUA: &str = r#"
local function claim(k, a, ids, first)
  local current = redis.call('HGET', KEYS[k + 1], ARGV[a + 2])
  if not current then return {-1, ''} end
  if is_terminal(current) then return {2, ''} end
  if ARGV[a + 5] ~= '' then
    local b, unknown = blocker(KEYS[k + 2], ARGV[a + 5], ARGV[a + 2], ids, first)
    if unknown then return {-3, unknown} end
    if b then return {-2, b} end
  end
  local mine = redis.call('SET', KEYS[k], ARGV[a], 'NX', 'PX', ARGV[a + 1])
  if not mine then
    local held = redis.call('GET', KEYS[k])
    if held ~= ARGV[a] then return {0, held or ''} end
    redis.call('PEXPIRE', KEYS[k], ARGV[a + 1])
  end
  local recorded = attempts_of(current)
  local status = ARGV[a + 3]
  if recorded > tonumber(ARGV[a + 4]) then
    status = string.gsub(status, '"attempts":%d+', '"attempts":' .. recorded, 1)
  end
  redis.call('HSET', KEYS[k + 1], ARGV[a + 2], status)
  return {1, tostring(recorded)}
end
"#;

/// One claim, with the keys of the lane's other jobs the caller learnt: `claim` of the first
/// (and only) execution.
const CLAIM_ONE_LUA: &str = "return claim(1, 1, 7, 4)";

/// Claims of several executions in one call: three keys and six arguments each, laid out as
/// for one claim, without keys of other lane jobs (an execution whose lane holds another job
/// answers -3 and is claimed again alone, with them). Returns one answer an execution.
const CLAIM_MANY_LUA: &str = r"
local answers = {}
for i = 0, #KEYS / 3 - 1 do
  answers[i + 1] = claim(1 + 3 * i, 1 + 6 * i, #ARGV + 1, #KEYS + 1)
end
return answers
";

/// `blocker(lane, job, device, ids, first)`: the job that has `device` before `job` (one
/// ahead of it in the device's lane and unfinished there, sent to the device or not yet,
/// unless it has not started at all (SCHEDULED: a job that starts tomorrow keeps its place but
/// holds nothing today), or any other job of the lane already started on it), or nil. Jobs
/// that finished on the device, ended or vanished leave the lane here. The keys of the other
/// jobs are given, never built: job `ARGV[ids + i]` has its record at `KEYS[first + 2i]` and
/// its status hash at `KEYS[first + 2i + 1]`. A lane job without keys makes it return
/// `nil, <the lane's jobs joined by ','>` before it writes anything.
const LANE_LUA: &str = r#"
local function blocker(lane, job, device, ids, first)
  local jobs = redis.call('ZRANGE', lane, 0, 15)
  local known = {}
  local k = first
  for i = ids, #ARGV do
    known[ARGV[i]] = k
    k = k + 2
  end
  for _, j in ipairs(jobs) do
    if j ~= job and not known[j] then return nil, table.concat(jobs, ',') end
  end
  local ahead = true
  for _, j in ipairs(jobs) do
    if j == job then
      ahead = false
    else
      local at = known[j]
      local st = redis.call('HGET', KEYS[at + 1], device)
      if st then
        if is_terminal(st) then
          redis.call('ZREM', lane, j)
        else
          local s = state_of(st)
          if ahead or s == 'IN_PROGRESS' or s == 'RETRY_SCHEDULED' or s == 'VERIFYING' then
            return j
          end
        end
      else
        local js = redis.call('HGET', KEYS[at], 'state')
        if not js or js == 'COMPLETED' or js == 'CANCELED' or js == 'ABORTED' then
          redis.call('ZREM', lane, j)
        elseif ahead and js ~= 'SCHEDULED' then
          return j
        end
      end
    end
  end
  return nil
end
"#;

/// After a task waiting for its turn was parked: if the device is free by now (the job ahead
/// ended between the claim and the park, and its end found nothing to wake), the parked
/// task is due at once. KEYS lane, parked due, then the record and status hash of each job
/// in ARGV[5..]; ARGV job, device, execution, now, then the lane's other jobs. Returns the
/// blocking job, '' when it was made due, or {the lane's jobs} (as in the claim) when keys
/// are missing.
const RECHECK_LUA: &str = r#"
local b, unknown = blocker(KEYS[1], ARGV[1], ARGV[2], 5, 3)
if unknown then return {unknown} end
if b then return b end
redis.call('ZADD', KEYS[2], 'XX', ARGV[4], ARGV[3])
return ''
"#;

/// Between two attempts: if the claim is still ours, renews it and records the device's
/// progress (attempts so far, last error, next attempt time) unless it already finished.
/// KEYS idempotency, status; ARGV claim, lease ms, device, status JSON. Returns 1 or 0.
const HOLD_LUA: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if not is_terminal(redis.call('HGET', KEYS[2], ARGV[3])) then
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
end
return 1
";

/// The scripts, with the status helpers prepended; built (and hashed) once per process.
static CLAIM_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{}{LANE_LUA}{CLAIM_LUA}{CLAIM_ONE_LUA}",
        store::STATUS_LUA
    ))
});
static CLAIM_MANY_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{}{LANE_LUA}{CLAIM_LUA}{CLAIM_MANY_LUA}",
        store::STATUS_LUA
    ))
});
static RECHECK_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{}{LANE_LUA}{RECHECK_LUA}", store::STATUS_LUA)));
static RELEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
    )
});
static HOLD_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{}{HOLD_LUA}", store::STATUS_LUA)));

/// Claims of many executions, merged into one script call per batch while a worker is
/// busy (group commit: [`shared::coalesce`]); cheap to clone. Saved results are not merged:
/// measured, a script saving a batch of them took Redis more CPU than the pipelined `SET`s
/// (each result's bytes are copied into Lua and back) and saved the worker nothing.
#[derive(Debug, Clone)]
pub struct Claims {
    batch: ScriptBatcher<(i64, Vec<u8>)>,
}

impl Claims {
    /// Executions a call serves at most (a call holds Redis for its duration).
    const BATCH: usize = 64;
    /// Batched calls under way at once.
    const IN_FLIGHT: usize = 4;

    /// Starts the batching task on the current runtime.
    pub fn start(redis: RedisConn) -> Self {
        let batch = script_batcher(
            redis,
            Arc::new(CLAIM_MANY_SCRIPT.clone()),
            Self::BATCH,
            Self::IN_FLIGHT,
        );
        Self { batch }
    }
}

/// A batched call's error as the store's.
fn batch_error(e: CoalesceError<Arc<redis::RedisError>>) -> IdempotencyError {
    match e {
        CoalesceError::Failed(e) => IdempotencyError::Batch(e),
        CoalesceError::Stopped => IdempotencyError::Stopped,
    }
}

/// Tries to claim `task`'s execution for `worker`; on success the device's status becomes
/// `in_progress` (its attempts raised to those already recorded). The first try goes through
/// `claims` with other handlers' claims; a device whose lane holds another job is claimed
/// again alone, with that job's keys.
///
/// # Errors
/// Redis errors or a corrupt stored result.
#[allow(clippy::too_many_arguments)]
pub async fn try_claim(
    redis: &mut RedisConn,
    claims: &Claims,
    names: &Names,
    task: &DeviceTask,
    worker: &str,
    lease: Duration,
    in_progress: &DeviceStatus,
    exclusive: bool,
) -> Result<NextAction, IdempotencyError> {
    // One execution's keys and arguments, as the batched script and the single one read them
    // (made again only for a device whose lane holds another job).
    let status = serde_json::to_string(in_progress)?;
    let item = || ScriptItem {
        keys: vec![
            names.idempotency(task.execution_id),
            names.job_status(task.job_id),
            names.device_lane(&task.device_id),
        ],
        args: vec![
            format!("{CLAIM}{worker}").into(),
            lease.as_millis().to_string().into(),
            task.device_id.clone().into(),
            status.clone().into(),
            in_progress.attempts.to_string().into(),
            if exclusive {
                task.job_id.to_string().into()
            } else {
                Vec::new()
            },
        ],
    };
    let mut answer = claims.batch.call(item()).await.map_err(batch_error)?;
    let mut others: Vec<String> = Vec::new();
    loop {
        let (claimed, value) = &answer;
        match lane_to_learn(*claimed, value, task.job_id, &mut others) {
            Some(behind) => return Ok(NextAction::WaitForTurn { behind }),
            None if *claimed == -3 => {}
            None => break,
        }
        let ScriptItem { keys, args } = item();
        let mut call = CLAIM_SCRIPT.prepare_invoke();
        for k in &keys {
            call.key(k);
        }
        for a in &args {
            call.arg(a);
        }
        lane_keys(&mut call, names, &others);
        answer = call.invoke_async(redis).await?;
    }
    next_action(answer)
}

/// What a claim's answer `(code, value)` means (codes as [`CLAIM_LUA`] returns them; -3 is
/// resolved by the caller).
fn next_action((claimed, value): (i64, Vec<u8>)) -> Result<NextAction, IdempotencyError> {
    match claimed {
        -1 => return Ok(NextAction::NotTargeted),
        2 => return Ok(NextAction::AlreadyRecorded),
        -2 => {
            return Ok(NextAction::WaitForTurn {
                behind: String::from_utf8_lossy(&value).into_owned(),
            });
        }
        1 => {
            // A Lua number: "3", or "3.0"-like from a float in a hand-edited status.
            let recorded_attempts = std::str::from_utf8(&value)
                .ok()
                .and_then(|v| v.parse::<f64>().ok())
                .map_or(0, |n| n.max(0.0) as u32);
            return Ok(NextAction::StartProcessing { recorded_attempts });
        }
        _ => {}
    }
    if value.starts_with(DONE) {
        let result = messages::decode_result(&value[DONE.len()..])?;
        return Ok(NextAction::ReturnSavedResult(Box::new(result)));
    }
    let holder = String::from_utf8_lossy(&value)
        .trim_start_matches(CLAIM)
        .to_owned();
    Ok(NextAction::HeldByOther { holder })
}

/// Adds the record and status hash of each of `others` (jobs of a device's lane) to a lane
/// script's keys, and their ids to its arguments.
fn lane_keys(call: &mut redis::ScriptInvocation<'_>, names: &Names, others: &[String]) {
    for j in others {
        let id = Uuid::parse_str(j).unwrap_or_default();
        call.key(names.job(id)).key(names.job_status(id)).arg(j);
    }
}

/// After a lane script answered `code`: on -3 (`value` lists the lane's jobs) learns the jobs
/// to pass keys for into `others` and returns `None` (call again), unless the lane keeps
/// changing under the calls, when the device is taken as busy with the lane's first other
/// job (`Some(job)`: the task waits and is looked at again). Any other code: `None`.
fn lane_to_learn(code: i64, value: &[u8], job: Uuid, others: &mut Vec<String>) -> Option<String> {
    if code != -3 {
        return None;
    }
    let me = job.to_string();
    let lane: Vec<String> = String::from_utf8_lossy(value)
        .split(',')
        .filter(|j| !j.is_empty() && *j != me)
        .map(str::to_owned)
        .collect();
    if lane.iter().all(|j| others.contains(j)) || others.len() > 64 {
        return Some(lane.into_iter().next().unwrap_or_default());
    }
    for j in lane {
        if !others.contains(&j) {
            others.push(j);
        }
    }
    None
}

/// Called once a task that waits for its device's turn is parked: makes it due at once if
/// the device became free meanwhile. Returns whether it is still waiting.
///
/// # Errors
/// Redis errors.
pub async fn recheck_turn(
    redis: &mut RedisConn,
    names: &Names,
    task: &DeviceTask,
) -> Result<bool, IdempotencyError> {
    let mut others: Vec<String> = Vec::new();
    loop {
        let mut call = RECHECK_SCRIPT.key(names.device_lane(&task.device_id));
        call.key(names.parked_due())
            .arg(task.job_id.to_string())
            .arg(&task.device_id)
            .arg(task.execution_id.to_string())
            .arg(shared::now_ms());
        lane_keys(&mut call, names, &others);
        let answer: redis::Value = call.invoke_async(redis).await?;
        if let redis::Value::Array(lane) = &answer {
            let listed: Vec<u8> = lane
                .first()
                .and_then(|v| redis::from_redis_value(v.clone()).ok())
                .unwrap_or_default();
            if lane_to_learn(-3, &listed, task.job_id, &mut others).is_some() {
                return Ok(true);
            }
            continue;
        }
        let blocker: String = redis::from_redis_value(answer).map_err(redis::RedisError::from)?;
        return Ok(!blocker.is_empty());
    }
}

/// Between attempts: renews our claim's lease (to `lease`) and records `progress` as the
/// device's status, if we still hold the claim; `false` if it lapsed and someone else may
/// have taken the execution over (e.g. Redis was down longer than the lease).
///
/// # Errors
/// Redis errors.
pub async fn hold(
    redis: &mut RedisConn,
    names: &Names,
    task: &DeviceTask,
    worker: &str,
    lease: Duration,
    progress: &DeviceStatus,
) -> Result<bool, IdempotencyError> {
    let held: i64 = HOLD_SCRIPT
        .key(names.idempotency(task.execution_id))
        .key(names.job_status(task.job_id))
        .arg(format!("{CLAIM}{worker}"))
        .arg(lease.as_millis() as u64)
        .arg(&task.device_id)
        .arg(serde_json::to_string(progress)?)
        .invoke_async(redis)
        .await?;
    Ok(held == 1)
}

/// Records the final result. From now on every copy of the task re-publishes it.
///
/// # Errors
/// Redis errors.
pub async fn mark_done(
    redis: &mut RedisConn,
    names: &Names,
    result: &TaskResult,
    retention: Duration,
) -> Result<(), IdempotencyError> {
    let mut value = DONE.to_vec();
    value.extend(messages::encode(result)?);
    let _: () = redis
        .set_ex(
            names.idempotency(result.execution_id),
            value,
            retention.as_secs().max(1),
        )
        .await?;
    Ok(())
}

/// Gives up our claim (the task is parked or handed back), so the next copy can be taken at
/// once. Only deletes the record if it is still our claim.
///
/// # Errors
/// Redis errors.
pub async fn release(
    redis: &mut RedisConn,
    names: &Names,
    execution: Uuid,
    worker: &str,
) -> Result<(), IdempotencyError> {
    let _: i64 = RELEASE_SCRIPT
        .key(names.idempotency(execution))
        .arg(format!("{CLAIM}{worker}"))
        .invoke_async(redis)
        .await?;
    Ok(())
}

/// The claim, hold, done and release records against a real Redis
/// (`FLEETBATCH_TEST_REDIS_URL`, default the local one), each test in a namespace of its own.
#[cfg(test)]
mod tests {
    use redis::AsyncCommands;
    use shared::{
        messages::WIRE_VERSION,
        state::{ExecutionState, execution_id},
    };

    use super::*;

    const LEASE: Duration = Duration::from_secs(30);

    async fn setup() -> (RedisConn, Names, DeviceTask) {
        let conn = store::connect(&shared::config::RedisSettings::for_tests(), "")
            .await
            .expect("redis");
        let names = Names::new(&format!("u{}", Uuid::new_v4().simple()));
        let job = Uuid::now_v7();
        let task = DeviceTask {
            version: WIRE_VERSION,
            job_id: job,
            execution_id: execution_id(job, "d1"),
            device_id: "d1".into(),
            attempts: 0,
            parked: 0,
            published_at_ms: 1,
        };
        // The planner marks its target QUEUED before publishing the task.
        let mut c = conn.clone();
        let _: () = c
            .hset(
                names.job_status(job),
                "d1",
                serde_json::to_string(&status(ExecutionState::Queued, 0)).expect("json"),
            )
            .await
            .expect("queued");
        (conn, names, task)
    }

    #[tokio::test]
    async fn a_task_for_a_device_the_job_does_not_target_claims_and_writes_nothing() {
        let (mut conn, names, task) = setup().await;
        let stranger = DeviceTask {
            device_id: "d9".into(),
            execution_id: execution_id(task.job_id, "d9"),
            ..task.clone()
        };
        assert_eq!(
            claim(&mut conn, &names, &stranger, "a").await,
            NextAction::NotTargeted
        );
        let status: Option<String> = conn
            .hget(names.job_status(task.job_id), "d9")
            .await
            .expect("hget");
        assert_eq!(status, None);
        let record: Option<String> = conn
            .get(names.idempotency(stranger.execution_id))
            .await
            .expect("get");
        assert_eq!(record, None, "no claim taken");
        cleanup(conn, &names).await;
    }

    #[tokio::test]
    async fn claims_merged_into_one_call_each_get_their_own_answer() {
        let (mut conn, names, task) = setup().await;
        let of = |device: &str| DeviceTask {
            device_id: device.into(),
            execution_id: execution_id(task.job_id, device),
            ..task.clone()
        };
        // d1 is QUEUED (setup), d2 already SUCCEEDED, d3 QUEUED with 2 attempts recorded,
        // d4 claimed by another worker, d9 not a target.
        let _: () = conn
            .hset_multiple(
                names.job_status(task.job_id),
                &[
                    (
                        "d2",
                        serde_json::to_string(&status(ExecutionState::Succeeded, 1)).expect("json"),
                    ),
                    (
                        "d3",
                        serde_json::to_string(&status(ExecutionState::Queued, 2)).expect("json"),
                    ),
                    (
                        "d4",
                        serde_json::to_string(&status(ExecutionState::Queued, 0)).expect("json"),
                    ),
                ],
            )
            .await
            .expect("statuses");
        let _: () = conn
            .set(names.idempotency(of("d4").execution_id), "c:other")
            .await
            .expect("claim");
        let claims = Claims::start(conn.clone());
        let tasks: Vec<DeviceTask> = ["d1", "d2", "d3", "d4", "d9"].map(of).into();
        let answers = futures::future::join_all(tasks.iter().map(|t| {
            let (claims, names, mut conn) = (claims.clone(), names.clone(), conn.clone());
            async move {
                try_claim(
                    &mut conn,
                    &claims,
                    &names,
                    t,
                    "a",
                    LEASE,
                    &status(ExecutionState::InProgress, 0),
                    true,
                )
                .await
                .expect("claim")
            }
        }))
        .await;
        assert_eq!(
            answers,
            vec![
                NextAction::StartProcessing {
                    recorded_attempts: 0
                },
                NextAction::AlreadyRecorded,
                NextAction::StartProcessing {
                    recorded_attempts: 2
                },
                NextAction::HeldByOther {
                    holder: "other".into()
                },
                NextAction::NotTargeted,
            ]
        );
        // Each claim wrote its own device's record and status, nobody else's.
        assert_eq!(stored(&mut conn, &names, &of("d3")).await.attempts, 2);
        let held: Option<String> = conn
            .get(names.idempotency(of("d3").execution_id))
            .await
            .expect("get");
        assert_eq!(held.as_deref(), Some("c:a"));
        let d2: Option<String> = conn
            .get(names.idempotency(of("d2").execution_id))
            .await
            .expect("get");
        assert_eq!(d2, None);
        cleanup(conn, &names).await;
    }

    fn status(state: ExecutionState, attempts: u32) -> DeviceStatus {
        DeviceStatus {
            state,
            attempts,
            error: None,
            updated_at_ms: 1,
            next_attempt_at_ms: None,
            worker: Some("w".into()),
            published_at_ms: None,
            readings: None,
        }
    }

    async fn stored(conn: &mut RedisConn, names: &Names, task: &DeviceTask) -> DeviceStatus {
        let raw: String = conn
            .hget(names.job_status(task.job_id), &task.device_id)
            .await
            .expect("status");
        serde_json::from_str(&raw).expect("json")
    }

    /// Claims `task` for `worker` with the default lease.
    async fn claim(
        conn: &mut RedisConn,
        names: &Names,
        task: &DeviceTask,
        worker: &str,
    ) -> NextAction {
        try_claim(
            conn,
            &Claims::start(conn.clone()),
            names,
            task,
            worker,
            LEASE,
            &status(ExecutionState::InProgress, 0),
            true,
        )
        .await
        .expect("claim")
    }

    async fn cleanup(mut conn: RedisConn, names: &Names) {
        store::delete_matching(&mut conn, &names.key_pattern())
            .await
            .expect("cleanup");
    }

    #[tokio::test]
    async fn a_device_runs_one_job_at_a_time_in_lane_order_and_never_beside_a_started_one() {
        let (mut conn, names, first) = setup().await;
        // A second job for the same device, behind the first in the device's lane.
        let job = Uuid::now_v7();
        let second = DeviceTask {
            job_id: job,
            execution_id: execution_id(job, "d1"),
            ..first.clone()
        };
        let queued = serde_json::to_string(&status(ExecutionState::Queued, 0)).expect("json");
        let lane = names.device_lane("d1");
        let _: () = redis::pipe()
            .hset(names.job_status(job), "d1", &queued)
            .zadd(&lane, first.job_id.to_string(), 1)
            .zadd(&lane, job.to_string(), 2)
            .query_async(&mut conn)
            .await
            .expect("lane");
        let behind_first = NextAction::WaitForTurn {
            behind: first.job_id.to_string(),
        };

        // The second waits while the first has not even started, and while it runs.
        assert_eq!(claim(&mut conn, &names, &second, "b").await, behind_first);
        assert!(matches!(
            claim(&mut conn, &names, &first, "a").await,
            NextAction::StartProcessing { .. }
        ));
        assert_eq!(claim(&mut conn, &names, &second, "b").await, behind_first);
        // Parked, it is looked at again: still behind the first.
        assert!(
            recheck_turn(&mut conn, &names, &second)
                .await
                .expect("recheck")
        );
        // A job that may run alongside others does not wait.
        assert!(matches!(
            try_claim(
                &mut conn.clone(),
                &Claims::start(conn.clone()),
                &names,
                &second,
                "b",
                LEASE,
                &status(ExecutionState::InProgress, 0),
                false,
            )
            .await
            .expect("claim"),
            NextAction::StartProcessing { .. }
        ));
        let _: () = conn
            .del(names.idempotency(second.execution_id))
            .await
            .expect("del");
        let _: () = conn
            .hset(names.job_status(job), "d1", &queued)
            .await
            .expect("hset");

        // The first one ends: the second goes, and the finished job leaves the lane.
        let done = serde_json::to_string(&status(ExecutionState::Succeeded, 1)).expect("json");
        let _: () = conn
            .hset(names.job_status(first.job_id), "d1", done)
            .await
            .expect("hset");
        assert!(
            !recheck_turn(&mut conn, &names, &second)
                .await
                .expect("recheck")
        );
        assert!(matches!(
            claim(&mut conn, &names, &second, "b").await,
            NextAction::StartProcessing { .. }
        ));
        let left: Vec<String> = conn.zrange(&lane, 0, -1).await.expect("lane");
        assert_eq!(left, vec![job.to_string()]);

        // A job ahead that has not started (SCHEDULED, nothing sent yet) keeps its place
        // without holding the device; once it starts, it does.
        let later = Uuid::now_v7();
        let third = DeviceTask {
            job_id: later,
            execution_id: execution_id(later, "d1"),
            ..first.clone()
        };
        let _: () = redis::pipe()
            .hset(names.job_status(later), "d1", &queued)
            .zadd(&lane, later.to_string(), 3)
            .zadd(&lane, Uuid::nil().to_string(), 0)
            .hset(names.job(Uuid::nil()), "state", "SCHEDULED")
            .query_async(&mut conn)
            .await
            .expect("lane");
        let _: () = conn
            .hset(names.job_status(job), "d1", done_again())
            .await
            .expect("hset");
        assert!(matches!(
            claim(&mut conn, &names, &third, "c").await,
            NextAction::StartProcessing { .. }
        ));
        let _: () = conn
            .del(names.idempotency(third.execution_id))
            .await
            .expect("del");
        let _: () = redis::pipe()
            .hset(names.job_status(later), "d1", &queued)
            .hset(names.job(Uuid::nil()), "state", "IN_PROGRESS")
            .query_async(&mut conn)
            .await
            .expect("start");
        assert_eq!(
            claim(&mut conn, &names, &third, "c").await,
            NextAction::WaitForTurn {
                behind: Uuid::nil().to_string()
            }
        );
        cleanup(conn, &names).await;
    }

    fn done_again() -> String {
        serde_json::to_string(&status(ExecutionState::Succeeded, 1)).expect("json")
    }

    #[tokio::test]
    async fn a_claim_marks_the_device_in_progress_and_counts_on_from_recorded_attempts() {
        let (mut conn, names, task) = setup().await;
        // An earlier holder recorded 3 attempts before it parked the task.
        let parked = status(ExecutionState::RetryScheduled, 3);
        let _: () = conn
            .hset(
                names.job_status(task.job_id),
                &task.device_id,
                serde_json::to_string(&parked).expect("json"),
            )
            .await
            .expect("hset");
        let first = claim(&mut conn, &names, &task, "a").await;
        assert_eq!(
            first,
            NextAction::StartProcessing {
                recorded_attempts: 3
            }
        );
        let now = stored(&mut conn, &names, &task).await;
        assert_eq!((now.state, now.attempts), (ExecutionState::InProgress, 3));
        // Our own claim can be taken again (a new broker session of the same process).
        let again = claim(&mut conn, &names, &task, "a").await;
        assert_eq!(
            again,
            NextAction::StartProcessing {
                recorded_attempts: 3
            }
        );
        cleanup(conn, &names).await;
    }

    #[tokio::test]
    async fn holding_renews_only_our_claim_and_never_overwrites_an_outcome() {
        let (mut conn, names, task) = setup().await;
        try_claim(
            &mut conn.clone(),
            &Claims::start(conn.clone()),
            &names,
            &task,
            "a",
            Duration::from_millis(500),
            &status(ExecutionState::InProgress, 0),
            true,
        )
        .await
        .expect("claim");
        assert!(
            hold(
                &mut conn,
                &names,
                &task,
                "a",
                LEASE,
                &status(ExecutionState::InProgress, 2)
            )
            .await
            .expect("hold")
        );
        let ttl: i64 = conn
            .pttl(names.idempotency(task.execution_id))
            .await
            .expect("ttl");
        assert!(ttl > 1_000, "the lease was renewed: {ttl} ms");
        assert_eq!(stored(&mut conn, &names, &task).await.attempts, 2);
        assert!(
            !hold(
                &mut conn,
                &names,
                &task,
                "b",
                LEASE,
                &status(ExecutionState::InProgress, 9)
            )
            .await
            .expect("hold b"),
            "another worker cannot hold our claim"
        );
        assert_eq!(stored(&mut conn, &names, &task).await.attempts, 2);
        let _: () = conn
            .hset(
                names.job_status(task.job_id),
                &task.device_id,
                serde_json::to_string(&status(ExecutionState::Succeeded, 2)).expect("json"),
            )
            .await
            .expect("hset");
        assert!(
            hold(
                &mut conn,
                &names,
                &task,
                "a",
                LEASE,
                &status(ExecutionState::InProgress, 3)
            )
            .await
            .expect("hold after outcome")
        );
        assert_eq!(
            stored(&mut conn, &names, &task).await.state,
            ExecutionState::Succeeded
        );
        cleanup(conn, &names).await;
    }

    #[tokio::test]
    async fn a_release_frees_only_our_own_claim() {
        let (mut conn, names, task) = setup().await;
        claim(&mut conn, &names, &task, "a").await;
        release(&mut conn, &names, task.execution_id, "b")
            .await
            .expect("release b");
        let b = claim(&mut conn, &names, &task, "b").await;
        assert_eq!(b, NextAction::HeldByOther { holder: "a".into() });
        release(&mut conn, &names, task.execution_id, "a")
            .await
            .expect("release a");
        let b = claim(&mut conn, &names, &task, "b").await;
        assert!(matches!(b, NextAction::StartProcessing { .. }), "{b:?}");
        cleanup(conn, &names).await;
    }

    #[tokio::test]
    async fn a_done_record_outlives_the_claim_and_is_returned_to_later_copies() {
        let (mut conn, names, task) = setup().await;
        claim(&mut conn, &names, &task, "a").await;
        let result = TaskResult {
            version: WIRE_VERSION,
            job_id: task.job_id,
            execution_id: task.execution_id,
            device_id: task.device_id.clone(),
            state: ExecutionState::Failed,
            attempts: 4,
            error: Some("broken".into()),
            worker: "a".into(),
            published_at_ms: 1,
            finished_at_ms: 2,
            readings: None,
        };
        mark_done(&mut conn, &names, &result, Duration::from_secs(60))
            .await
            .expect("done");
        // A release after the outcome never removes the stored result.
        release(&mut conn, &names, task.execution_id, "a")
            .await
            .expect("release");
        for worker in ["a", "b"] {
            match claim(&mut conn, &names, &task, worker).await {
                NextAction::ReturnSavedResult(r) => assert_eq!(*r, result),
                other => panic!("{worker}: {other:?}"),
            }
        }
        let ttl: i64 = conn
            .ttl(names.idempotency(task.execution_id))
            .await
            .expect("ttl");
        assert!((1..=60).contains(&ttl), "kept for the retention: {ttl} s");
        cleanup(conn, &names).await;
    }

    #[tokio::test]
    async fn a_copy_of_a_task_whose_outcome_is_recorded_claims_nothing_and_changes_nothing() {
        let (mut conn, names, task) = setup().await;
        // The coordinator recorded the outcome (and removed the saved result).
        let _: () = conn
            .hset(names.job_status(task.job_id), &task.device_id, done_again())
            .await
            .expect("hset");
        for worker in ["a", "b"] {
            assert_eq!(
                claim(&mut conn, &names, &task, worker).await,
                NextAction::AlreadyRecorded,
                "{worker}"
            );
        }
        let held: Option<Vec<u8>> = conn
            .get(names.idempotency(task.execution_id))
            .await
            .expect("get");
        assert_eq!(held, None, "nothing claimed");
        let now = stored(&mut conn, &names, &task).await;
        assert_eq!(now.state, ExecutionState::Succeeded);
        cleanup(conn, &names).await;
    }
}
