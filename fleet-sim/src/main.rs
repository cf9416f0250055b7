//! `fleet-sim`: plays a fleet of simulated devices over the network, so a fleetbatch
//! deployment can be run end to end without hardware.
//!
//! The devices speak the fleetbatch device protocol over MQTT, or the AWS IoT Jobs device API
//! over MQTT (`worker.mqtt.protocol` of the same settings the workers read, or `--mqtt`), and
//! the fleetbatch protocol over HTTP/1.1 or HTTP/2 (`POST /devices/{id}/jobs` on `--listen`).
//! They behave as `simulator.*` says (latency, transient and permanent failures, rejections,
//! offline devices, hangs, slow reboots), apply each execution once, and report what they saw on
//! `GET /stats`, `GET /devices/{id}` and `GET /readings/{job}`.
//!
//! Layout: [`fleet`] (device memory), [`plain`] (fleetbatch protocol), [`aws`] (AWS IoT Jobs
//! agent), [`presence`] (devices going offline and coming back), [`http`] (HTTP devices
//! and the report endpoints).

mod aws;
mod fleet;
mod http;
mod plain;
mod presence;

use std::{path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use shared::config::DeviceProtocol;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum MqttMode {
    /// The fleetbatch device protocol.
    Fleetbatch,
    /// The AWS IoT Jobs device API.
    AwsIotJobs,
    /// No MQTT: HTTP devices only.
    None,
}

/// Plays simulated devices over MQTT and HTTP.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Settings file (the deployment's: `worker.mqtt` and `simulator` are read from it);
    /// defaults to $FLEETBATCH_CONFIG, then built-ins. FLEETBATCH_* variables apply too.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Devices played: dev-0000000 .. dev-{N-1}, as `fleetbatch devices import --generate`
    /// registers them. 0 plays any device id.
    #[arg(long, default_value_t = 100_000)]
    devices: u64,
    /// Protocol on MQTT (default: the settings' `worker.mqtt.protocol`).
    #[arg(long, value_enum)]
    mqtt: Option<MqttMode>,
    /// Play the first N devices as offline over MQTT: each announces `{"online":false}`
    /// (retained) on its presence topic at start, receives nothing, and after
    /// `--offline-secs` announces `{"online":true}` and answers from then on.
    #[arg(long, default_value_t = 0)]
    offline: u64,
    /// How long the `--offline` devices stay offline.
    #[arg(long, default_value_t = 60)]
    offline_secs: u64,
    /// MQTT connections the devices share. A broker queues a bounded number of messages for
    /// one slow client and drops the rest (Mosquitto: `max_queued_messages`, 1,000), which
    /// one connection for a whole fleet under load reaches. With more than one, the
    /// fleetbatch protocol's topics are shared subscriptions (`$share/...`), and AWS IoT
    /// Jobs devices (`--devices` above 0) are split between the connections, each
    /// subscribing to its own things' topics (Mosquitto does not share `$aws/...` topics).
    #[arg(long, default_value_t = 8)]
    mqtt_connections: u16,
    /// Address of the HTTP devices and the report endpoints.
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: String,
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("fleet-sim: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings =
        shared::config::Settings::load(args.config.as_deref()).context("loading settings")?;
    let id = format!("fleet-sim-{}", std::process::id());
    let _telemetry = shared::telemetry::init("fleet-sim", &id, &settings.telemetry)
        .context("setting up telemetry")?;
    let shutdown = shared::shutdown::token();
    let fleet = Arc::new(
        fleet::Fleet::new(settings.simulator.clone(), args.devices)
            .trusting(&settings.simulator.trusted_keys)
            .map_err(|e| anyhow::anyhow!("simulator.trusted_keys: {e}"))?,
    );

    let mqtt = &settings.worker.mqtt;
    let mode = args.mqtt.unwrap_or(match mqtt.protocol {
        DeviceProtocol::Fleetbatch => MqttMode::Fleetbatch,
        DeviceProtocol::AwsIotJobs => MqttMode::AwsIotJobs,
    });
    let subscriptions = match mode {
        MqttMode::Fleetbatch => vec![
            devices::protocol::request_filter(&mqtt.topic_prefix),
            devices::protocol::cancel_filter(&mqtt.topic_prefix),
        ],
        MqttMode::AwsIotJobs => aws::subscriptions(),
        MqttMode::None => vec![],
    };
    // Further connections beside the first: the fleetbatch protocol's topics are shared
    // subscriptions; AWS IoT Jobs devices (a fleet of known size) are split between the
    // connections, each subscribing to its own things' topics.
    let connections = u64::from(args.mqtt_connections.max(1));
    let split_things = mode == MqttMode::AwsIotJobs && connections > 1 && args.devices > 0;
    let extra = match mode {
        MqttMode::Fleetbatch => connections - 1,
        MqttMode::AwsIotJobs if split_things => connections - 1,
        _ => 0,
    };
    let devices = args.devices;
    let subscriptions_of = |k: u64| -> devices::mqtt::Subscriptions {
        if split_things {
            // Made at each (re)subscription, not kept: hundreds of bytes a device otherwise.
            devices::mqtt::Subscriptions {
                made: Some(devices::mqtt::MadeFilters(Arc::new(move || {
                    aws::subscriptions_of(
                        (k..devices)
                            .step_by(connections as usize)
                            .map(|i| format!("dev-{i:07}")),
                    )
                }))),
                ..Default::default()
            }
        } else if extra > 0 {
            subscriptions
                .iter()
                .map(|f| format!("$share/{id}/{f}"))
                .collect::<Vec<_>>()
                .into()
        } else {
            subscriptions.clone().into()
        }
    };
    let working = plain::Working::default();
    if mode != MqttMode::None {
        for k in 0..=extra {
            let client = if k == 0 {
                id.clone()
            } else {
                format!("{id}-{k}")
            };
            let (link, messages) =
                devices::mqtt::connect(mqtt, &client, subscriptions_of(k), shutdown.clone())
                    .context("connecting to the MQTT broker")?;
            if k == 0 && args.offline > 0 {
                fleet.set_offline(args.offline);
                tokio::spawn(presence::play(
                    fleet.clone(),
                    link.clone(),
                    mqtt.topic_prefix.clone(),
                    args.offline,
                    std::time::Duration::from_secs(args.offline_secs),
                    mode == MqttMode::AwsIotJobs,
                    shutdown.clone(),
                ));
            }
            let serve = match mode {
                MqttMode::Fleetbatch => tokio::spawn(plain::serve(
                    fleet.clone(),
                    link,
                    messages,
                    mqtt.topic_prefix.clone(),
                    working.clone(),
                    shutdown.clone(),
                )),
                _ => tokio::spawn(aws::serve(fleet.clone(), link, messages, shutdown.clone())),
            };
            drop(serve);
        }
    }

    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let address = listener.local_addr()?;
    // One line for scripts and tests: where the fleet listens.
    println!(
        "{}",
        serde_json::json!({"listening": address.to_string(), "devices": args.devices, "mqtt": format!("{mode:?}")})
    );
    tracing::info!(%address, devices = args.devices, mqtt = ?mode, "fleet-sim ready");
    http::serve(listener, fleet.clone(), shutdown.clone()).await;
    println!("{}", serde_json::to_string(&*fleet.totals())?);
    Ok(())
}
