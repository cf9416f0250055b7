//! Steering a running job: pause, resume, approve the next wave, abort.
//!
//! Owns those state transitions (each one Lua script, so two coordinators and an operator
//! never race one another into a state the design does not have) and telling the workers at
//! once over the control exchange. Operators call it through the API; the planner calls it
//! when a gate fails or an abort criterion trips. It never publishes tasks or records device
//! outcomes.
//!
//! ```text
//! SCHEDULED ──start_at──▶ IN_PROGRESS ──pause──▶ PAUSED ──resume──▶ IN_PROGRESS
//!      │   └──gate failed (pause)──▶ PAUSED ──resume | approve──▶ IN_PROGRESS (gate released)
//!      └──criterion tripped | gate failed (abort)──▶ ABORTING ──every device terminal──▶ ABORTED
//! ```

use lapin::types::FieldTable;
use redis::Script;
use shared::redis_conn::RedisConn;
use shared::{
    amqp::{self, Outgoing, Publisher},
    messages::{self, CONTROL_TYPE, ControlMessage},
    now_ms,
    state::JobState,
    store::StoreError,
    topology::Names,
};
use uuid::Uuid;

/// A change an operator or the planner asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steer {
    /// Hold the job: nothing new is published, parked retries wait.
    Pause,
    /// Continue a paused job (releasing the gate it failed, if it failed one).
    Resume,
    /// Let the next wave start: the wave waiting at its gate, soak or approval, or the wave
    /// whose failed gate paused the job.
    Approve,
    /// Stop for good: queued devices end CANCELED, the job ends ABORTED.
    Abort,
    /// Pause because wave `n`'s gate failed.
    GateFailed(u64),
    /// A SCHEDULED job's start time came.
    Start,
}

impl Steer {
    fn word(self) -> &'static str {
        match self {
            Steer::Pause => "pause",
            Steer::Resume => "resume",
            Steer::Approve => "approve",
            Steer::Abort => "abort",
            Steer::GateFailed(_) => "gate",
            Steer::Start => "start",
        }
    }
}

/// Why a change did nothing.
#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    /// No such job.
    #[error("no job {0}")]
    NotFound(Uuid),
    /// The job's state does not allow it.
    #[error("job {id} is {state}: {why}")]
    Refused {
        /// Job.
        id: Uuid,
        /// Its state.
        state: String,
        /// What would allow it.
        why: &'static str,
    },
    /// Redis failed.
    #[error("cannot change the job")]
    Store(#[from] StoreError),
}

// KEYS job; ARGV action, now, reason, gate wave. Returns {'OK', new state} or {'NO', state}
// or {'MISSING'}.
const TRANSITION: &str = r"
local s = redis.call('HGET', KEYS[1], 'state')
if not s then return {'MISSING'} end
local a = ARGV[1]
local now = ARGV[2]
if a == 'pause' or a == 'gate' then
  if s ~= 'IN_PROGRESS' then return {'NO', s} end
  redis.call('HSET', KEYS[1], 'state', 'PAUSED', 'state_reason', ARGV[3], 'updated_at_ms', now, 'paused_at_ms', now)
  if a == 'gate' then redis.call('HSET', KEYS[1], 'gate_failed', ARGV[4]) end
  return {'OK', 'PAUSED'}
elseif a == 'resume' or a == 'approve' then
  local failed = redis.call('HGET', KEYS[1], 'gate_failed')
  local phase = redis.call('HGET', KEYS[1], 'phase')
  local release = nil
  if s == 'PAUSED' then
    if failed then release = failed
    elseif a == 'approve' then return {'NO', s} end
  elseif s == 'IN_PROGRESS' and a == 'approve' then
    if phase ~= 'gate' and phase ~= 'soak' and phase ~= 'approval' then return {'NO', s} end
    release = redis.call('HGET', KEYS[1], 'wave')
  else
    return {'NO', s}
  end
  if release then
    local before = tonumber(redis.call('HGET', KEYS[1], 'released_wave') or '-1')
    if tonumber(release) > before then redis.call('HSET', KEYS[1], 'released_wave', release) end
    redis.call('HDEL', KEYS[1], 'gate_failed')
  end
  redis.call('HSET', KEYS[1], 'state', 'IN_PROGRESS', 'updated_at_ms', now)
  return {'OK', 'IN_PROGRESS'}
elseif a == 'start' then
  if s ~= 'SCHEDULED' then return {'NO', s} end
  redis.call('HSET', KEYS[1], 'state', 'IN_PROGRESS', 'updated_at_ms', now, 'started_at_ms', now)
  return {'OK', 'IN_PROGRESS'}
elseif a == 'abort' then
  if s ~= 'IN_PROGRESS' and s ~= 'PAUSED' then return {'NO', s} end
  redis.call('HSET', KEYS[1], 'state', 'ABORTING', 'state_reason', ARGV[3], 'updated_at_ms', now, 'aborted_at_ms', now)
  return {'OK', 'ABORTING'}
end
return {'NO', s}
";

/// Applies `change` to job `id` and tells the workers; `reason` is recorded for pauses and
/// aborts. Returns the job's new state.
///
/// # Errors
/// See [`SteerError`].
pub async fn steer(
    redis: &mut RedisConn,
    publisher: Option<&Publisher>,
    names: &Names,
    id: Uuid,
    change: Steer,
    reason: &str,
) -> Result<JobState, SteerError> {
    let gate = match change {
        Steer::GateFailed(n) => n.to_string(),
        _ => String::new(),
    };
    let answer: Vec<String> = Script::new(TRANSITION)
        .key(names.job(id))
        .arg(change.word())
        .arg(now_ms())
        .arg(reason)
        .arg(gate)
        .invoke_async(redis)
        .await
        .map_err(StoreError::from)?;
    let state = match answer.as_slice() {
        [ok, state] if ok == "OK" => JobState::parse(state).unwrap_or(JobState::InProgress),
        [_, state] => {
            return Err(SteerError::Refused {
                id,
                state: state.clone(),
                why: match change {
                    Steer::Pause | Steer::GateFailed(_) => "only IN_PROGRESS jobs can be paused",
                    Steer::Resume => "only PAUSED jobs can be resumed",
                    Steer::Approve => {
                        "approve lets the next wave start: the job must be waiting at a gate, soak or approval, or PAUSED by a failed gate"
                    }
                    Steer::Abort => "only IN_PROGRESS or PAUSED jobs can be aborted",
                    Steer::Start => "only SCHEDULED jobs start",
                },
            });
        }
        _ => return Err(SteerError::NotFound(id)),
    };
    tracing::info!(job_id = %id, change = change.word(), state = state.as_str(), %reason, "job steered");
    if let Some(publisher) = publisher
        && let Err(e) = tell_workers(
            publisher,
            names,
            id,
            ControlMessage::JobChanged { job_id: id },
        )
        .await
    {
        // Workers re-read the state within their cache TTL anyway.
        tracing::warn!(job_id = %id, error.message = %e, "workers not told of the change at once");
    }
    wake(redis, names, id).await;
    Ok(state)
}

/// Makes the job's parked tasks due now, so their next handler sees the change (cancels,
/// delivers or parks them again). Best effort: a parked task is due again at its window or
/// deadline anyway, and a paused one within a minute.
pub async fn wake(redis: &mut RedisConn, names: &Names, id: Uuid) {
    match shared::parking::wake_job(redis, names, id, now_ms()).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(job_id = %id, woken = n, "parked tasks woken"),
        Err(e) => tracing::warn!(job_id = %id, error.message = %e, "parked tasks not woken"),
    }
}

/// Broadcasts a control message to every worker. Nobody listening is not an error.
///
/// # Errors
/// Broker errors.
pub async fn tell_workers(
    publisher: &Publisher,
    names: &Names,
    id: Uuid,
    message: ControlMessage,
) -> Result<(), shared::amqp::AmqpError> {
    let payload = messages::encode(&message).map_err(shared::amqp::AmqpError::from)?;
    match publisher
        .publish(Outgoing {
            exchange: &names.control_exchange(),
            routing_key: "",
            payload: &payload,
            properties: amqp::properties(CONTROL_TYPE, &id.to_string(), FieldTable::default()),
        })
        .await
    {
        Ok(()) | Err(shared::amqp::AmqpError::Unroutable { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}
