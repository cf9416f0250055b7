//! The idempotency record of one execution, in Redis.
//!
//! Owns the key `{ns}:idem:{execution_id}` and its three states, after zero2prod's
//! `try_processing` / `NextAction`:
//! - absent: nobody works on it; [`try_claim`] takes it with `SET NX PX` (a lease, so a claim
//!   left by a worker that died expires and the task is taken over), in the same round trip
//!   reading the attempts already recorded for the device;
//! - `c:{worker}`: a worker holds the claim;
//! - `d:{result}`: finished; the stored [`TaskResult`] is re-published instead of delivering
//!   again.
//!
//! It never delivers, publishes or acks.

use std::time::Duration;

use redis::{AsyncCommands, Script, aio::ConnectionManager};
use shared::{
    job::DeviceStatus,
    messages::{self, TaskResult, WireError},
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
}

/// What to do with a task, given its idempotency record.
#[derive(Debug)]
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
    /// Another worker holds the claim (it may be working, or dead until the lease ends).
    HeldByOther {
        /// The holder.
        holder: String,
    },
}

const CLAIM: &str = "c:";
const DONE: &[u8] = b"d:";

/// Claims with `SET NX PX`; on success also returns the device's recorded status, so a
/// task's attempt count survives a holder that could not publish the task's updated copy.
const CLAIM_LUA: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, redis.call('HGET', KEYS[2], ARGV[3]) or ''}
end
return {0, redis.call('GET', KEYS[1]) or ''}
";

/// Tries to claim an execution for `worker`.
///
/// # Errors
/// Redis errors or a corrupt stored result.
pub async fn try_claim(
    redis: &mut ConnectionManager,
    names: &Names,
    job_id: Uuid,
    device_id: &str,
    execution: Uuid,
    worker: &str,
    lease: Duration,
) -> Result<NextAction, IdempotencyError> {
    let script = Script::new(CLAIM_LUA);
    let claim = format!("{CLAIM}{worker}");
    // Two tries: the record may expire between the failed SET and the GET.
    for _ in 0..2 {
        let (claimed, value): (i64, Vec<u8>) = script
            .key(names.idempotency(execution))
            .key(names.job_status(job_id))
            .arg(&claim)
            .arg(lease.as_millis() as u64)
            .arg(device_id)
            .invoke_async(redis)
            .await?;
        if claimed == 1 {
            let recorded_attempts = serde_json::from_slice::<DeviceStatus>(&value)
                .ok()
                .filter(|s| !s.state.is_terminal())
                .map_or(0, |s| s.attempts);
            return Ok(NextAction::StartProcessing { recorded_attempts });
        }
        if value.is_empty() {
            continue;
        }
        if value.starts_with(DONE) {
            let result = messages::decode_result(&value[DONE.len()..])?;
            return Ok(NextAction::ReturnSavedResult(Box::new(result)));
        }
        let holder = String::from_utf8_lossy(&value)
            .trim_start_matches(CLAIM)
            .to_owned();
        if holder == worker {
            // Our own claim, left by an earlier broker session of this process (a copy that a
            // handler of this process is still working on never gets here: see
            // `handle::Context::active`).
            return Ok(NextAction::StartProcessing {
                recorded_attempts: 0,
            });
        }
        return Ok(NextAction::HeldByOther { holder });
    }
    Ok(NextAction::HeldByOther {
        holder: "unknown".into(),
    })
}

/// Renews our claim's lease if we still hold it; `false` if it lapsed and someone else may
/// have taken the execution over (e.g. Redis was down longer than the lease).
///
/// # Errors
/// Redis errors.
pub async fn renew(
    redis: &mut ConnectionManager,
    names: &Names,
    execution: Uuid,
    worker: &str,
    lease: Duration,
) -> Result<bool, IdempotencyError> {
    let script = Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0",
    );
    let renewed: i64 = script
        .key(names.idempotency(execution))
        .arg(format!("{CLAIM}{worker}"))
        .arg(lease.as_millis() as u64)
        .invoke_async(redis)
        .await?;
    Ok(renewed == 1)
}

/// Records the final result. From now on every copy of the task re-publishes it.
///
/// # Errors
/// Redis errors.
pub async fn mark_done(
    redis: &mut ConnectionManager,
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
    redis: &mut ConnectionManager,
    names: &Names,
    execution: Uuid,
    worker: &str,
) -> Result<(), IdempotencyError> {
    let script = Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
    );
    let _: i64 = script
        .key(names.idempotency(execution))
        .arg(format!("{CLAIM}{worker}"))
        .invoke_async(redis)
        .await?;
    Ok(())
}
