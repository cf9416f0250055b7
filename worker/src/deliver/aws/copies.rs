//! Which copy of a request a worker is looking at, when every worker hears every request (no
//! shared subscription): the n-th identical message within the window has the same number on
//! every worker, so the workers can claim it under one name.
//!
//! Owns the memory of recent requests, kept in two generations of one window each: a request
//! is forgotten between one and two windows after it was last seen, at a constant cost a
//! message. It never talks to Redis.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// Requests seen recently, by hash: how many identical ones in a row, and when last.
#[derive(Debug)]
pub(super) struct Copies {
    window: Duration,
    current: HashMap<u128, (u32, Instant)>,
    previous: HashMap<u128, (u32, Instant)>,
    /// When `current` was started.
    started: Instant,
}

impl Copies {
    pub(super) fn new(window: Duration, now: Instant) -> Self {
        Self {
            window,
            current: HashMap::new(),
            previous: HashMap::new(),
            started: now,
        }
    }

    /// The number of this copy of request `hash` seen at `now` (1 for the first, or for a
    /// request last seen a window or more ago); calls come in arrival order.
    pub(super) fn next(&mut self, hash: u128, now: Instant) -> u32 {
        let age = now.saturating_duration_since(self.started);
        if age >= self.window {
            // Whatever `previous` holds was last seen a window or more ago.
            self.previous = if age >= self.window * 2 {
                HashMap::new()
            } else {
                std::mem::take(&mut self.current)
            };
            self.current.clear();
            self.started = now;
        }
        let last = self
            .current
            .get(&hash)
            .or_else(|| self.previous.get(&hash))
            .copied();
        let count = match last {
            Some((n, at)) if now.saturating_duration_since(at) < self.window => n + 1,
            _ => 1,
        };
        self.current.insert(hash, (count, now));
        count
    }

    /// Requests remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(10);

    #[test]
    fn copies_within_the_window_count_up_and_a_late_repeat_starts_again() {
        let t0 = Instant::now();
        let mut c = Copies::new(W, t0);
        assert_eq!(c.next(1, t0), 1);
        assert_eq!(c.next(2, t0), 1);
        assert_eq!(c.next(1, t0 + Duration::from_secs(9)), 2);
        // Across a generation change: still the same run of copies.
        assert_eq!(c.next(1, t0 + Duration::from_secs(15)), 3);
        assert_eq!(c.next(1, t0 + Duration::from_secs(24)), 4);
        // A window of silence: a new request.
        assert_eq!(c.next(1, t0 + Duration::from_secs(34)), 1);
        assert_eq!(c.next(2, t0 + Duration::from_secs(34)), 1);
    }

    #[test]
    fn requests_are_forgotten_within_two_windows() {
        let t0 = Instant::now();
        let mut c = Copies::new(W, t0);
        for h in 0..10_000u128 {
            c.next(h, t0);
        }
        c.next(1, t0 + W + Duration::from_secs(1));
        assert_eq!(c.next(2, t0 + 2 * W + Duration::from_secs(2)), 1);
        assert!(c.len() <= 2, "{} requests remembered", c.len());
    }
}
