//! The parking lot: tasks that wait in Redis, not in a worker or on a broker queue, until
//! their device's maintenance window opens, the device comes online, or the job ahead of
//! them on the device ends (one job at a time per device).
//!
//! Owns the parked-task keys ([`Names::parked_due`] and friends), device presence
//! ([`Names::presence`]) and the scripts that move tasks in and out atomically:
//! - [`park`]: a worker parks a task it will not deliver now (a closed window, an offline
//!   device) and then acks it; a waiting task costs a hash entry and two set entries, no
//!   worker slot, no broker message and no attempt. Parking for an offline device is refused
//!   atomically if the device is online by then, so a device coming online between the
//!   worker's check and the park is never missed.
//! - [`take_due`] / [`release`]: a coordinator takes due tasks (leased: a taker that dies
//!   before publishing leaves them due again 30 s later) and, once they are published,
//!   releases them, unless a newer park of the same execution replaced them meanwhile (each
//!   park carries its own token).
//! - [`announce`]: a device's presence; `online` makes every task waiting for it due now.
//!   The recording script does the same when a job leaves a device's lane
//!   ([`crate::store::Scripts::record_terminal`]).
//! - [`wake_job`]: every parked task of a job due now (cancel, abort, resume).
//! - [`wake_device`]: every parked task of a device due now: an AWS IoT Jobs device changed
//!   one of its executions (started it, reported progress or its end), so the task waiting
//!   for that execution is looked at again.
//!
//! It never decides whether a device is delivered to: [`crate::window`] and the worker do.

use crate::redis_conn::RedisConn;
use redis::{AsyncCommands, Script};
use uuid::Uuid;

use crate::{messages::DeviceTask, store::StoreError, topology::Names};

/// Why a task waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Until `due_ms` (its window opens); also woken by cancel, abort or resume.
    Until(u64),
    /// Until its device announces itself online, or `due_ms` (the job's deadline) passes.
    Device(Option<u64>),
    /// Until the job ahead of it on its device ends (which wakes the device's parked
    /// tasks), or `due_ms`.
    Turn(u64),
    /// Until the device changes the task's execution in storage (AWS IoT Jobs: it asked for
    /// the job, started it or reported its end; [`wake_device`]), or `due_ms` (its step
    /// timer or the job's deadline).
    Execution(Option<u64>),
}

/// A task taken from the lot, to publish and then [`release`].
#[derive(Debug, Clone)]
pub struct Taken {
    /// The task.
    pub task: DeviceTask,
    /// The stored value (token and body), which [`release`] compares.
    stored: Vec<u8>,
}

/// How long a taken task stays leased to its taker before it is due again.
pub const TAKE_LEASE_MS: u64 = 30_000;

const PARK: &str = r#"
if ARGV[5] == '1' and redis.call('HGET', KEYS[5], ARGV[4]) ~= 'offline' then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[1])
if ARGV[5] ~= '0' then redis.call('SADD', KEYS[4], ARGV[1]) end
return 1
"#;

const TAKE: &str = r#"
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(ids) do
  local body = redis.call('HGET', KEYS[2], id)
  if body then
    redis.call('ZADD', KEYS[1], ARGV[3], id)
    out[#out + 1] = id
    out[#out + 1] = body
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"#;

const RELEASE: &str = r#"
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[1])
return 1
"#;

const ANNOUNCE: &str = r#"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[2] ~= 'online' then return 0 end
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  n = n + redis.call('ZADD', KEYS[3], 'XX', 'CH', ARGV[3], id)
end
return n
"#;

/// Parks `task` until `wait` ends. Returns `false` (nothing parked) when waiting for a
/// device that is not known to be offline.
///
/// # Errors
/// Redis errors, or a task that does not encode.
pub async fn park(
    redis: &mut RedisConn,
    names: &Names,
    task: &DeviceTask,
    wait: Wait,
) -> Result<bool, StoreError> {
    let body = crate::messages::encode(task).map_err(|e| StoreError::Corrupt {
        key: names.parked_tasks(),
        problem: e.to_string(),
    })?;
    let mut stored = Uuid::new_v4().as_bytes().to_vec();
    stored.extend_from_slice(&body);
    let (due, kind) = match wait {
        Wait::Until(ms) => (ms.to_string(), "0"),
        Wait::Device(Some(ms)) => (ms.to_string(), "1"),
        Wait::Device(None) => ("+inf".to_owned(), "1"),
        Wait::Turn(ms) => (ms.to_string(), "2"),
        Wait::Execution(Some(ms)) => (ms.to_string(), "3"),
        Wait::Execution(None) => ("+inf".to_owned(), "3"),
    };
    let parked: i64 = Script::new(PARK)
        .key(names.parked_due())
        .key(names.parked_tasks())
        .key(names.parked_job(task.job_id))
        .key(names.parked_device(&task.device_id))
        .key(names.presence())
        .arg(task.execution_id.to_string())
        .arg(due)
        .arg(stored)
        .arg(&task.device_id)
        .arg(kind)
        .invoke_async(redis)
        .await?;
    Ok(parked == 1)
}

/// Takes up to `limit` tasks due at `now_ms`, leasing them for [`TAKE_LEASE_MS`]. A stored
/// value that no longer decodes is dropped from the lot and logged (it cannot be
/// published; the reconciliation sweep ends its device as lost).
///
/// # Errors
/// Redis errors.
pub async fn take_due(
    redis: &mut RedisConn,
    names: &Names,
    now_ms: u64,
    limit: usize,
) -> Result<Vec<Taken>, StoreError> {
    let stored: Vec<(String, Vec<u8>)> = Script::new(TAKE)
        .key(names.parked_due())
        .key(names.parked_tasks())
        .arg(now_ms)
        .arg(limit)
        .arg(now_ms.saturating_add(TAKE_LEASE_MS))
        .invoke_async(redis)
        .await?;
    let mut taken = Vec::with_capacity(stored.len());
    for (id, value) in stored {
        match value
            .get(16..)
            .ok_or_else(|| "shorter than its token".to_owned())
            .and_then(|b| crate::messages::decode_task(b).map_err(|e| e.to_string()))
        {
            Ok(task) => taken.push(Taken {
                task,
                stored: value,
            }),
            Err(problem) => {
                tracing::error!(execution_id = %id, %problem, "a parked task does not decode; dropped from the lot");
                let () = redis::pipe()
                    .zrem(names.parked_due(), &id)
                    .ignore()
                    .hdel(names.parked_tasks(), &id)
                    .ignore()
                    .query_async(redis)
                    .await?;
            }
        }
    }
    Ok(taken)
}

/// Removes published tasks from the lot, each only if it was not parked again meanwhile.
///
/// # Errors
/// Redis errors.
pub async fn release(
    redis: &mut RedisConn,
    names: &Names,
    taken: &[Taken],
) -> Result<(), StoreError> {
    if taken.is_empty() {
        return Ok(());
    }
    let script = Script::new(RELEASE);
    let mut pipe = redis::pipe();
    pipe.load_script(&script).ignore();
    for t in taken {
        pipe.invoke_script(
            script
                .key(names.parked_due())
                .key(names.parked_tasks())
                .key(names.parked_job(t.task.job_id))
                .key(names.parked_device(&t.task.device_id))
                .arg(t.task.execution_id.to_string())
                .arg(t.stored.as_slice()),
        )
        .ignore();
    }
    let () = pipe.query_async(redis).await?;
    Ok(())
}

/// Records a device's presence; `online` makes its waiting tasks due at `now_ms`. Returns
/// how many were woken.
///
/// # Errors
/// Redis errors.
pub async fn announce(
    redis: &mut RedisConn,
    names: &Names,
    device: &str,
    online: bool,
    now_ms: u64,
) -> Result<u64, StoreError> {
    let n: u64 = Script::new(ANNOUNCE)
        .key(names.presence())
        .key(names.parked_device(device))
        .key(names.parked_due())
        .arg(device)
        .arg(if online { "online" } else { "offline" })
        .arg(now_ms)
        .invoke_async(redis)
        .await?;
    Ok(n)
}

/// Lua: `wake_device(parked, due, now)` makes every task parked for a device (its set
/// `parked`, [`Names::parked_device`]) due at `now` in `due` ([`Names::parked_due`]); returns
/// how many. For scripts that change what a device's parked tasks wait for and wake them in
/// the same call.
pub const WAKE_DEVICE_LUA: &str = r#"
local function wake_device(parked, due, now)
  local n = 0
  for _, id in ipairs(redis.call('SMEMBERS', parked)) do
    n = n + redis.call('ZADD', due, 'XX', 'CH', now, id)
  end
  return n
end
"#;

static WAKE_DEVICE: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(&format!(
        "{WAKE_DEVICE_LUA}return wake_device(KEYS[1], KEYS[2], ARGV[1])"
    ))
});

/// Makes every task parked for `device` due at `now_ms`; their next handlers look again and
/// park again what still has to wait. Returns how many were woken.
///
/// # Errors
/// Redis errors.
pub async fn wake_device(
    redis: &mut RedisConn,
    names: &Names,
    device: &str,
    now_ms: u64,
) -> Result<u64, StoreError> {
    let n: u64 = WAKE_DEVICE
        .key(names.parked_device(device))
        .key(names.parked_due())
        .arg(now_ms)
        .invoke_async(redis)
        .await?;
    Ok(n)
}

/// Whether `device` last announced itself offline (a device that never announced is
/// treated as reachable).
///
/// # Errors
/// Redis errors.
pub async fn is_offline(
    redis: &mut RedisConn,
    names: &Names,
    device: &str,
) -> Result<bool, StoreError> {
    let state: Option<String> = redis.hget(names.presence(), device).await?;
    Ok(state.as_deref() == Some("offline"))
}

/// Makes every parked task of `job` due at `now_ms` (its next handler cancels, times out
/// or parks it again). Returns how many.
///
/// # Errors
/// Redis errors.
pub async fn wake_job(
    redis: &mut RedisConn,
    names: &Names,
    job: Uuid,
    now_ms: u64,
) -> Result<u64, StoreError> {
    let key = names.parked_job(job);
    let mut cursor: u64 = 0;
    let mut woken = 0u64;
    loop {
        let (next, ids): (u64, Vec<String>) = redis::cmd("SSCAN")
            .arg(&key)
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(redis)
            .await?;
        if !ids.is_empty() {
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("ZADD")
                    .arg(names.parked_due())
                    .arg("XX")
                    .arg("CH")
                    .arg(now_ms)
                    .arg(id);
            }
            let changed: Vec<u64> = pipe.query_async(redis).await?;
            woken += changed.iter().sum::<u64>();
        }
        if next == 0 {
            return Ok(woken);
        }
        cursor = next;
    }
}

/// How many tasks of `job` are parked now.
///
/// # Errors
/// Redis errors.
pub async fn parked_of_job(
    redis: &mut RedisConn,
    names: &Names,
    job: Uuid,
) -> Result<u64, StoreError> {
    Ok(redis.scard(names.parked_job(job)).await?)
}

/// How many tasks are parked in all.
///
/// # Errors
/// Redis errors.
pub async fn parked_total(redis: &mut RedisConn, names: &Names) -> Result<u64, StoreError> {
    Ok(redis.zcard(names.parked_due()).await?)
}
