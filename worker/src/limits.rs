//! Per-tag concurrency limits (`rollout.max_in_flight`): at most `max` devices with the same
//! value of a tag in delivery at once, across every worker.
//!
//! Owns the slots: one sorted set per job and tag value in Redis, each member an execution
//! scored by when its slot lapses, so a worker that dies frees its slots after one lease. A
//! slot is taken before the delivery and given back when the handler is done with the task,
//! however it ends. It never delivers anything or records outcomes.

use shared::redis_conn::RedisConn;
use std::time::Duration;

use redis::{AsyncCommands, Script};
use shared::{rollout::InFlightLimit, store::StoreError, topology::Names};
use uuid::Uuid;

// KEYS slots; ARGV member, max, now, lapse-at, key ttl ms. 1: held (taken or renewed), 0: full.
const TAKE: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return 1
end
return 0
";

/// The answer to a request for a slot.
#[derive(Debug)]
pub enum Slot {
    /// The job sets no limit, or the device has no value for its tag.
    Unlimited,
    /// Taken: give it back with [`Held::release`] (or let it lapse).
    Held(Held),
    /// Every slot of the device's tag value is taken.
    Full {
        /// The tag value.
        value: String,
    },
}

/// A slot this worker holds.
#[derive(Debug, Clone)]
pub struct Held {
    key: String,
    member: String,
    max: u32,
}

/// Takes a slot for `execution` of `job` on `device` under `limit`, for `lease`.
///
/// # Errors
/// Redis errors.
pub async fn take(
    redis: &mut RedisConn,
    names: &Names,
    limit: &InFlightLimit,
    job: Uuid,
    device: &str,
    execution: Uuid,
    lease: Duration,
) -> Result<Slot, StoreError> {
    let tags: Option<String> = redis.hget(names.device(device), "tags").await?;
    let value = tags
        .and_then(|t| serde_json::from_str::<std::collections::BTreeMap<String, String>>(&t).ok())
        .and_then(|mut t| t.remove(&limit.tag));
    let Some(value) = value else {
        return Ok(Slot::Unlimited);
    };
    let held = Held {
        key: names.job_in_flight(job, &value),
        member: execution.to_string(),
        max: limit.max,
    };
    if held.renew(redis, lease).await? {
        Ok(Slot::Held(held))
    } else {
        Ok(Slot::Full { value })
    }
}

impl Held {
    /// Keeps the slot for `lease` more; false if it lapsed and the value is now full.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn renew(&self, redis: &mut RedisConn, lease: Duration) -> Result<bool, StoreError> {
        let now = shared::now_ms();
        let lease_ms = lease.as_millis() as u64;
        let got: i64 = Script::new(TAKE)
            .key(&self.key)
            .arg(&self.member)
            .arg(self.max)
            .arg(now)
            .arg(now + lease_ms)
            .arg(lease_ms.saturating_mul(4).max(60_000))
            .invoke_async(redis)
            .await?;
        Ok(got == 1)
    }

    /// Gives the slot back.
    ///
    /// # Errors
    /// Redis errors (the slot then lapses on its own).
    pub async fn release(&self, redis: &mut RedisConn) -> Result<(), StoreError> {
        let _: i64 = redis.zrem(&self.key, &self.member).await?;
        Ok(())
    }
}
