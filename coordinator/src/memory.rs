//! The Redis memory alarm: planning pauses before Redis is full.
//!
//! Owns reading Redis's memory (`INFO memory`) every few seconds and the alarm gauges. While
//! `used_memory` is at or above `coordinator.redis_memory_high_percent` of `maxmemory`,
//! `fleetbatch_redis_memory_alarm` is 1 and planners publish nothing (they keep their leases
//! and go on when it clears), so a full memory stops new work before it can fail writes in
//! the middle of recording results; results, cancels and deletes go on, and they are what
//! frees memory. Redis must run with `maxmemory-policy noeviction` (a write that does not fit
//! is refused and retried, never a key of a job evicted): any other policy is reported as an
//! error. It never deletes anything itself.

use shared::redis_conn::RedisConn;
use std::{sync::Arc, time::Duration};

use redis::InfoDict;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How often the memory is read.
const EVERY: Duration = Duration::from_secs(2);

/// Whether `used` bytes of a `max` (0: no limit) is at or above `percent` (0: alarm off).
pub fn alarm(used: u64, max: u64, percent: u8) -> bool {
    percent > 0 && max > 0 && u128::from(used) * 100 >= u128::from(max) * u128::from(percent)
}

/// Reads the memory and keeps the gauges and the alarm up to date until `stop` fires.
pub async fn run(
    mut redis: RedisConn,
    metrics: Arc<Metrics>,
    percent: u8,
    stop: CancellationToken,
) {
    let mut policy_seen = String::new();
    loop {
        match redis::cmd("INFO")
            .arg("memory")
            .query_async::<InfoDict>(&mut redis)
            .await
        {
            Ok(info) => {
                let used = info.get::<u64>("used_memory").unwrap_or(0);
                let max = info.get::<u64>("maxmemory").unwrap_or(0);
                let policy = info.get::<String>("maxmemory_policy").unwrap_or_default();
                if policy != policy_seen {
                    if !policy.is_empty() && policy != "noeviction" {
                        tracing::error!(%policy, "Redis may evict job data when its memory is full: run it with maxmemory-policy noeviction");
                    }
                    policy_seen = policy;
                }
                let raised = alarm(used, max, percent);
                let was = metrics.redis_memory_alarm.get() == 1;
                if raised && !was {
                    tracing::error!(
                        used_bytes = used,
                        max_bytes = max,
                        percent,
                        "Redis memory alarm: planning paused until memory goes down"
                    );
                } else if was && !raised {
                    tracing::info!(
                        used_bytes = used,
                        max_bytes = max,
                        "Redis memory alarm cleared: planning goes on"
                    );
                }
                metrics.redis_memory_used.set(saturate(used));
                metrics.redis_memory_max.set(saturate(max));
                metrics.redis_memory_alarm.set(i64::from(raised));
            }
            // Redis unreachable: the alarm stays as it was; planners fail on Redis anyway.
            Err(e) => tracing::debug!(error.message = %e, "reading Redis memory failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.cancelled() => return,
        }
    }
}

fn saturate(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alarm_rises_at_the_percent_of_maxmemory_and_never_without_a_limit() {
        assert!(!alarm(89, 100, 90));
        assert!(alarm(90, 100, 90));
        assert!(alarm(150, 100, 90));
        assert!(!alarm(u64::MAX, 0, 90), "no maxmemory: no alarm");
        assert!(!alarm(100, 100, 0), "0 percent: off");
        assert!(alarm(u64::MAX, u64::MAX, 100), "no overflow");
    }
}
