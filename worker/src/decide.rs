//! The decisions a handler makes for one delivery, as pure functions: whether to contact the
//! device at all, and what an attempt loop's result means for the task (record a terminal
//! outcome, park it on a delayed-retry queue, hand it back, or give it back uncounted).
//!
//! Owns those rules and nothing else: no I/O, no clock (the caller passes `now`), so each
//! branch is unit-tested here. [`crate::handle`] does the I/O around them.

use std::time::Duration;

use shared::state::{ExecutionState, Readings};

use crate::deliver::Delivered;

/// Why a decoded task cannot be one the planner published, if it cannot: an execution id
/// that is not its job's and device's, a device id no target has, or counters beyond what
/// any job allows (attempts and parkings are at most [`shared::job::MAX_ATTEMPTS`]). Such a
/// task is dead-lettered, never delivered.
pub fn task_refusal(task: &shared::messages::DeviceTask) -> Option<String> {
    if let Err(e) = shared::device::validate_id(&task.device_id) {
        return Some(format!("device id: {e}"));
    }
    if shared::state::execution_id(task.job_id, &task.device_id) != task.execution_id {
        return Some(format!(
            "execution id {} does not belong to job {} and device {:?}",
            task.execution_id, task.job_id, task.device_id
        ));
    }
    let max = shared::job::MAX_ATTEMPTS;
    if task.attempts > max {
        return Some(format!(
            "attempts {}: beyond the largest attempt count a job may have ({max})",
            task.attempts
        ));
    }
    if task.parked > max {
        return Some(format!(
            "parked {} times: beyond the largest attempt count a job may have ({max})",
            task.parked
        ));
    }
    None
}

/// The per-attempt timeout of a job: its own, else the worker's default; never beyond the
/// bound the API enforces (a job stored before the bound existed cannot stall a worker).
pub fn attempt_timeout(job_secs: Option<u64>, default: Duration) -> Duration {
    job_secs.map_or(default, |s| {
        Duration::from_secs(s.clamp(1, shared::job::MAX_ATTEMPT_TIMEOUT_SECS))
    })
}

/// Whether a claimed task is delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Before {
    /// Contact the device.
    Deliver,
    /// Do not: the execution ends now in this state, with this reason.
    Conclude {
        /// Terminal state (CANCELED or TIMED_OUT).
        state: ExecutionState,
        /// Why.
        error: String,
    },
}

/// Before delivering: a job that is no longer live cancels the execution, a passed deadline
/// times it out.
pub fn before_delivery(job_live: bool, deadline_ms: Option<u64>, now_ms: u64) -> Before {
    if !job_live {
        Before::Conclude {
            state: ExecutionState::Canceled,
            error: "job canceled before delivery".into(),
        }
    } else if deadline_ms.is_some_and(|d| now_ms >= d) {
        Before::Conclude {
            state: ExecutionState::TimedOut,
            error: "job deadline passed before delivery".into(),
        }
    } else {
        Before::Deliver
    }
}

/// What becomes of the task after its attempt loop.
#[derive(Debug, Clone, PartialEq)]
pub enum After {
    /// A terminal outcome: store it, report it, ack.
    Conclude {
        /// Terminal state.
        state: ExecutionState,
        /// Attempts made in total.
        attempts: u32,
        /// The last error, if the device did not succeed.
        error: Option<String>,
        /// What the device reported (data retrieval).
        readings: Option<Readings>,
    },
    /// Park the task on delayed-retry queue `queue`; it is due again at `due_ms`.
    Park {
        /// Index of the retry queue.
        queue: usize,
        /// When the next attempt is due (ms since epoch).
        due_ms: u64,
        /// Attempts made in total.
        attempts: u32,
        /// The last error.
        error: String,
    },
    /// The worker is stopping: record the attempts and give the task back to the tasks queue.
    HandBack {
        /// Attempts made in total.
        attempts: u32,
    },
    /// The claim lapsed: forward the task with its attempts, recording nothing (another
    /// worker may hold the device now).
    ClaimLost {
        /// Attempts made in total.
        attempts: u32,
    },
    /// The transport cannot reach devices at all (broker down): give the task back uncounted,
    /// as with any infrastructure trouble.
    Unavailable {
        /// Why.
        error: String,
    },
    /// The device works at its own pace: park the task until it changes its execution, or
    /// `due_ms` (its step timer, bounded by the job's deadline; `None`: no bound).
    Wait {
        /// Attempts made in total.
        attempts: u32,
        /// When to look again without news from the device.
        due_ms: Option<u64>,
        /// What it waits for.
        wait: crate::deliver::DeviceWait,
    },
}

/// After delivering: what the attempt loop's result means, given how often the task was
/// parked already, the retry queues' delays and the job's deadline.
pub fn after_delivery(
    delivered: Delivered,
    parked: u32,
    retry_delays_ms: &[u64],
    deadline_ms: Option<u64>,
    now_ms: u64,
) -> After {
    let conclude = |state, attempts, error: Option<String>| After::Conclude {
        state,
        attempts,
        error,
        readings: None,
    };
    match delivered {
        Delivered::Succeeded { attempts, reply } => After::Conclude {
            state: ExecutionState::Succeeded,
            attempts,
            error: None,
            readings: reply.readings,
        },
        Delivered::Failed { attempts, error } => {
            conclude(ExecutionState::Failed, attempts, Some(error))
        }
        Delivered::Rejected { attempts, error } => {
            conclude(ExecutionState::Rejected, attempts, Some(error))
        }
        Delivered::Canceled { attempts, error } => {
            conclude(ExecutionState::Canceled, attempts, Some(error))
        }
        Delivered::TimedOut { attempts, error } => {
            conclude(ExecutionState::TimedOut, attempts, Some(error))
        }
        Delivered::Park { attempts, error } => {
            let queue = shared::backoff::retry_queue_index(parked, retry_delays_ms.len());
            let delay = retry_delays_ms.get(queue).copied().unwrap_or(0);
            let due_ms = now_ms.saturating_add(delay);
            if deadline_ms.is_some_and(|d| due_ms >= d) {
                conclude(
                    ExecutionState::TimedOut,
                    attempts,
                    Some(format!(
                        "{error}; the job deadline passes before the next attempt"
                    )),
                )
            } else {
                After::Park {
                    queue,
                    due_ms,
                    attempts,
                    error,
                }
            }
        }
        Delivered::Unavailable { error, .. } => After::Unavailable { error },
        Delivered::ClaimLost { attempts } => After::ClaimLost { attempts },
        Delivered::Interrupted { attempts } => After::HandBack { attempts },
        Delivered::Waiting { attempts, wait } => After::Wait {
            attempts,
            due_ms: match (wait.until_ms, deadline_ms) {
                (Some(u), Some(d)) => Some(u.min(d)),
                (u, d) => u.or(d),
            },
            wait,
        },
    }
}

/// How long a claim must last: the worker's lease plus one attempt. Saturates instead of
/// overflowing on absurd timeouts.
pub fn claim_lease(lease: Duration, attempt_timeout: Duration) -> Duration {
    lease.saturating_add(attempt_timeout)
}

#[cfg(test)]
mod refusal_tests {
    use shared::messages::{DeviceTask, WIRE_VERSION};
    use uuid::Uuid;

    use super::*;

    fn task() -> DeviceTask {
        let job_id = Uuid::now_v7();
        DeviceTask {
            version: WIRE_VERSION,
            job_id,
            execution_id: shared::state::execution_id(job_id, "dev-1"),
            device_id: "dev-1".into(),
            attempts: 0,
            parked: 0,
            published_at_ms: 0,
        }
    }

    #[test]
    fn a_planners_task_is_accepted_and_forged_or_extreme_ones_are_refused() {
        assert_eq!(task_refusal(&task()), None);
        let at_bound = DeviceTask {
            attempts: shared::job::MAX_ATTEMPTS,
            parked: shared::job::MAX_ATTEMPTS,
            ..task()
        };
        assert_eq!(task_refusal(&at_bound), None);
        for (t, why) in [
            (
                DeviceTask {
                    attempts: u32::MAX,
                    ..task()
                },
                "attempts",
            ),
            (
                DeviceTask {
                    parked: u32::MAX,
                    ..task()
                },
                "parked",
            ),
            (
                DeviceTask {
                    device_id: "dev-2".into(),
                    ..task()
                },
                "execution id",
            ),
            (
                DeviceTask {
                    device_id: "dev/#".into(),
                    ..task()
                },
                "device id",
            ),
        ] {
            let reason = task_refusal(&t).unwrap_or_default();
            assert!(reason.contains(why), "{t:?}: {reason:?}");
        }
    }

    #[test]
    fn attempt_timeouts_stay_within_their_bound() {
        let d = Duration::from_secs(10);
        assert_eq!(attempt_timeout(None, d), d);
        assert_eq!(attempt_timeout(Some(5), d), Duration::from_secs(5));
        assert_eq!(
            attempt_timeout(Some(u64::MAX), d),
            Duration::from_secs(shared::job::MAX_ATTEMPT_TIMEOUT_SECS)
        );
        assert_eq!(attempt_timeout(Some(0), d), Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver::Reply;

    const NOW: u64 = 1_000_000;

    #[test]
    fn a_canceled_job_is_not_delivered() {
        assert_eq!(
            before_delivery(false, None, NOW),
            Before::Conclude {
                state: ExecutionState::Canceled,
                error: "job canceled before delivery".into()
            }
        );
    }

    #[test]
    fn a_passed_deadline_times_the_execution_out_before_delivery() {
        let b = before_delivery(true, Some(NOW), NOW);
        assert!(matches!(
            b,
            Before::Conclude {
                state: ExecutionState::TimedOut,
                ..
            }
        ));
        assert_eq!(before_delivery(true, Some(NOW + 1), NOW), Before::Deliver);
        assert_eq!(before_delivery(true, None, NOW), Before::Deliver);
    }

    #[test]
    fn device_answers_become_terminal_outcomes_with_their_attempts() {
        let readings = Readings::from([("t".to_owned(), 1.5)]);
        let ok = Delivered::Succeeded {
            attempts: 2,
            reply: Reply {
                readings: Some(readings.clone()),
                health: None,
            },
        };
        assert_eq!(
            after_delivery(ok, 0, &[10], None, NOW),
            After::Conclude {
                state: ExecutionState::Succeeded,
                attempts: 2,
                error: None,
                readings: Some(readings)
            }
        );
        for (d, state) in [
            (
                Delivered::Failed {
                    attempts: 3,
                    error: "e".into(),
                },
                ExecutionState::Failed,
            ),
            (
                Delivered::Rejected {
                    attempts: 3,
                    error: "e".into(),
                },
                ExecutionState::Rejected,
            ),
            (
                Delivered::TimedOut {
                    attempts: 3,
                    error: "e".into(),
                },
                ExecutionState::TimedOut,
            ),
        ] {
            assert_eq!(
                after_delivery(d, 0, &[10], None, NOW),
                After::Conclude {
                    state,
                    attempts: 3,
                    error: Some("e".into()),
                    readings: None
                }
            );
        }
    }

    #[test]
    fn parking_uses_the_queue_of_the_parking_count_and_repeats_the_last() {
        let park = || Delivered::Park {
            attempts: 4,
            error: "offline".into(),
        };
        let delays = [100, 1_000, 10_000];
        for (parked, queue) in [(0, 0), (1, 1), (2, 2), (7, 2)] {
            assert_eq!(
                after_delivery(park(), parked, &delays, None, NOW),
                After::Park {
                    queue,
                    due_ms: NOW + delays[queue],
                    attempts: 4,
                    error: "offline".into()
                }
            );
        }
    }

    #[test]
    fn a_park_that_would_outlive_the_deadline_times_out_instead() {
        let park = Delivered::Park {
            attempts: 4,
            error: "offline".into(),
        };
        match after_delivery(park, 0, &[100], Some(NOW + 100), NOW) {
            After::Conclude {
                state: ExecutionState::TimedOut,
                attempts: 4,
                error: Some(e),
                ..
            } => assert!(e.starts_with("offline; the job deadline"), "{e}"),
            other => panic!("{other:?}"),
        }
        let park = Delivered::Park {
            attempts: 4,
            error: "offline".into(),
        };
        assert!(matches!(
            after_delivery(park, 0, &[100], Some(NOW + 101), NOW),
            After::Park { .. }
        ));
    }

    #[test]
    fn a_device_working_at_its_own_pace_waits_until_its_step_timer_or_the_deadline() {
        let wait = |until_ms| crate::deliver::DeviceWait {
            until_ms,
            started: until_ms.is_some(),
            version: 2,
            why: "IN_PROGRESS".into(),
        };
        let due = |until, deadline| match after_delivery(
            Delivered::Waiting {
                attempts: 0,
                wait: wait(until),
            },
            0,
            &[1],
            deadline,
            NOW,
        ) {
            After::Wait {
                attempts: 0,
                due_ms,
                ..
            } => due_ms,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            due(Some(NOW + 300_000), Some(NOW + 60_000)),
            Some(NOW + 60_000)
        );
        assert_eq!(due(Some(NOW + 300_000), None), Some(NOW + 300_000));
        assert_eq!(due(None, Some(NOW + 60_000)), Some(NOW + 60_000));
        assert_eq!(due(None, None), None);
    }

    #[test]
    fn stopping_lapsed_claims_and_unavailable_transports_hand_the_task_back() {
        assert_eq!(
            after_delivery(Delivered::Interrupted { attempts: 2 }, 0, &[1], None, NOW),
            After::HandBack { attempts: 2 }
        );
        assert_eq!(
            after_delivery(Delivered::ClaimLost { attempts: 3 }, 0, &[1], None, NOW),
            After::ClaimLost { attempts: 3 }
        );
        assert_eq!(
            after_delivery(
                Delivered::Unavailable {
                    attempts: 1,
                    error: "broker down".into()
                },
                0,
                &[1],
                None,
                NOW
            ),
            After::Unavailable {
                error: "broker down".into()
            }
        );
    }

    #[test]
    fn an_absurd_attempt_timeout_saturates_the_lease() {
        let l = claim_lease(Duration::from_secs(30), Duration::from_secs(u64::MAX));
        assert_eq!(l, Duration::MAX);
        assert_eq!(
            claim_lease(Duration::from_secs(30), Duration::from_secs(5)),
            Duration::from_secs(35)
        );
    }
}
