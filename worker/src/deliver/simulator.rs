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
use redis::Script;
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
    receive: std::sync::Arc<Script>,
    apply: std::sync::Arc<Script>,
}

pub use devices::simdevice::{DeviceProfile, PERMANENT_ERROR, REJECT_ERROR};

impl Simulator {
    /// A simulator keeping device state in `redis` under `names`.
    pub fn new(
        settings: SimulatorSettings,
        worker: String,
        redis: RedisConn,
        names: Names,
    ) -> Self {
        // receive: count the delivery; say how many this execution has had and whether the
        // device already applied it.
        let receive = Script::new(
            r"
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('HINCRBY', KEYS[3], 'deliveries', 1)
local t = redis.call('TIME')
redis.call('HSET', KEYS[3], 'last_delivery_ms', t[1] * 1000 + math.floor(t[2] / 1000))
if ARGV[2] ~= '' then
  local log = redis.call('HGET', KEYS[4], ARGV[1]) or ''
  redis.call('HSET', KEYS[4], ARGV[1], log .. ARGV[2] .. ';')
end
local done = redis.call('HEXISTS', KEYS[2], ARGV[1])
if done == 1 then redis.call('HINCRBY', KEYS[3], 'redundant_deliveries', 1) end
return {n, done}
",
        );
        // apply: remember the execution, count the application per device.
        let apply = Script::new(
            r"
if redis.call('HSETNX', KEYS[1], ARGV[1], 1) == 1 then
  local a = redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
  redis.call('HINCRBY', KEYS[3], 'applications', 1)
  if a > 1 then redis.call('HINCRBY', KEYS[3], 'duplicate_applications', 1) end
end
return 1
",
        );
        Self {
            settings,
            worker,
            redis,
            names,
            receive: std::sync::Arc::new(receive),
            apply: std::sync::Arc::new(apply),
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
        let (n, done): (u32, i64) = self
            .receive
            .key(self.names.sim_deliveries(req.job_id))
            .key(self.names.sim_done(req.job_id))
            .key(self.names.sim_totals(req.job_id))
            .key(self.names.sim_log(req.job_id))
            .arg(&exec)
            .arg(if self.settings.record_deliveries {
                format!("{}/{}", self.worker, req.attempt)
            } else {
                String::new()
            })
            .invoke_async(&mut redis)
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
        let _: i64 = self
            .apply
            .key(self.names.sim_done(req.job_id))
            .key(self.names.sim_applied(req.job_id))
            .key(self.names.sim_totals(req.job_id))
            .arg(&exec)
            .arg(&req.device_id)
            .invoke_async(&mut redis)
            .await
            .map_err(|e| DeliverError::Transient(format!("simulator state unavailable: {e}")))?;
        Ok(Reply::with_readings(&req.spec, readings))
    }
}
