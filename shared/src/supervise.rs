//! Keeping a service up through broker and Redis outages.
//!
//! Owns the reconnect loop: a service's `build + run` is one attempt; when it fails
//! (connection refused, connection lost, topology not yet declarable) the whole attempt is
//! dropped and started again after an exponential backoff, so connections, channels,
//! consumers and declarations are all rebuilt from scratch. Only a requested stop ends the
//! loop. It never decides what a service does while connected.

use std::{future::Future, time::Duration};

use backoff::{ExponentialBackoffBuilder, backoff::Backoff};
use tokio_util::sync::CancellationToken;

/// An attempt that stayed up this long resets the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// Runs `attempt` until it returns `Ok` (a clean stop) or `stop` fires. Each failure is
/// logged and retried after an exponential backoff (0.5 s doubling to 30 s, with jitter).
///
/// # Errors
/// Never: attempts are retried until `stop` fires, and an attempt that fails after it fired
/// (a connection broken while draining) is logged and counts as a clean stop.
pub async fn with_reconnect<F, Fut>(
    what: &str,
    stop: CancellationToken,
    mut attempt: F,
) -> anyhow::Result<()>
where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut backoff = ExponentialBackoffBuilder::new()
        .with_initial_interval(Duration::from_millis(500))
        .with_max_interval(Duration::from_secs(30))
        .with_multiplier(2.0)
        .with_max_elapsed_time(None)
        .build();
    loop {
        let started = std::time::Instant::now();
        match attempt(stop.clone()).await {
            Ok(()) => return Ok(()),
            // A requested stop is a clean stop, even when the connection broke while the
            // process drained: the broker returns whatever was not acked.
            Err(e) if stop.is_cancelled() => {
                tracing::warn!(
                    error.message = %e,
                    error.cause_chain = %crate::telemetry::chain(e.as_ref()),
                    "{what} stopped with its broker connection broken"
                );
                return Ok(());
            }
            Err(e) => {
                if started.elapsed() > HEALTHY_AFTER {
                    backoff.reset();
                }
                let delay = backoff.next_backoff().unwrap_or(Duration::from_secs(30));
                tracing::warn!(
                    error.message = %e,
                    error.cause_chain = %crate::telemetry::chain(e.as_ref()),
                    retry_in_ms = delay.as_millis() as u64,
                    "{what} lost its connections; reconnecting"
                );
                tokio::select! {
                    // Wait before trying again.
                    _ = tokio::time::sleep(delay) => {}
                    // Asked to stop while disconnected: nothing to drain.
                    _ = stop.cancelled() => return Ok(()),
                }
            }
        }
    }
}
