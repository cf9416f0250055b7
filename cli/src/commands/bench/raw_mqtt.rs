//! The raw MQTT pipeline: the message exchange a device path needs at the least, through the
//! same MQTT broker, with nothing of fleetbatch's (no RabbitMQ, no Redis, no job state): the
//! broker's floor for that path, against which the device-path runs are compared.
//!
//! - fleetbatch protocol: a request to each device, its reply (2 messages a device);
//! - AWS IoT Jobs API: `notify-next`, the device's `start-next`, `start-next/accepted`, its
//!   final `update`, `update/accepted` (5 messages a device).
//!
//! Both sides live in this process, over MQTT 5 at QoS 1 as the product's messages are: the
//! devices and the service side are each spread over [`CONNECTIONS`] connections, each
//! subscribed to its own devices' topics (as `fleet-sim`'s), so that no connection has more
//! messages waiting than a broker queues for one client (Mosquitto: 1,000, beyond which it
//! drops them). A window of devices is under way at once. It never touches fleetbatch's
//! state.

use std::time::{Duration, Instant};

use anyhow::Context;
use devices::mqtt::{self, Link, Message};
use shared::config::MqttSettings;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Connections the devices are spread over, and the service side's.
const CONNECTIONS: u64 = 8;
/// How long the pipeline may go without a device finishing before it is called stalled (a
/// broker dropping messages).
const STALL: Duration = Duration::from_secs(20);

/// Which exchange to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Exchange {
    /// Request and reply.
    Fleetbatch,
    /// The AWS IoT Jobs device API's five messages.
    AwsIotJobs,
}

fn thing(run: &str, n: u64) -> String {
    format!("raw-{run}-{n:07}")
}

fn number(topic: &str) -> Option<u64> {
    let thing = topic.split('/').find(|s| s.starts_with("raw-"))?;
    thing.rsplit('-').next()?.parse().ok()
}

/// The topics the service side listens on for device `n`.
fn service_topics(exchange: Exchange, run: &str, n: u64) -> Vec<String> {
    let t = thing(run, n);
    match exchange {
        Exchange::Fleetbatch => vec![format!("rawbench/{run}/replies/{t}")],
        Exchange::AwsIotJobs => vec![
            format!("$aws/things/{t}/jobs/start-next"),
            format!("$aws/things/{t}/jobs/raw/update"),
        ],
    }
}

/// The topics device `n` listens on.
fn device_topics(exchange: Exchange, run: &str, n: u64) -> Vec<String> {
    let t = thing(run, n);
    match exchange {
        Exchange::Fleetbatch => vec![format!("rawbench/devices/{t}/jobs")],
        Exchange::AwsIotJobs => vec![
            format!("$aws/things/{t}/jobs/notify-next"),
            format!("$aws/things/{t}/jobs/start-next/accepted"),
            format!("$aws/things/{t}/jobs/raw/update/accepted"),
        ],
    }
}

/// Runs `devices` through the exchange with `window` devices under way at once. Returns
/// (devices/s, seconds).
pub(super) async fn raw_mqtt_pipeline(
    settings: &MqttSettings,
    exchange: Exchange,
    devices: u64,
    window: u64,
) -> anyhow::Result<(f64, f64)> {
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    // Both sides: CONNECTIONS connections each, device n on connection n % CONNECTIONS;
    // what a side hears comes in on one channel with the link to answer on.
    let mut service = Vec::new();
    let mut links = Vec::new();
    let (to_service, mut service_rx) = mpsc::channel::<(Link, Message)>(4096);
    let (to_devices, mut device_rx) = mpsc::channel::<(Link, Message)>(4096);
    for (side, topics_of, tx, side_links) in [
        (
            "s",
            service_topics as fn(Exchange, &str, u64) -> Vec<String>,
            &to_service,
            &mut service,
        ),
        ("d", device_topics, &to_devices, &mut links),
    ] {
        for k in 0..CONNECTIONS {
            let topics: Vec<String> = (k..devices)
                .step_by(CONNECTIONS as usize)
                .flat_map(|n| topics_of(exchange, &run, n))
                .collect();
            let (link, mut rx) = mqtt::connect(
                settings,
                &format!("fleetbatch-rawbench-{run}-{side}{k}"),
                topics,
                stop.clone(),
            )?;
            side_links.push(link.clone());
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(m) = rx.recv().await {
                    if tx.send((link.clone(), m)).await.is_err() {
                        return;
                    }
                }
            });
        }
    }
    drop(to_service);
    drop(to_devices);
    // Subscriptions are sent on connecting: wait for every connection, then a moment.
    let ready = Instant::now();
    while !(service.iter().chain(&links).all(Link::is_connected)) {
        anyhow::ensure!(
            ready.elapsed() < Duration::from_secs(60),
            "raw MQTT pipeline: not connected to the MQTT broker"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500) + Duration::from_micros(devices * 10)).await;

    // The devices: answer each message as an agent would, at once.
    let devices_side = {
        let run = run.clone();
        tokio::spawn(async move {
            while let Some((link, m)) = device_rx.recv().await {
                let Some(n) = number(&m.topic) else { continue };
                let t = thing(&run, n);
                let (topic, body) = match exchange {
                    Exchange::Fleetbatch => (
                        format!("rawbench/{run}/replies/{t}"),
                        format!(r#"{{"deviceId":"{t}","status":"SUCCEEDED","readings":{{}}}}"#),
                    ),
                    Exchange::AwsIotJobs if m.topic.ends_with("/notify-next") => (
                        format!("$aws/things/{t}/jobs/start-next"),
                        r#"{"clientToken":"raw"}"#.to_owned(),
                    ),
                    Exchange::AwsIotJobs if m.topic.ends_with("/start-next/accepted") => (
                        format!("$aws/things/{t}/jobs/raw/update"),
                        r#"{"status":"SUCCEEDED","expectedVersion":2,"statusDetails":{},"clientToken":"raw"}"#.to_owned(),
                    ),
                    Exchange::AwsIotJobs => continue,
                };
                let _ = link.publish(&topic, body.into_bytes(), None).await;
            }
        })
    };

    let started = Instant::now();
    let mut next = 0u64;
    let mut done = 0u64;
    let kick = |n: u64| {
        let t = thing(&run, n);
        match exchange {
            Exchange::Fleetbatch => (
                format!("rawbench/devices/{t}/jobs"),
                format!(
                    r#"{{"executionId":"{}","jobId":"raw","deviceId":"{t}","action":{{"type":"firmware_update","version":"2.0.0"}}}}"#,
                    uuid::Uuid::new_v4()
                ),
            ),
            Exchange::AwsIotJobs => (
                format!("$aws/things/{t}/jobs/notify-next"),
                format!(
                    r#"{{"timestamp":1,"execution":{{"jobId":"raw","thingName":"{t}","jobDocument":{{"type":"firmware_update","version":"2.0.0"}},"status":"QUEUED","queuedAt":1,"lastUpdatedAt":1,"versionNumber":1,"executionNumber":1}}}}"#
                ),
            ),
        }
    };
    let on = |n: u64| &service[(n % CONNECTIONS) as usize];
    while next < devices.min(window) {
        let (topic, body) = kick(next);
        on(next).publish(&topic, body.into_bytes(), None).await?;
        next += 1;
    }
    let mut last_progress = Instant::now();
    while done < devices {
        let m = tokio::time::timeout(Duration::from_secs(1), service_rx.recv()).await;
        let (link, m) = match m {
            Ok(Some(m)) => m,
            Ok(None) => anyhow::bail!("raw MQTT pipeline: the service connection closed"),
            Err(_) => {
                anyhow::ensure!(
                    last_progress.elapsed() < STALL,
                    "raw MQTT pipeline stalled at {done} of {devices} devices (the broker dropped messages?)"
                );
                continue;
            }
        };
        let finished = match exchange {
            Exchange::Fleetbatch => true,
            Exchange::AwsIotJobs => {
                let n = number(&m.topic).context("raw MQTT pipeline: a topic without a device")?;
                let t = thing(&run, n);
                let (reply, finished) = if m.topic.ends_with("/start-next") {
                    (format!("$aws/things/{t}/jobs/start-next/accepted"), false)
                } else {
                    (format!("$aws/things/{t}/jobs/raw/update/accepted"), true)
                };
                let body = format!(
                    r#"{{"timestamp":1,"clientToken":"raw","execution":{{"jobId":"raw","thingName":"{t}","status":"IN_PROGRESS","versionNumber":2,"executionNumber":1}}}}"#
                );
                link.publish(&reply, body.into_bytes(), None).await?;
                finished
            }
        };
        if finished {
            done += 1;
            last_progress = Instant::now();
            if next < devices {
                let (topic, body) = kick(next);
                on(next).publish(&topic, body.into_bytes(), None).await?;
                next += 1;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    devices_side.abort();
    Ok((done as f64 / seconds, seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_is_found_again_from_any_of_its_topics() {
        for t in device_topics(Exchange::AwsIotJobs, "ab12cd34", 4711) {
            assert_eq!(number(&t), Some(4711), "{t}");
        }
        assert_eq!(
            number("$aws/things/raw-ab12cd34-0000012/jobs/start-next"),
            Some(12)
        );
        assert_eq!(number("$aws/things/other/jobs/start-next"), None);
    }
}
