//! The attempt loop: one execution attempted under a timeout per attempt, transient errors
//! retried in-process with exponential backoff and jitter until the budget or the job's
//! attempt limit is spent, the waits racing the shutdown token.

use std::time::Duration;

use backoff::backoff::Backoff;
use shared::config::BackoffSettings;
use tokio_util::sync::CancellationToken;

use super::{
    request::{DeliverError, DeliveryRequest, DeviceWait, Reply},
    transport::Transport,
};

/// How the attempts of one task ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivered {
    /// The device did it.
    Succeeded {
        /// Attempts made in total.
        attempts: u32,
        /// What it answered.
        reply: Reply,
    },
    /// Permanent failure, or the last allowed attempt failed.
    Failed {
        /// Attempts made in total.
        attempts: u32,
        /// The last error.
        error: String,
    },
    /// The job was canceled while the device had its execution: it was withdrawn.
    Canceled {
        /// Attempts made in total.
        attempts: u32,
        /// Why.
        error: String,
    },
    /// The device refused.
    Rejected {
        /// Attempts made in total.
        attempts: u32,
        /// Its reason.
        error: String,
    },
    /// The in-process budget is spent but attempts remain: park the task on a retry queue.
    Park {
        /// Attempts made in total.
        attempts: u32,
        /// The last error.
        error: String,
    },
    /// The job's deadline passed before the device succeeded, or the device's own step
    /// timer ran out.
    TimedOut {
        /// Attempts made in total.
        attempts: u32,
        /// What timed out, and the last error if there was one.
        error: String,
    },
    /// Before a retry, the claim on the execution could not be confirmed as still ours: stop
    /// without contacting the device again and hand the task back.
    ClaimLost {
        /// Attempts made in total.
        attempts: u32,
    },
    /// The transport is down: hand the task back without counting the attempt.
    Unavailable {
        /// Attempts made in total (this one not counted).
        attempts: u32,
        /// Why.
        error: String,
    },
    /// The device works at its own pace and its execution waits in storage: park the task
    /// (this attempt not counted) until the device changes the execution.
    Waiting {
        /// Attempts made in total (this one not counted).
        attempts: u32,
        /// What it waits for.
        wait: DeviceWait,
    },
    /// Shutdown began during a backoff wait: hand the task back.
    Interrupted {
        /// Attempts made in total.
        attempts: u32,
    },
}

/// Limits of one task's attempts.
#[derive(Debug, Clone)]
pub struct AttemptPolicy {
    /// Timeout of each attempt.
    pub attempt_timeout: Duration,
    /// Attempts allowed over the task's life.
    pub max_attempts: u32,
    /// In-process backoff.
    pub backoff: BackoffSettings,
    /// No attempt starts after this time (ms since epoch): the job's deadline.
    pub deadline_ms: Option<u64>,
    /// No attempt starts at or after this time (ms since epoch) either, but the task is not
    /// over: the device's maintenance window closes, and the task goes back to wait for the
    /// next one. Looked at right before each attempt, the first included, so the time
    /// between the check and the device is the transport's own.
    pub pause_at_ms: Option<u64>,
}

/// Where a task stands between two attempts, for [`run`]'s `between_attempts` hook.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Attempts made in total so far.
    pub attempts: u32,
    /// Why the last one failed.
    pub error: String,
    /// When the next attempt is due (ms since epoch).
    pub next_attempt_at_ms: u64,
    /// How long until then.
    pub delay: Duration,
}

/// What the `between_attempts` hook found out about the claim on the execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Still ours, renewed past the next attempt, and the progress recorded.
    Held,
    /// Lapsed: another worker may hold the execution now.
    Lost,
    /// The worker is stopping before the claim could be confirmed.
    Stopping,
}

/// Attempts delivery until success, a final error, the in-process budget, or shutdown.
/// `attempts_before` counts attempts made by earlier holders of the task. After a failed
/// attempt, before waiting for the next, `between_attempts` must record the progress and
/// confirm (and renew past the wait) the claim on the execution, so two workers never deliver
/// it at once and no later holder starts counting from an older number.
pub async fn run<C, CF>(
    transport: &Transport,
    mut req: DeliveryRequest,
    attempts_before: u32,
    policy: &AttemptPolicy,
    shutdown: &CancellationToken,
    metrics: &crate::metrics::Metrics,
    mut between_attempts: C,
) -> Delivered
where
    C: FnMut(Progress) -> CF,
    CF: std::future::Future<Output = Claim>,
{
    let mut backoff = shared::backoff::in_process(&policy.backoff);
    let mut attempts = attempts_before;
    let mut last_error = None;
    loop {
        if policy.deadline_ms.is_some_and(|d| shared::now_ms() >= d) {
            return Delivered::TimedOut {
                attempts,
                error: match last_error {
                    Some(e) => format!("job deadline passed; last error: {e}"),
                    None => "job deadline passed".to_owned(),
                },
            };
        }
        if policy.pause_at_ms.is_some_and(|p| shared::now_ms() >= p) {
            return Delivered::Interrupted { attempts };
        }
        attempts += 1;
        req.attempt = attempts;
        if attempts > attempts_before + 1 {
            metrics.retries.inc();
        }
        let started = std::time::Instant::now();
        let span = tracing::info_span!(
            "deliver",
            device_id = %req.device_id,
            attempt = attempts,
            result = tracing::field::Empty,
        );
        let answer = tracing::Instrument::instrument(
            tokio::time::timeout(policy.attempt_timeout, transport.attempt(&req)),
            span.clone(),
        )
        .await;
        metrics
            .attempt_seconds
            .observe(started.elapsed().as_secs_f64());
        let result = match &answer {
            Ok(Ok(_)) => "ok",
            Ok(Err(DeliverError::Transient(_))) => "transient",
            Ok(Err(DeliverError::Permanent(_))) => "permanent",
            Ok(Err(DeliverError::Rejected(_))) => "rejected",
            Ok(Err(DeliverError::TimedOut(_))) => "step_timeout",
            Ok(Err(DeliverError::Withdrawn(_))) => "withdrawn",
            Ok(Err(DeliverError::Unavailable(_))) => "unavailable",
            Ok(Err(DeliverError::Waiting { .. })) => "waiting",
            Err(_) => "timeout",
        };
        metrics.attempts.with_label_values(&[result]).inc();
        span.record("result", result);
        let error = match answer {
            Ok(Ok(reply)) => return Delivered::Succeeded { attempts, reply },
            Ok(Err(DeliverError::Permanent(e))) => {
                return Delivered::Failed { attempts, error: e };
            }
            Ok(Err(DeliverError::Rejected(e))) => {
                return Delivered::Rejected { attempts, error: e };
            }
            Ok(Err(DeliverError::TimedOut(e))) => {
                return Delivered::TimedOut {
                    attempts,
                    error: format!("device step timed out: {e}"),
                };
            }
            Ok(Err(DeliverError::Withdrawn(error))) => {
                return Delivered::Canceled { attempts, error };
            }
            Ok(Err(DeliverError::Waiting { wait })) => {
                return Delivered::Waiting {
                    attempts: attempts - 1,
                    wait,
                };
            }
            Ok(Err(DeliverError::Unavailable(error))) => {
                return Delivered::Unavailable {
                    attempts: attempts - 1,
                    error,
                };
            }
            Ok(Err(DeliverError::Transient(e))) => e,
            Err(_) => format!("no answer within {} ms", policy.attempt_timeout.as_millis()),
        };
        tracing::debug!(attempt = attempts, %error, "transient delivery error");
        let wait_span = tracing::info_span!("backoff", attempt = attempts);
        last_error = Some(error.clone());
        if attempts >= policy.max_attempts {
            return Delivered::Failed {
                attempts,
                error: format!("{error} (after {attempts} attempts)"),
            };
        }
        let Some(delay) = backoff.next_backoff() else {
            return Delivered::Park { attempts, error };
        };
        let progress = Progress {
            attempts,
            error,
            next_attempt_at_ms: shared::now_ms() + delay.as_millis() as u64,
            delay,
        };
        match between_attempts(progress).await {
            Claim::Held => {}
            Claim::Lost => return Delivered::ClaimLost { attempts },
            Claim::Stopping => return Delivered::Interrupted { attempts },
        }
        tokio::select! {
            // The normal case: wait, then try again.
            _ = tracing::Instrument::instrument(tokio::time::sleep(delay), wait_span) => {}
            // Stopping: no new attempts; the task goes back to the queue.
            _ = shutdown.cancelled() => return Delivered::Interrupted { attempts },
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::Arc;

    use shared::job::JobSpec;
    use uuid::Uuid;

    use std::{collections::VecDeque, sync::Mutex};

    use super::*;

    /// What a scripted device answers to successive attempts (then: success).
    #[derive(Debug, Default)]
    pub(crate) struct Script(Mutex<VecDeque<Option<Result<(), DeliverError>>>>);

    impl Script {
        fn new(answers: Vec<Option<Result<(), DeliverError>>>) -> Self {
            Self(Mutex::new(answers.into()))
        }

        pub(crate) async fn next(&self) -> Result<(), DeliverError> {
            let answer = self.0.lock().expect("script lock").pop_front();
            match answer {
                // None: the device never answers.
                Some(None) => std::future::pending().await,
                Some(Some(r)) => r,
                None => Ok(()),
            }
        }
    }

    fn transient() -> Option<Result<(), DeliverError>> {
        Some(Err(DeliverError::Transient("reset".into())))
    }

    fn request() -> DeliveryRequest {
        let spec: JobSpec = serde_json::from_value(serde_json::json!({
            "target": {"devices": ["d1"]},
            "action": {"type": "reboot"}
        }))
        .expect("spec");
        DeliveryRequest {
            job_id: Uuid::nil(),
            execution_id: Uuid::nil(),
            device_id: "d1".into(),
            spec: Arc::new(spec),
            attempt: 1,
            signed: None,
            health_check: false,
        }
    }

    fn policy(max_attempts: u32, budget_ms: u64) -> AttemptPolicy {
        AttemptPolicy {
            attempt_timeout: Duration::from_secs(5),
            max_attempts,
            backoff: BackoffSettings {
                initial_ms: 100,
                max_ms: 1000,
                multiplier: 2.0,
                randomization: 0.5,
                budget_ms,
            },
            deadline_ms: None,
            pause_at_ms: None,
        }
    }

    async fn run_script(
        answers: Vec<Option<Result<(), DeliverError>>>,
        policy: &AttemptPolicy,
        before: u32,
    ) -> Delivered {
        run_hooked(
            answers,
            policy,
            before,
            &CancellationToken::new(),
            |_| async { Claim::Held },
        )
        .await
    }

    /// [`run_script`] with a shutdown token and a `between_attempts` hook of the test's own.
    async fn run_hooked<C, CF>(
        answers: Vec<Option<Result<(), DeliverError>>>,
        policy: &AttemptPolicy,
        before: u32,
        shutdown: &CancellationToken,
        between_attempts: C,
    ) -> Delivered
    where
        C: FnMut(Progress) -> CF,
        CF: std::future::Future<Output = Claim>,
    {
        let transport = Transport::Scripted(Arc::new(Script::new(answers)));
        run(
            &transport,
            request(),
            before,
            policy,
            shutdown,
            &crate::metrics::Metrics::new(),
            between_attempts,
        )
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn transient_device_errors_are_retried_with_backoff_until_success() {
        let out = run_script(vec![transient(), transient()], &policy(5, 60_000), 0).await;
        assert_eq!(
            out,
            Delivered::Succeeded {
                attempts: 3,
                reply: Reply::default()
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_device_times_out_and_the_timeout_counts_as_an_attempt() {
        let out = run_script(vec![None], &policy(5, 60_000), 0).await;
        assert_eq!(
            out,
            Delivered::Succeeded {
                attempts: 2,
                reply: Reply::default()
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_and_rejections_are_final_at_once() {
        let out = run_script(
            vec![Some(Err(DeliverError::Permanent("bad image".into())))],
            &policy(5, 60_000),
            0,
        )
        .await;
        assert_eq!(
            out,
            Delivered::Failed {
                attempts: 1,
                error: "bad image".into()
            }
        );
        let out = run_script(
            vec![Some(Err(DeliverError::Rejected("hw".into())))],
            &policy(5, 60_000),
            2,
        )
        .await;
        assert_eq!(
            out,
            Delivered::Rejected {
                attempts: 3,
                error: "hw".into()
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unavailable_transport_hands_the_task_back_without_counting_an_attempt() {
        let out = run_script(
            vec![Some(Err(DeliverError::Unavailable("broker down".into())))],
            &policy(5, 60_000),
            2,
        )
        .await;
        assert_eq!(
            out,
            Delivered::Unavailable {
                attempts: 2,
                error: "broker down".into()
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_attempt_limit_counts_attempts_made_by_earlier_holders() {
        let out = run_script(
            vec![transient(), transient(), transient()],
            &policy(4, 60_000),
            2,
        )
        .await;
        match out {
            Delivered::Failed { attempts, error } => {
                assert_eq!(attempts, 4);
                assert!(error.contains("after 4 attempts"), "{error}");
            }
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_spent_in_process_budget_parks_the_task() {
        let out = run_script(vec![transient(), transient()], &policy(10, 0), 0).await;
        assert!(
            matches!(out, Delivered::Park { attempts: 1, .. }),
            "{out:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_during_a_backoff_wait_hands_the_task_back() {
        let token = CancellationToken::new();
        token.cancel();
        let out = run_hooked(
            vec![transient()],
            &policy(5, 60_000),
            0,
            &token,
            |_| async { Claim::Held },
        )
        .await;
        assert_eq!(out, Delivered::Interrupted { attempts: 1 });
    }

    #[tokio::test(start_paused = true)]
    async fn a_lapsed_claim_stops_retries_before_the_device_is_contacted_again() {
        let out = run_hooked(
            vec![transient()],
            &policy(5, 60_000),
            0,
            &CancellationToken::new(),
            |_| async { Claim::Lost },
        )
        .await;
        assert_eq!(out, Delivered::ClaimLost { attempts: 1 });
    }

    #[tokio::test(start_paused = true)]
    async fn progress_is_handed_to_the_hook_before_every_wait_and_a_stop_there_interrupts() {
        let seen = Mutex::new(Vec::new());
        let before = shared::now_ms();
        let out = run_hooked(
            vec![transient(), transient()],
            &policy(10, 60_000),
            3,
            &CancellationToken::new(),
            |p: Progress| {
                seen.lock().expect("lock").push(p.clone());
                async { Claim::Held }
            },
        )
        .await;
        assert_eq!(
            out,
            Delivered::Succeeded {
                attempts: 6,
                reply: Reply::default()
            }
        );
        let seen = seen.into_inner().expect("lock");
        assert_eq!(
            seen.iter().map(|p| p.attempts).collect::<Vec<_>>(),
            vec![4, 5]
        );
        assert!(seen.iter().all(|p| p.error == "reset"), "{seen:?}");
        let after = shared::now_ms();
        assert!(
            seen.iter().all(|p| !p.delay.is_zero()
                && p.next_attempt_at_ms >= before + p.delay.as_millis() as u64
                && p.next_attempt_at_ms <= after + p.delay.as_millis() as u64),
            "the next attempt is due one delay from now: {seen:?}"
        );

        let out = run_hooked(
            vec![transient()],
            &policy(5, 60_000),
            0,
            &CancellationToken::new(),
            |_| async { Claim::Stopping },
        )
        .await;
        assert_eq!(out, Delivered::Interrupted { attempts: 1 });
    }

    #[tokio::test(start_paused = true)]
    async fn only_attempts_after_a_failure_in_this_handler_count_as_retries() {
        for (before, retries) in [(0, 2), (4, 2)] {
            let metrics = crate::metrics::Metrics::new();
            let transport =
                Transport::Scripted(Arc::new(Script::new(vec![transient(), transient()])));
            let out = run(
                &transport,
                request(),
                before,
                &policy(10, 60_000),
                &CancellationToken::new(),
                &metrics,
                |_| async { Claim::Held },
            )
            .await;
            assert_eq!(
                out,
                Delivered::Succeeded {
                    attempts: before + 3,
                    reply: Reply::default()
                }
            );
            assert_eq!(
                metrics.retries.get(),
                retries,
                "after {before} earlier attempts"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_attempt_starts_after_the_deadline() {
        let mut p = policy(5, 60_000);
        p.deadline_ms = Some(shared::now_ms().saturating_sub(1));
        let out = run_script(vec![], &p, 1).await;
        assert_eq!(
            out,
            Delivered::TimedOut {
                attempts: 1,
                error: "job deadline passed".into()
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_attempt_starts_once_the_window_closed_and_the_task_goes_back() {
        let mut p = policy(5, 60_000);
        p.pause_at_ms = Some(shared::now_ms().saturating_sub(1));
        let out = run_script(vec![], &p, 2).await;
        assert_eq!(out, Delivered::Interrupted { attempts: 2 });

        // Closing during the backoff wait: the retry due after it is not made.
        p.pause_at_ms = Some(shared::now_ms() + 20);
        let out = run_hooked(
            vec![transient()],
            &p,
            0,
            &CancellationToken::new(),
            |_| async {
                std::thread::sleep(Duration::from_millis(40));
                Claim::Held
            },
        )
        .await;
        assert_eq!(out, Delivered::Interrupted { attempts: 1 });
    }
}
