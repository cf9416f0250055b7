//! How a simulated device behaves: pure functions of the settings, the device id, the
//! execution id and the delivery count.
//!
//! Owns the behaviour shared by the worker's built-in simulator and the `fleet-sim` program,
//! so both fleets fail the same devices in the same way and a test can predict the outcome
//! of every device ([`DeviceProfile::for_device`], [`decide`], [`readings`]). It keeps no
//! state: where a device's memory lives (Redis, or the `fleet-sim` process) is the caller's.

use std::{collections::BTreeMap, time::Duration};

use xxhash_rust::xxh3::xxh3_64_with_seed;

use shared::config::SimulatorSettings;

/// Error text of a permanently failing simulated device.
pub const PERMANENT_ERROR: &str = "simulated install failure: image verification failed";
/// Error text of a rejecting simulated device.
pub const REJECT_ERROR: &str = "incompatible hardware revision";
/// Error text of a simulated transient failure.
pub const TRANSIENT_ERROR: &str = "simulated connection reset";

/// How one simulated device behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceProfile {
    /// Fails every job permanently.
    pub fails_permanently: bool,
    /// Rejects every job as incompatible.
    pub rejects: bool,
    /// Answers nothing to this many deliveries of each execution.
    pub offline_attempts: u32,
    /// Never answers at all.
    pub hangs: bool,
    /// Reports itself unhealthy after installing (health-confirmed jobs).
    pub unhealthy: bool,
    /// Rolls itself back after installing (health-confirmed jobs).
    pub rolls_back: bool,
}

/// A uniform draw in [0, 1) from (seed, key, purpose, n).
pub fn unit(seed: u64, key: &str, purpose: u64, n: u32) -> f64 {
    let h = xxh3_64_with_seed(
        key.as_bytes(),
        seed ^ purpose.rotate_left(17) ^ u64::from(n).rotate_left(41),
    );
    (h >> 11) as f64 / (1u64 << 53) as f64
}

const PERMANENT: u64 = 0x5045_524d;
const REJECT: u64 = 0x5245_4a45;
const OFFLINE: u64 = 0x4f46_464c;
const TRANSIENT: u64 = 0x5452_414e;
const LATENCY: u64 = 0x4c41_5445;
const HANG: u64 = 0x4841_4e47;
const READING: u64 = 0x5245_4144;
const UNHEALTHY: u64 = 0x554e_4845;
const ROLLBACK: u64 = 0x524f_4c4c;
const CANCEL: u64 = 0x4341_4e43;

/// The share of simulated devices that refuse to stop a job they are running when asked to
/// (they finish it anyway).
pub const CANCEL_REFUSE_RATE: f64 = 0.25;

/// Whether `device` refuses a cancel request for a job it is running: a pure function, so
/// tests can predict it.
pub fn refuses_cancel(settings: &SimulatorSettings, device: &str) -> bool {
    unit(settings.seed, device, CANCEL, 0) < CANCEL_REFUSE_RATE
}

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
            hangs: unit(s, device, HANG, 0) < settings.hang_rate,
            unhealthy: unit(s, device, UNHEALTHY, 0) < settings.unhealthy_rate,
            rolls_back: unit(s, device, ROLLBACK, 0) < settings.rollback_rate,
        }
    }
}

/// What a simulated device does with one delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Nothing: it is offline or hung. The sender's timeout fires.
    Silent,
    /// It answers after `after`.
    Reply {
        /// Time the device takes.
        after: Duration,
        /// What it answers.
        outcome: SimOutcome,
    },
}

/// The answer of a simulated device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimOutcome {
    /// It applied the job now.
    Applied,
    /// It had applied this execution before: acknowledged, not re-run.
    AlreadyApplied,
    /// A glitch worth retrying.
    Transient,
    /// A permanent failure.
    Failed,
    /// The job does not fit the device.
    Rejected,
}

/// The decision of `device` on the `delivery`-th (1-based) delivery of `execution`, the
/// `attempt`-th attempt as the sender counts them. `applied` says whether the device applied
/// this execution before; `reboot` whether the job reboots it (slow: `reboot_ms` more).
pub fn decide(
    settings: &SimulatorSettings,
    device: &str,
    execution: &str,
    delivery: u32,
    attempt: u32,
    applied: bool,
    reboot: bool,
) -> Answer {
    let profile = DeviceProfile::for_device(settings, device);
    if profile.hangs || delivery <= profile.offline_attempts {
        return Answer::Silent;
    }
    let mut after = latency(settings, device, attempt);
    let outcome = if applied {
        SimOutcome::AlreadyApplied
    } else if profile.rejects {
        SimOutcome::Rejected
    } else if profile.fails_permanently {
        SimOutcome::Failed
    } else if unit(settings.seed, execution, TRANSIENT, delivery) < settings.transient_failure_rate
    {
        SimOutcome::Transient
    } else {
        if reboot {
            after += Duration::from_millis(settings.reboot_ms);
        }
        SimOutcome::Applied
    };
    Answer::Reply { after, outcome }
}

/// Error text of a simulated device that fails its health check.
pub const UNHEALTHY_REASON: &str = "simulated health check failed: watchdog reset after boot";
/// Error text of a simulated device that rolled itself back.
pub const ROLLBACK_REASON: &str = "simulated A/B fallback: new image did not boot";
/// The version a simulated device falls back to.
pub const PREVIOUS_VERSION: &str = "0.9.0-previous";

/// What a simulated device answers to a health probe after applying `action`: healthy on
/// the action's version (or `applied` for actions without one), unless its profile says it
/// fails its checks or rolls back.
pub fn health(
    settings: &SimulatorSettings,
    device: &str,
    action: &shared::job::Action,
) -> crate::protocol::HealthReport {
    use crate::protocol::{HealthReport, HealthStatus};
    let profile = DeviceProfile::for_device(settings, device);
    let version = match action {
        shared::job::Action::FirmwareUpdate(f) => f.version.clone(),
        _ => "applied".to_owned(),
    };
    if profile.rolls_back {
        HealthReport {
            status: HealthStatus::RolledBack,
            version: Some(PREVIOUS_VERSION.to_owned()),
            reason: Some(ROLLBACK_REASON.to_owned()),
        }
    } else if profile.unhealthy {
        HealthReport {
            status: HealthStatus::Unhealthy,
            version: Some(version),
            reason: Some(UNHEALTHY_REASON.to_owned()),
        }
    } else {
        HealthReport {
            status: HealthStatus::Healthy,
            version: Some(version),
            reason: None,
        }
    }
}

/// Latency of one delivery: the mean plus uniform jitter.
pub fn latency(settings: &SimulatorSettings, device: &str, attempt: u32) -> Duration {
    if settings.latency_ms == 0 && settings.latency_jitter_ms == 0 {
        return Duration::ZERO;
    }
    let u = unit(settings.seed, device, LATENCY, attempt);
    let jitter = (u * 2.0 - 1.0) * settings.latency_jitter_ms as f64;
    Duration::from_millis((settings.latency_ms as f64 + jitter).max(0.0) as u64)
}

/// The readings a simulated device reports for `metrics`: a stable value per (device,
/// metric) between 0 and 100, with two decimals.
pub fn readings(
    settings: &SimulatorSettings,
    device: &str,
    metrics: &[String],
) -> BTreeMap<String, f64> {
    metrics
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let v = unit(settings.seed, device, READING, i as u32) * 100.0;
            (m.clone(), (v * 100.0).round() / 100.0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> SimulatorSettings {
        SimulatorSettings {
            seed: 7,
            trusted_keys: vec![],
            latency_ms: 0,
            latency_jitter_ms: 0,
            transient_failure_rate: 0.0,
            permanent_failure_rate: 0.1,
            reject_rate: 0.05,
            offline_rate: 0.2,
            offline_attempts: 2,
            hang_rate: 0.0,
            unhealthy_rate: 0.0,
            rollback_rate: 0.0,
            reboot_ms: 0,
            record_deliveries: false,
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
        assert_eq!(frac(&|p| p.hangs), 0.0);
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

    #[test]
    fn an_offline_device_answers_once_its_silent_deliveries_are_spent() {
        let s = SimulatorSettings {
            offline_rate: 1.0,
            permanent_failure_rate: 0.0,
            reject_rate: 0.0,
            ..settings()
        };
        assert_eq!(decide(&s, "d", "x", 1, 1, false, false), Answer::Silent);
        assert_eq!(decide(&s, "d", "x", 2, 2, false, false), Answer::Silent);
        assert_eq!(
            decide(&s, "d", "x", 3, 3, false, false),
            Answer::Reply {
                after: Duration::ZERO,
                outcome: SimOutcome::Applied
            }
        );
        assert_eq!(
            decide(&s, "d", "x", 4, 4, true, false),
            Answer::Reply {
                after: Duration::ZERO,
                outcome: SimOutcome::AlreadyApplied
            }
        );
    }

    #[test]
    fn readings_are_stable_per_device_and_metric() {
        let s = settings();
        let m = vec!["temperature".to_owned(), "battery".to_owned()];
        let a = readings(&s, "dev-1", &m);
        assert_eq!(a, readings(&s, "dev-1", &m));
        assert_ne!(a, readings(&s, "dev-2", &m));
        assert!(a.values().all(|v| (0.0..100.0).contains(v)));
    }
}
