//! The idempotency record of one execution, in Redis.
//!
//! Owns the key `{ns}:idem:{execution_id}` and its three states, after zero2prod's
//! `try_processing` / `NextAction`:
//! - absent: nobody works on it; [`try_claim`] takes it with `SET NX PX` (a lease, so a claim
//!   left by a worker that died expires and the task is taken over);
//! - `c:{worker}`: a worker holds the claim;
//! - `d:{result}`: finished; the stored [`TaskResult`] is re-published instead of delivering
//!   again.
//!
//! It never delivers, publishes or acks.

use std::time::Duration;

use redis::{AsyncCommands, Script, aio::ConnectionManager};
use shared::{
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
    /// The claim is ours: deliver.
    StartProcessing,
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

/// Tries to claim an execution for `worker`.
///
/// # Errors
/// Redis errors or a corrupt stored result.
pub async fn try_claim(
    redis: &mut ConnectionManager,
    names: &Names,
    execution: Uuid,
    worker: &str,
    lease: Duration,
) -> Result<NextAction, IdempotencyError> {
    let key = names.idempotency(execution);
    let claim = format!("{CLAIM}{worker}");
    // Two tries: the record may expire between our SET and our GET.
    for _ in 0..2 {
        let opts = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .with_expiration(redis::SetExpiry::PX(lease.as_millis() as u64));
        let set: Option<String> = redis.set_options(&key, &claim, opts).await?;
        if set.is_some() {
            return Ok(NextAction::StartProcessing);
        }
        let current: Option<Vec<u8>> = redis.get(&key).await?;
        match current {
            None => continue,
            Some(v) if v.starts_with(DONE) => {
                let result = messages::decode_result(&v[DONE.len()..])?;
                return Ok(NextAction::ReturnSavedResult(Box::new(result)));
            }
            Some(v) => {
                let holder = String::from_utf8_lossy(&v)
                    .trim_start_matches(CLAIM)
                    .to_owned();
                if holder == worker {
                    // Our own claim (the broker redelivered to us): keep going.
                    return Ok(NextAction::StartProcessing);
                }
                return Ok(NextAction::HeldByOther { holder });
            }
        }
    }
    Ok(NextAction::HeldByOther {
        holder: "unknown".into(),
    })
}

/// Extends our claim while a long delivery goes on.
///
/// # Errors
/// Redis errors.
pub async fn extend(
    redis: &mut ConnectionManager,
    names: &Names,
    execution: Uuid,
    lease: Duration,
) -> Result<(), IdempotencyError> {
    let _: bool = redis
        .pexpire(names.idempotency(execution), lease.as_millis() as i64)
        .await?;
    Ok(())
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
