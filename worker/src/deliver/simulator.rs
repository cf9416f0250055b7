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

use std::time::Duration;

use redis::{Script, aio::ConnectionManager};
use shared::{config::SimulatorSettings, topology::Names};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::{DeliverError, DeliveryRequest};

/// How one simulated device behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceProfile {
    /// Fails every job permanently.
    pub fails_permanently: bool,
    /// Rejects every job as incompatible.
    pub rejects: bool,
    /// Answers nothing to this many deliveries of each execution.
    pub offline_attempts: u32,
}

/// A uniform draw in [0, 1) from (seed, device, purpose, n).
fn unit(seed: u64, device: &str, purpose: u64, n: u32) -> f64 {
    let h = xxh3_64_with_seed(
        device.as_bytes(),
        seed ^ purpose.rotate_left(17) ^ u64::from(n).rotate_left(41),
    );
    (h >> 11) as f64 / (1u64 << 53) as f64
}

const PERMANENT: u64 = 0x5045_524d;
const REJECT: u64 = 0x5245_4a45;
const OFFLINE: u64 = 0x4f46_464c;
const TRANSIENT: u64 = 0x5452_414e;
const LATENCY: u64 = 0x4c41_5445;

impl DeviceProfile {
    /// The profile of `device` under `settings`: a pure function, so tests can predict it.
    pub fn for_device(settings: &SimulatorSettings, device: &str) -> Self {
        let s = settings.seed;
        let rejects = unit(s, device, REJECT, 0) < settings.reject_rate;
        Self {
            rejects,
            fails_permanently: !rejects
                && unit(s, device, PERMANENT, 0) < settings.permanent_failure_rate,
            offline_attempts: if unit(s, device, OFFLINE, 0) < settings.offline_rate {
                settings.offline_attempts
            } else {
                0
            },
        }
    }
}

/// The simulator transport.
#[derive(Debug, Clone)]
pub struct Simulator {
    settings: SimulatorSettings,
    redis: ConnectionManager,
    names: Names,
    receive: std::sync::Arc<Script>,
    apply: std::sync::Arc<Script>,
}

/// Error text of a permanently failing simulated device.
pub const PERMANENT_ERROR: &str = "simulated install failure: image verification failed";
/// Error text of a rejecting simulated device.
pub const REJECT_ERROR: &str = "incompatible hardware revision";

impl Simulator {
    /// A simulator keeping device state in `redis` under `names`.
    pub fn new(settings: SimulatorSettings, redis: ConnectionManager, names: Names) -> Self {
        // receive: count the delivery; say how many this execution has had and whether the
        // device already applied it.
        let receive = Script::new(
            r"
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('HINCRBY', KEYS[3], 'deliveries', 1)
local t = redis.call('TIME')
redis.call('HSET', KEYS[3], 'last_delivery_ms', t[1] * 1000 + math.floor(t[2] / 1000))
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
            redis,
            names,
            receive: std::sync::Arc::new(receive),
            apply: std::sync::Arc::new(apply),
        }
    }

    fn latency(&self, req: &DeliveryRequest) -> Duration {
        let s = &self.settings;
        if s.latency_ms == 0 && s.latency_jitter_ms == 0 {
            return Duration::ZERO;
        }
        let u = unit(s.seed, &req.device_id, LATENCY, req.attempt);
        let jitter = (u * 2.0 - 1.0) * s.latency_jitter_ms as f64;
        Duration::from_millis((s.latency_ms as f64 + jitter).max(0.0) as u64)
    }

    /// One delivery to a simulated device.
    ///
    /// # Errors
    /// What the device answers: offline (transient), a transient glitch, a permanent failure,
    /// or a rejection; Redis trouble is reported as transient.
    pub async fn deliver(&self, req: &DeliveryRequest) -> Result<(), DeliverError> {
        let profile = DeviceProfile::for_device(&self.settings, &req.device_id);
        let exec = req.execution_id.to_string();
        let mut redis = self.redis.clone();
        let (n, done): (u32, i64) = self
            .receive
            .key(self.names.sim_deliveries(req.job_id))
            .key(self.names.sim_done(req.job_id))
            .key(self.names.sim_totals(req.job_id))
            .arg(&exec)
            .invoke_async(&mut redis)
            .await
            .map_err(|e| DeliverError::Transient(format!("simulator state unavailable: {e}")))?;
        if n <= profile.offline_attempts {
            // An offline device never answers: the caller's timeout fires.
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(self.latency(req)).await;
        if done == 1 {
            // A repeat of an execution the device already applied: acknowledged, not re-run.
            return Ok(());
        }
        if profile.rejects {
            return Err(DeliverError::Rejected(REJECT_ERROR.into()));
        }
        if profile.fails_permanently {
            return Err(DeliverError::Permanent(PERMANENT_ERROR.into()));
        }
        if unit(self.settings.seed, &exec, TRANSIENT, n) < self.settings.transient_failure_rate {
            return Err(DeliverError::Transient("simulated connection reset".into()));
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> SimulatorSettings {
        SimulatorSettings {
            seed: 7,
            latency_ms: 0,
            latency_jitter_ms: 0,
            transient_failure_rate: 0.0,
            permanent_failure_rate: 0.1,
            reject_rate: 0.05,
            offline_rate: 0.2,
            offline_attempts: 2,
        }
    }

    #[test]
    fn profiles_are_reproducible_and_match_the_configured_rates() {
        let s = settings();
        let n = 20_000;
        let profiles: Vec<_> = (0..n)
            .map(|i| DeviceProfile::for_device(&s, &format!("dev-{i}")))
            .collect();
        assert_eq!(profiles[123], DeviceProfile::for_device(&s, "dev-123"));
        let frac = |f: &dyn Fn(&DeviceProfile) -> bool| {
            profiles.iter().filter(|p| f(p)).count() as f64 / n as f64
        };
        assert!((frac(&|p| p.rejects) - 0.05).abs() < 0.01);
        // Permanent failures are drawn among non-rejecting devices.
        assert!((frac(&|p| p.fails_permanently) - 0.095).abs() < 0.01);
        assert!((frac(&|p| p.offline_attempts == 2) - 0.2).abs() < 0.015);
    }

    #[test]
    fn a_different_seed_picks_different_devices() {
        let a = settings();
        let mut b = settings();
        b.seed = 8;
        let differ = (0..1000)
            .filter(|i| {
                let d = format!("dev-{i}");
                DeviceProfile::for_device(&a, &d) != DeviceProfile::for_device(&b, &d)
            })
            .count();
        assert!(differ > 100);
    }
}
