//! Retry policies, all from the `backoff` crate: how long to wait before the next attempt.
//!
//! Owns the device retry arithmetic (the loop that sleeps lives in the worker's `deliver`
//! module) and [`until_ok`], the one loop that waits out an outage of Redis or of a peer
//! (recording results, planning, holding claims).
//! In-process delays come from the `backoff` crate's exponential policy with jitter; once the
//! in-process budget is spent, the task is parked on a broker retry queue whose delay grows
//! with the number of times it was parked.

use std::time::Duration;

use backoff::{ExponentialBackoff, ExponentialBackoffBuilder};

use crate::config::BackoffSettings;

/// A fresh exponential policy for one delivery: delays start at `initial_ms`, grow by
/// `multiplier` up to `max_ms`, each drawn with `randomization` jitter, and the policy gives
/// up (returns `None` from `next_backoff`) once `budget_ms` has elapsed.
pub fn in_process(settings: &BackoffSettings) -> ExponentialBackoff {
    ExponentialBackoffBuilder::new()
        .with_initial_interval(Duration::from_millis(settings.initial_ms))
        .with_max_interval(Duration::from_millis(settings.max_ms))
        .with_multiplier(settings.multiplier)
        .with_randomization_factor(settings.randomization)
        .with_max_elapsed_time(Some(Duration::from_millis(settings.budget_ms)))
        .build()
}

/// A policy for waiting out an outage: `initial` doubling up to `max`, with ±50 % jitter,
/// never giving up on its own.
pub fn outage(initial: Duration, max: Duration) -> ExponentialBackoff {
    ExponentialBackoffBuilder::new()
        .with_initial_interval(initial)
        .with_max_interval(max)
        .with_multiplier(2.0)
        .with_max_elapsed_time(None)
        .build()
}

/// Why [`until_ok`] gave up: the stop signal fired, while trying or while waiting.
#[derive(Debug)]
pub struct Stopped<E> {
    /// The last error seen.
    pub last_error: E,
}

/// Runs `op` until it succeeds, waiting the next delay of `policy` after each failure
/// (`on_error` is told the error and the delay, to log it). Gives up only when `stop` fires.
///
/// # Errors
/// [`Stopped`] with the last error when `stop` fired first.
pub async fn until_ok<T, E, F, Fut>(
    mut policy: ExponentialBackoff,
    stop: &tokio_util::sync::CancellationToken,
    mut op: F,
    mut on_error: impl FnMut(&E, Duration),
) -> Result<T, Stopped<E>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    use backoff::backoff::Backoff;
    loop {
        let last_error = match op().await {
            Ok(done) => return Ok(done),
            Err(e) => e,
        };
        if stop.is_cancelled() {
            return Err(Stopped { last_error });
        }
        let delay = policy.next_backoff().unwrap_or(policy.max_interval);
        on_error(&last_error, delay);
        tokio::select! {
            // Wait before trying again.
            _ = tokio::time::sleep(delay) => {}
            // Asked to stop while waiting.
            _ = stop.cancelled() => return Err(Stopped { last_error }),
        }
    }
}

/// Index of the broker retry queue for a task parked `parked` times before (0-based): the
/// n-th parking uses the n-th delay and the last delay repeats.
pub fn retry_queue_index(parked: u32, levels: usize) -> usize {
    (parked as usize).min(levels.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use backoff::backoff::Backoff;

    fn settings() -> BackoffSettings {
        BackoffSettings {
            initial_ms: 100,
            max_ms: 1000,
            multiplier: 2.0,
            randomization: 0.5,
            budget_ms: 60_000,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn until_ok_retries_until_success_and_stops_on_request() {
        let stop = tokio_util::sync::CancellationToken::new();
        let mut calls = 0;
        let mut waits = Vec::new();
        let r: Result<u32, Stopped<&str>> = until_ok(
            outage(Duration::from_millis(100), Duration::from_secs(1)),
            &stop,
            || {
                calls += 1;
                let n = calls;
                async move { if n < 4 { Err("down") } else { Ok(n) } }
            },
            |_, d| waits.push(d),
        )
        .await;
        assert_eq!(r.expect("succeeds"), 4);
        assert_eq!(waits.len(), 3);
        assert!(waits[2] > waits[0], "delays grow: {waits:?}");
        assert!(waits.iter().all(|d| *d <= Duration::from_millis(1500)));
        stop.cancel();
        let r: Result<(), Stopped<&str>> = until_ok(
            outage(Duration::from_millis(100), Duration::from_secs(1)),
            &stop,
            || async { Err("down") },
            |_, _| {},
        )
        .await;
        assert_eq!(r.expect_err("stopped").last_error, "down");
    }

    #[test]
    fn delays_grow_within_jitter_and_are_capped() {
        let mut b = in_process(&settings());
        let mut nominal = 100.0_f64;
        for _ in 0..8 {
            let d = b.next_backoff().expect("within budget").as_millis() as f64;
            assert!(
                d >= nominal * 0.5 - 1.0 && d <= nominal * 1.5 + 1.0,
                "{d} vs {nominal}"
            );
            nominal = (nominal * 2.0).min(1000.0);
        }
    }

    #[test]
    fn retry_queues_are_used_in_order_and_the_last_repeats() {
        assert_eq!(retry_queue_index(0, 3), 0);
        assert_eq!(retry_queue_index(2, 3), 2);
        assert_eq!(retry_queue_index(9, 3), 2);
    }
}
