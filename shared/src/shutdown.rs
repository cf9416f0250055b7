//! The process-wide shutdown trigger.
//!
//! Owns signal handling only; what to do on shutdown belongs to each service's
//! `run_until_stopped`. Kubernetes and other autoscalers scale in with SIGTERM, people press
//! Ctrl-C: both end the same way.

use tokio::signal::unix::{SignalKind, signal as unix_signal};

/// Resolves on the first SIGTERM or SIGINT.
///
/// If the handlers cannot be installed (which only happens when the process is out of file
/// descriptors), it falls back to Ctrl-C alone rather than never resolving.
pub async fn signal() {
    let term = unix_signal(SignalKind::terminate());
    let int = unix_signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                // Autoscalers and process managers.
                _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
                // An operator at a terminal.
                _ = int.recv() => tracing::info!(signal = "SIGINT", "shutdown requested"),
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A token cancelled on the first SIGTERM or SIGINT. A second signal exits the process at
/// once (with status 130): an operator who insists does not wait for the grace period.
pub fn token() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        signal().await;
        t.cancel();
        signal().await;
        tracing::warn!("second signal: exiting without draining");
        std::process::exit(130);
    });
    token
}
