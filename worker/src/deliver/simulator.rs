//! The built-in fleet simulator: a transport whose "devices" live in Redis.
//!
//! Owns simulated device behaviour. Every behaviour is drawn per device from a hash of the
//! device id and the configured seed, so a run is reproducible and a test can compute which
//! devices must fail ([`DeviceProfile::for_device`]). Like a real device, a simulated one keeps
//! its memory outside the worker (in Redis): it counts every delivery, applies an execution
//! once and ignores repeats of the same execution id, and a worker that dies does not reset
//! it. Its counters (`deliveries`, `applications`, `redundant_deliveries`,
//! `duplicate_applications`, and `last_delivery_ms`, the Redis clock at the latest delivery)
//! are what tests, the demo and the benchmark check the guarantees against.

use devices::keys::DeviceKeys;
use devices::simdevice::{self, Answer, SimOutcome};
use std::sync::Arc;

use redis::Script;
use shared::coalesce::{ScriptBatcher, ScriptItem, script_batcher};
use shared::redis_conn::RedisConn;
use shared::{config::SimulatorSettings, job::Action, topology::Names};

use super::request::{DeliverError, DeliveryRequest, Reply};

/// The simulator transport.
#[derive(Debug, Clone)]
pub struct Simulator {
    settings: SimulatorSettings,
    worker: String,
    redis: RedisConn,
    names: Names,
    receive: ScriptBatcher<(u32, i64)>,
    apply: ScriptBatcher<i64>,
}

pub use devices::simdevice::{DeviceProfile, PERMANENT_ERROR, REJECT_ERROR};

/// A device receives an execution: counts the delivery, and says how many this execution has
/// had and whether the device already applied it. The job's totals are added once per job a
/// call. KEYS deliveries, done, totals, log and
/// ARGV execution, log entry ('' for none), for each device of the call; an answer each.
const RECEIVE_LUA: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local answers, totals = {}, {}
for i = 0, #KEYS / 4 - 1 do
  local k, a = 1 + 4 * i, 1 + 2 * i
  local n = redis.call('HINCRBY', KEYS[k], ARGV[a], 1)
  if ARGV[a + 1] ~= '' then
    local log = redis.call('HGET', KEYS[k + 3], ARGV[a]) or ''
    redis.call('HSET', KEYS[k + 3], ARGV[a], log .. ARGV[a + 1] .. ';')
  end
  local done = redis.call('HEXISTS', KEYS[k + 1], ARGV[a])
  local c = totals[KEYS[k + 2]] or {0, 0}
  c[1] = c[1] + 1
  c[2] = c[2] + done
  totals[KEYS[k + 2]] = c
  answers[i + 1] = {n, done}
end
for key, c in pairs(totals) do
  redis.call('HINCRBY', key, 'deliveries', c[1])
  redis.call('HSET', key, 'last_delivery_ms', now)
  if c[2] > 0 then redis.call('HINCRBY', key, 'redundant_deliveries', c[2]) end
end
return answers
";

/// A device applies an execution: remembers it, counts the application (the totals once per
/// job a call). KEYS done, applied,
/// totals and ARGV execution, device, for each device of the call; an answer each.
const APPLY_LUA: &str = r"
local answers, totals = {}, {}
for i = 0, #KEYS / 3 - 1 do
  local k, a = 1 + 3 * i, 1 + 2 * i
  if redis.call('HSETNX', KEYS[k], ARGV[a], 1) == 1 then
    local n = redis.call('HINCRBY', KEYS[k + 1], ARGV[a + 1], 1)
    local c = totals[KEYS[k + 2]] or {0, 0}
    c[1] = c[1] + 1
    if n > 1 then c[2] = c[2] + 1 end
    totals[KEYS[k + 2]] = c
  end
  answers[i + 1] = 1
end
for key, c in pairs(totals) do
  redis.call('HINCRBY', key, 'applications', c[1])
  if c[2] > 0 then redis.call('HINCRBY', key, 'duplicate_applications', c[2]) end
end
return answers
";

/// Devices a call of the simulator's scripts serves at most, and calls under way at once.
const BATCH: usize = 64;
const IN_FLIGHT: usize = 4;

impl Simulator {
    /// A simulator keeping device state in `redis` under `names`; its scripts serve the
    /// deliveries under way together (one call per batch), as many devices would answer at
    /// once. Starts its batching tasks on the current runtime.
    pub fn new(
        settings: SimulatorSettings,
        worker: String,
        redis: RedisConn,
        names: Names,
    ) -> Self {
        let receive = script_batcher(
            redis.clone(),
            Arc::new(Script::new(RECEIVE_LUA)),
            BATCH,
            IN_FLIGHT,
        );
        let apply = script_batcher(
            redis.clone(),
            Arc::new(Script::new(APPLY_LUA)),
            BATCH,
            IN_FLIGHT,
        );
        Self {
            settings,
            worker,
            redis,
            names,
            receive,
            apply,
        }
    }

    /// One delivery to a simulated device.
    ///
    /// # Errors
    /// What the device answers: offline (transient), a transient glitch, a permanent failure,
    /// or a rejection; Redis trouble is reported as transient.
    pub async fn deliver(&self, req: &DeliveryRequest) -> Result<Reply, DeliverError> {
        let exec = req.execution_id.to_string();
        let mut redis = self.redis.clone();
        if req.health_check {
            // A health probe: not a delivery; the device's health after applying it.
            let applied: bool =
                redis::AsyncCommands::hexists(&mut redis, self.names.sim_done(req.job_id), &exec)
                    .await
                    .map_err(|e| {
                        DeliverError::Transient(format!("simulator state unavailable: {e}"))
                    })?;
            let health = if applied {
                simdevice::health(&self.settings, &req.device_id, &req.spec.action)
            } else {
                devices::protocol::HealthReport {
                    status: devices::protocol::HealthStatus::Pending,
                    version: None,
                    reason: None,
                }
            };
            return Ok(Reply {
                readings: None,
                health: Some(health),
            });
        }
        let (n, done) = self
            .receive
            .call(ScriptItem {
                keys: vec![
                    self.names.sim_deliveries(req.job_id),
                    self.names.sim_done(req.job_id),
                    self.names.sim_totals(req.job_id),
                    self.names.sim_log(req.job_id),
                ],
                args: vec![
                    exec.clone().into(),
                    if self.settings.record_deliveries {
                        format!("{}/{}", self.worker, req.attempt).into()
                    } else {
                        Vec::new()
                    },
                ],
            })
            .await
            .map_err(|e| DeliverError::Transient(format!("simulator state unavailable: {e}")))?;
        let reboot = matches!(req.spec.action, Action::Reboot(_));
        let answer = simdevice::decide(
            &self.settings,
            &req.device_id,
            &exec,
            n,
            req.attempt,
            done == 1,
            reboot,
        );
        let Answer::Reply { after, outcome } = answer else {
            // An offline or hung device never answers: the caller's timeout fires.
            return std::future::pending().await;
        };
        tokio::time::sleep(after).await;
        let readings = match &req.spec.action {
            Action::DataRetrieval(d) => Some(simdevice::readings(
                &self.settings,
                &req.device_id,
                &d.metrics,
            )),
            _ => None,
        };
        match outcome {
            // A repeat of an execution the device already applied: acknowledged, not re-run.
            SimOutcome::AlreadyApplied => return Ok(Reply::with_readings(&req.spec, readings)),
            SimOutcome::Rejected => return Err(DeliverError::Rejected(REJECT_ERROR.into())),
            SimOutcome::Failed => return Err(DeliverError::Permanent(PERMANENT_ERROR.into())),
            SimOutcome::Transient => {
                return Err(DeliverError::Transient(simdevice::TRANSIENT_ERROR.into()));
            }
            SimOutcome::Applied => {}
        }
        self.apply
            .call(ScriptItem {
                keys: vec![
                    self.names.sim_done(req.job_id),
                    self.names.sim_applied(req.job_id),
                    self.names.sim_totals(req.job_id),
                ],
                args: vec![exec.into(), req.device_id.clone().into()],
            })
            .await
            .map_err(|e| DeliverError::Transient(format!("simulator state unavailable: {e}")))?;
        Ok(Reply::with_readings(&req.spec, readings))
    }
}
