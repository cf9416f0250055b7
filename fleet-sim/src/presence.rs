//! Devices that are offline for a while: they announce it on their presence topics
//! (retained, as a real device's last will would), receive nothing, then announce that they
//! are online again. At shutdown their retained announcements are cleared, so a broker shared
//! by several runs keeps none of them.
//!
//! AWS IoT Jobs devices announce nothing: they are simply not connected, receive nothing,
//! and on connecting ask for their next job (`start-next`), as an AWS IoT Device SDK agent
//! does.

use std::{sync::Arc, time::Duration};

use devices::{mqtt::Link, protocol};
use tokio_util::sync::CancellationToken;

use crate::fleet::Fleet;

/// Announces devices `0..n` offline, brings them online after `offline_for`, clears the
/// announcements when `shutdown` fires.
pub(crate) async fn play(
    fleet: Arc<Fleet>,
    link: Link,
    prefix: String,
    n: u64,
    offline_for: Duration,
    aws: bool,
    shutdown: CancellationToken,
) {
    // Give the connection a moment to come up.
    for _ in 0..100 {
        if link.is_connected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !aws {
        announce(&link, &prefix, n, Some(false)).await;
    }
    tracing::info!(devices = n, secs = offline_for.as_secs(), "devices offline");
    tokio::select! {
        _ = tokio::time::sleep(offline_for) => {}
        _ = shutdown.cancelled() => {
            if !aws {
                announce(&link, &prefix, n, None).await;
            }
            return;
        }
    }
    fleet.bring_online();
    for i in 0..n {
        let device = harness_id(i);
        if aws {
            crate::aws::connected(&link, &device).await;
        } else {
            announce_one(&link, &prefix, &device, Some(true)).await;
        }
        fleet.announced_online(&device);
        pace(i).await;
    }
    tracing::info!(devices = n, "devices online");
    shutdown.cancelled().await;
    if !aws {
        announce(&link, &prefix, n, None).await;
    }
}

/// Publishes every device's presence (`None`: clears it).
async fn announce(link: &Link, prefix: &str, n: u64, online: Option<bool>) {
    for i in 0..n {
        announce_one(link, prefix, &harness_id(i), online).await;
        pace(i).await;
    }
}

/// Spreads announcements (100 every 10 ms, 10,000 a second), as devices of a fleet do: a
/// broker queues at most so many messages for a slow subscriber (Mosquitto's
/// `max_queued_messages`, 1000 by default) and drops the rest.
async fn pace(i: u64) {
    if i % 100 == 99 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Publishes one device's presence (`None`: clears it).
async fn announce_one(link: &Link, prefix: &str, device: &str, online: Option<bool>) {
    let payload = match online {
        Some(online) => serde_json::to_vec(&protocol::Presence { online }).unwrap_or_default(),
        None => Vec::new(),
    };
    let topic = protocol::presence_topic(prefix, device);
    if let Err(e) = link.publish_retained(&topic, payload).await {
        tracing::warn!(error.message = %e, %topic, "presence not announced");
    }
}

/// The id of device `i` (as `fleetbatch devices import --generate` names them).
fn harness_id(i: u64) -> String {
    format!("dev-{i:07}")
}
