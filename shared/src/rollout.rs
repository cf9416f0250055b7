//! How a job reaches its devices: the publishing rate and its exponential ramp, waves with
//! success gates, and the abort criteria (the `rollout` section of a job spec).
//!
//! Owns the rollout part of the spec, its validation, and the pure arithmetic every process
//! must agree on: how many devices each wave takes, whether a gate passes, whether an abort
//! criterion trips, and the rate at a point of the ramp. It never talks to Redis or RabbitMQ;
//! the planner applies these decisions.

use serde::{Deserialize, Serialize};

use crate::{device::AttributeFilter, job::SpecError};

/// The `rollout` section of a job spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// Devices per second the planner publishes at most (unset: the deployment default).
    #[serde(default)]
    pub max_per_second: Option<u32>,
    /// Start slower and speed up: the rate grows by a factor after every step of devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ramp: Option<Ramp>,
    /// At most this many devices with the same value of a tag in delivery at once (e.g. per
    /// site, so one site's uplink is not flooded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<InFlightLimit>,
    /// Ordered waves; none means every target at once (at the rate).
    #[serde(default)]
    pub waves: Vec<Wave>,
    /// Criteria that abort the job when failures pile up.
    #[serde(default)]
    pub abort: Vec<AbortCriterion>,
    /// What follows an abort.
    #[serde(default)]
    pub on_abort: OnAbort,
}

/// A concurrency limit per value of a device tag, across every worker. Devices without the
/// tag are not limited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlightLimit {
    /// The tag (e.g. `site` or `gateway`).
    pub tag: String,
    /// Devices per tag value in delivery at once.
    pub max: u32,
}

/// Largest per-tag concurrency limit.
pub const MAX_IN_FLIGHT: u32 = 100_000;

/// An exponential ramp of the publishing rate: `base_per_second * increment_factor^k` after
/// the k-th step, capped by `max_per_second`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ramp {
    /// Rate at the start, devices per second.
    pub base_per_second: u32,
    /// Factor applied after each step (greater than 1).
    pub increment_factor: f64,
    /// How many devices make a step.
    pub increase_after: RampStep,
}

/// What counts towards a ramp step: exactly one of the two.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RampStep {
    /// Devices published (sent the job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notified: Option<u64>,
    /// Devices that succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub succeeded: Option<u64>,
}

/// One wave: a slice of the targets, contacted only after the previous wave's gate passed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Wave {
    /// A name for reports and events (default `wave-N`, from 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// How many devices the wave takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Or which share of the targets, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// Only devices matching this filter can be in the wave (e.g. `tags.canary = "true"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<AttributeFilter>,
    /// Lowest share of the wave's finished devices that must have SUCCEEDED, in percent.
    #[serde(default = "default_success_threshold")]
    pub success_threshold: f64,
    /// Share of the wave's devices that must be finished before the gate is judged.
    #[serde(default = "default_complete_percent")]
    pub complete_percent: f64,
    /// Seconds to wait after the gate passed before the next wave starts.
    #[serde(default)]
    pub soak_secs: u64,
    /// Whether the next wave waits for an operator's approval.
    #[serde(default)]
    pub approval: Approval,
    /// What a failed gate does.
    #[serde(default)]
    pub on_failure: GateFailure,
    /// The wave's devices are started evenly over this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread_secs: Option<u64>,
}

fn default_success_threshold() -> f64 {
    90.0
}

fn default_complete_percent() -> f64 {
    100.0
}

/// Who lets the next wave start once a gate passed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Approval {
    /// The planner, after the soak.
    #[default]
    Auto,
    /// An operator (`fleetbatch job approve`).
    Manual,
}

/// What a failed gate does to the job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateFailure {
    /// PAUSED, with the reason; `resume` or `approve` lets the next wave start.
    #[default]
    Pause,
    /// ABORTED.
    Abort,
}

/// What follows an abort.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnAbort {
    /// Nothing more.
    #[default]
    Nothing,
    /// A rollback job for the devices that SUCCEEDED or FAILED, with the spec's `rollback`.
    Rollback,
}

/// Which failures an abort criterion counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailureType {
    /// FAILED devices.
    Failed,
    /// REJECTED devices.
    Rejected,
    /// TIMED_OUT devices.
    TimedOut,
    /// UNHEALTHY and ROLLED_BACK devices (jobs with a health confirmation).
    Unhealthy,
    /// All of them.
    Any,
}

/// Abort when at least `min_executed` devices finished and `threshold_percent` of them (or
/// more) ended in the failure type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AbortCriterion {
    /// Which failures count.
    pub failure_type: FailureType,
    /// Share of executed devices, in percent.
    pub threshold_percent: f64,
    /// Executed devices (finished after being contacted) before the criterion is judged.
    #[serde(default)]
    pub min_executed: u64,
}

/// Finished devices of a job or a wave, by outcome: what gates and criteria judge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// SUCCEEDED.
    pub succeeded: u64,
    /// FAILED.
    pub failed: u64,
    /// REJECTED.
    pub rejected: u64,
    /// TIMED_OUT.
    pub timed_out: u64,
    /// UNHEALTHY and ROLLED_BACK: installed, but not healthy after.
    pub unhealthy: u64,
    /// CANCELED.
    pub canceled: u64,
}

impl Tally {
    /// Devices that were contacted and finished (not canceled).
    pub fn executed(&self) -> u64 {
        self.succeeded + self.failed + self.rejected + self.timed_out + self.unhealthy
    }

    /// Every finished device.
    pub fn terminal(&self) -> u64 {
        self.executed() + self.canceled
    }

    fn failures(&self, t: FailureType) -> u64 {
        match t {
            FailureType::Failed => self.failed,
            FailureType::Rejected => self.rejected,
            FailureType::TimedOut => self.timed_out,
            FailureType::Unhealthy => self.unhealthy,
            FailureType::Any => self.failed + self.rejected + self.timed_out + self.unhealthy,
        }
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

impl AbortCriterion {
    /// Why the criterion trips on `tally`, or `None`.
    pub fn trips(&self, tally: &Tally) -> Option<String> {
        let executed = tally.executed();
        if executed == 0 || executed < self.min_executed {
            return None;
        }
        let failures = tally.failures(self.failure_type);
        let share = percent(failures, executed);
        (share >= self.threshold_percent).then(|| {
            format!(
                "abort criterion {} >= {} % after {} executed tripped: {failures} of {executed} executed devices ({share:.1} %)",
                self.failure_type.as_str(),
                self.threshold_percent,
                self.min_executed
            )
        })
    }
}

impl FailureType {
    /// The spec's name.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureType::Failed => "FAILED",
            FailureType::Rejected => "REJECTED",
            FailureType::TimedOut => "TIMED_OUT",
            FailureType::Unhealthy => "UNHEALTHY",
            FailureType::Any => "ANY",
        }
    }
}

/// The verdict of a wave's gate.
#[derive(Debug, Clone, PartialEq)]
pub enum Gate {
    /// Too few of the wave's devices finished to judge.
    Waiting,
    /// The success rate holds.
    Passed,
    /// The success rate is too low: the reason.
    Failed(String),
}

impl Wave {
    /// The name shown for wave `index` (from 0).
    pub fn label(&self, index: usize) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("wave-{}", index + 1))
    }

    /// The gate's verdict on a wave of `size` devices with `tally`.
    pub fn gate(&self, index: usize, size: u64, tally: &Tally) -> Gate {
        let needed = ((size as f64) * self.complete_percent / 100.0).ceil() as u64;
        let terminal = tally.terminal();
        if terminal < needed.min(size) {
            return Gate::Waiting;
        }
        let success = percent(tally.succeeded, terminal);
        if terminal == 0 || success >= self.success_threshold {
            Gate::Passed
        } else {
            Gate::Failed(format!(
                "gate of {} failed: {} of {terminal} finished devices succeeded ({success:.1} % < {} %)",
                self.label(index),
                tally.succeeded,
                self.success_threshold
            ))
        }
    }
}

/// How many devices each wave takes out of `total` sendable targets: counts and percentages
/// in order (a percentage rounds up, so a small fleet still gets a canary), never more than
/// what is left; the last wave takes the rest. Selector waves may end up smaller (fewer
/// devices match); the planner fills them from what matches.
pub fn wave_sizes(waves: &[Wave], total: u64) -> Vec<u64> {
    let mut left = total;
    let mut sizes = Vec::with_capacity(waves.len());
    for (i, w) in waves.iter().enumerate() {
        let want = if i + 1 == waves.len() {
            left
        } else if let Some(c) = w.count {
            c
        } else {
            ((total as f64) * w.percent.unwrap_or(0.0) / 100.0).ceil() as u64
        };
        let size = want.min(left);
        left -= size;
        sizes.push(size);
    }
    sizes
}

impl Rollout {
    /// The publishing rate after `notified` devices were published and `succeeded` succeeded;
    /// `None` when unlimited. `default_max` is the deployment's rate when the spec has none
    /// (0: unlimited).
    pub fn rate(&self, default_max: u32, notified: u64, succeeded: u64) -> Option<f64> {
        let max = self.max_per_second.unwrap_or(default_max);
        let cap = (max > 0).then_some(f64::from(max));
        let Some(ramp) = &self.ramp else {
            return cap;
        };
        let (done, step) = match (ramp.increase_after.notified, ramp.increase_after.succeeded) {
            (Some(n), _) => (notified, n),
            (_, Some(s)) => (succeeded, s),
            _ => return cap,
        };
        let steps = (done / step.max(1)).min(1_000) as i32;
        let r = f64::from(ramp.base_per_second) * ramp.increment_factor.powi(steps);
        Some(cap.map_or(r, |c| r.min(c)))
    }

    /// Checks the section; errors name fields under `rollout`.
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate(&self, max_per_second: u32) -> Result<(), SpecError> {
        let err = |field: String, problem: String| Err(SpecError { field, problem });
        if let Some(r) = self.max_per_second
            && !(1..=max_per_second).contains(&r)
        {
            return err(
                "rollout.max_per_second".into(),
                format!("{r} is not between 1 and {max_per_second}"),
            );
        }
        if let Some(ramp) = &self.ramp {
            if !(1..=max_per_second).contains(&ramp.base_per_second) {
                return err(
                    "rollout.ramp.base_per_second".into(),
                    format!(
                        "{} is not between 1 and {max_per_second}",
                        ramp.base_per_second
                    ),
                );
            }
            if !(ramp.increment_factor > 1.0 && ramp.increment_factor <= 5.0) {
                return err(
                    "rollout.ramp.increment_factor".into(),
                    format!(
                        "{} must be greater than 1 and at most 5",
                        ramp.increment_factor
                    ),
                );
            }
            match (ramp.increase_after.notified, ramp.increase_after.succeeded) {
                (Some(n), None) | (None, Some(n)) if n >= 1 => {}
                _ => {
                    return err(
                        "rollout.ramp.increase_after".into(),
                        "name exactly one of notified or succeeded, at least 1".into(),
                    );
                }
            }
        }
        if let Some(l) = &self.max_in_flight {
            if let Err(p) = crate::device::validate_id(&l.tag) {
                return err("rollout.max_in_flight.tag".into(), p);
            }
            if !(1..=MAX_IN_FLIGHT).contains(&l.max) {
                return err(
                    "rollout.max_in_flight.max".into(),
                    format!("{} is not between 1 and {MAX_IN_FLIGHT}", l.max),
                );
            }
        }
        if self.waves.len() > MAX_WAVES {
            return err(
                "rollout.waves".into(),
                format!("{} waves; at most {MAX_WAVES}", self.waves.len()),
            );
        }
        for (i, w) in self.waves.iter().enumerate() {
            let at = |f: &str| format!("rollout.waves[{i}].{f}");
            let last = i + 1 == self.waves.len();
            match (w.count, w.percent) {
                _ if last && (w.count.is_some() || w.percent.is_some()) => {
                    return err(
                        at(if w.count.is_some() {
                            "count"
                        } else {
                            "percent"
                        }),
                        "the last wave takes every remaining device; leave its size out".into(),
                    );
                }
                _ if last && w.selector.is_some() => {
                    return err(
                        at("selector"),
                        "the last wave takes every remaining device; it has no selector".into(),
                    );
                }
                _ if last => {}
                (Some(_), Some(_)) | (None, None) => {
                    return err(
                        format!("rollout.waves[{i}]"),
                        "give exactly one of count or percent".into(),
                    );
                }
                (Some(0), None) => return err(at("count"), "must be at least 1".into()),
                (None, Some(p)) if !(p > 0.0 && p <= 100.0) => {
                    return err(at("percent"), format!("{p} is not in (0, 100]"));
                }
                _ => {}
            }
            for (field, v) in [
                ("success_threshold", w.success_threshold),
                ("complete_percent", w.complete_percent),
            ] {
                if !(0.0..=100.0).contains(&v) {
                    return err(at(field), format!("{v} is not between 0 and 100"));
                }
            }
            if w.complete_percent <= 0.0 {
                return err(at("complete_percent"), "must be above 0".into());
            }
            if w.soak_secs > MAX_WAIT_SECS {
                return err(at("soak_secs"), format!("at most {MAX_WAIT_SECS}"));
            }
            if let Some(s) = w.spread_secs
                && !(1..=MAX_WAIT_SECS).contains(&s)
            {
                return err(
                    at("spread_secs"),
                    format!("{s} is not between 1 and {MAX_WAIT_SECS}"),
                );
            }
            if let Some(n) = &w.name
                && (n.is_empty() || n.len() > 64)
            {
                return err(at("name"), "must be 1 to 64 bytes".into());
            }
        }
        for (i, a) in self.abort.iter().enumerate() {
            if !(a.threshold_percent > 0.0 && a.threshold_percent <= 100.0) {
                return err(
                    format!("rollout.abort[{i}].threshold_percent"),
                    format!("{} is not in (0, 100]", a.threshold_percent),
                );
            }
        }
        Ok(())
    }
}

/// Most waves one job may have.
pub const MAX_WAVES: usize = 32;
/// Longest soak or spread, in seconds: a week.
pub const MAX_WAIT_SECS: u64 = 7 * 86_400;

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(count: Option<u64>, percent: Option<f64>) -> Wave {
        Wave {
            count,
            percent,
            success_threshold: 90.0,
            complete_percent: 100.0,
            ..Default::default()
        }
    }

    #[test]
    fn waves_take_counts_and_rounded_up_percentages_and_the_last_takes_the_rest() {
        let waves = [
            wave(Some(50), None),
            wave(None, Some(10.0)),
            wave(None, None),
        ];
        assert_eq!(wave_sizes(&waves, 20_000), vec![50, 2_000, 17_950]);
        // A tiny fleet still gets a canary of one, and nothing is taken twice.
        assert_eq!(wave_sizes(&waves, 7), vec![7, 0, 0]);
        assert_eq!(
            wave_sizes(&[wave(None, Some(1.0)), wave(None, None)], 7),
            vec![1, 6]
        );
        assert_eq!(wave_sizes(&waves, 0), vec![0, 0, 0]);
    }

    #[test]
    fn a_gate_waits_for_its_share_then_judges_the_success_rate() {
        let w = Wave {
            complete_percent: 90.0,
            success_threshold: 95.0,
            ..wave(Some(100), None)
        };
        let t = |succeeded, failed| Tally {
            succeeded,
            failed,
            ..Tally::default()
        };
        assert_eq!(w.gate(0, 100, &t(80, 9)), Gate::Waiting);
        assert_eq!(w.gate(0, 100, &t(86, 4)), Gate::Passed);
        match w.gate(0, 100, &t(85, 5)) {
            Gate::Failed(reason) => {
                assert!(reason.contains("wave-1"), "{reason}");
                assert!(reason.contains("85 of 90"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // An empty wave passes at once.
        assert_eq!(w.gate(0, 0, &Tally::default()), Gate::Passed);
    }

    #[test]
    fn an_abort_criterion_trips_at_its_threshold_once_enough_devices_executed() {
        let c = AbortCriterion {
            failure_type: FailureType::Failed,
            threshold_percent: 10.0,
            min_executed: 500,
        };
        let t = |succeeded, failed, rejected| Tally {
            succeeded,
            failed,
            rejected,
            ..Tally::default()
        };
        assert_eq!(c.trips(&t(300, 199, 0)), None, "too few executed");
        assert_eq!(
            c.trips(&t(460, 40, 100)),
            None,
            "rejections are not failures"
        );
        let reason = c.trips(&t(450, 50, 0)).expect("10 % of 500");
        assert!(reason.contains("50 of 500"), "{reason}");
        let any = AbortCriterion {
            failure_type: FailureType::Any,
            ..c.clone()
        };
        assert!(any.trips(&t(450, 25, 25)).is_some());
        assert!(any.trips(&t(460, 20, 20)).is_none());
        // Canceled devices were never executed.
        let canceled = Tally {
            succeeded: 10,
            failed: 10,
            canceled: 10_000,
            ..Tally::default()
        };
        assert!(
            AbortCriterion {
                min_executed: 20,
                ..c
            }
            .trips(&canceled)
            .is_some()
        );
    }

    #[test]
    fn the_ramp_multiplies_per_step_up_to_the_cap() {
        let r = Rollout {
            max_per_second: Some(100),
            ramp: Some(Ramp {
                base_per_second: 10,
                increment_factor: 2.0,
                increase_after: RampStep {
                    notified: Some(50),
                    succeeded: None,
                },
            }),
            ..Rollout::default()
        };
        assert_eq!(r.rate(0, 0, 0), Some(10.0));
        assert_eq!(r.rate(0, 49, 0), Some(10.0));
        assert_eq!(r.rate(0, 50, 0), Some(20.0));
        assert_eq!(r.rate(0, 150, 0), Some(80.0));
        assert_eq!(r.rate(0, 200, 0), Some(100.0));
        assert_eq!(Rollout::default().rate(0, 5, 5), None);
        assert_eq!(Rollout::default().rate(500, 5, 5), Some(500.0));
    }

    #[test]
    fn bad_rollouts_are_refused_naming_the_field() {
        let cases: Vec<(Rollout, &str)> = vec![
            (
                Rollout {
                    waves: vec![wave(Some(5), Some(1.0)), wave(None, None)],
                    ..Rollout::default()
                },
                "rollout.waves[0]",
            ),
            (
                Rollout {
                    waves: vec![wave(Some(5), None), wave(Some(5), None)],
                    ..Rollout::default()
                },
                "rollout.waves[1].count",
            ),
            (
                Rollout {
                    waves: vec![wave(None, Some(120.0)), wave(None, None)],
                    ..Rollout::default()
                },
                "rollout.waves[0].percent",
            ),
            (
                Rollout {
                    waves: vec![
                        Wave {
                            success_threshold: 101.0,
                            ..wave(Some(1), None)
                        },
                        wave(None, None),
                    ],
                    ..Rollout::default()
                },
                "rollout.waves[0].success_threshold",
            ),
            (
                Rollout {
                    abort: vec![AbortCriterion {
                        failure_type: FailureType::Any,
                        threshold_percent: 0.0,
                        min_executed: 1,
                    }],
                    ..Rollout::default()
                },
                "rollout.abort[0].threshold_percent",
            ),
            (
                Rollout {
                    ramp: Some(Ramp {
                        base_per_second: 1,
                        increment_factor: 2.0,
                        increase_after: RampStep::default(),
                    }),
                    ..Rollout::default()
                },
                "rollout.ramp.increase_after",
            ),
        ];
        for (r, field) in cases {
            let e = r.validate(1_000).expect_err(field);
            assert_eq!(e.field, field, "{e}");
        }
    }
}
