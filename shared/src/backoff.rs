//! The retry policy as pure functions: how long to wait before the next attempt.
//!
//! Owns the arithmetic only; the loop that sleeps lives in the worker's `deliver` module.
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
