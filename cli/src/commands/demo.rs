//! `fleetbatch demo`: a whole rollout on this machine.
//!
//! Starts a coordinator and workers in a fresh namespace of the configured RabbitMQ and
//! Redis, registers a generated fleet through the API, creates a firmware update for the
//! `fleet` group (old hardware revision D is incompatible and SKIPPED), follows it with a
//! progress bar, prints a summary with the simulator's delivery counts, and removes the
//! namespace's queues and keys. Exits 0 only if every targeted device reached a terminal
//! state and no device applied the job twice. With `--devices-over`, the devices are a
//! `fleet-sim` process reached over MQTT (either protocol) or HTTP instead of the built-in
//! simulator.

use shared::redis_conn::RedisConn;
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{progress, sandbox::Sandbox};

#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Devices in the simulated fleet.
    #[arg(long, default_value_t = 10_000)]
    devices: u64,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Simulated device latency (mean, ms).
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
    /// Print one JSON object with the results as the last line.
    #[arg(long)]
    json: bool,
    /// Settings file for RabbitMQ and Redis URLs (defaults and FLEETBATCH_* apply).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Keep the namespace's queues and keys afterwards.
    #[arg(long)]
    keep: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
    /// How the devices are reached: the built-in simulator, or a `fleet-sim` process over
    /// MQTT with the fleetbatch protocol, over MQTT with the AWS IoT Jobs API, over HTTP/1.1,
    /// or over HTTP/2 without TLS, as to a gateway (MQTT: the broker of the settings, by
    /// default 127.0.0.1:1883).
    #[arg(long, value_enum, default_value = "simulator")]
    devices_over: DevicesOver,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum DevicesOver {
    Simulator,
    Mqtt,
    AwsIotJobs,
    Http,
    Http2,
}

impl DevicesOver {
    /// The workers' settings for reaching the devices this way (`fleet-sim` answers HTTP on
    /// `http_port`).
    pub(crate) fn worker_env(self, http_port: u16) -> Vec<(&'static str, String)> {
        let transport = match self {
            DevicesOver::Simulator => "simulator",
            DevicesOver::Mqtt | DevicesOver::AwsIotJobs => "mqtt",
            DevicesOver::Http | DevicesOver::Http2 => "http",
        };
        let mut env = vec![
            ("FLEETBATCH_WORKER__TRANSPORT", transport.to_owned()),
            (
                "FLEETBATCH_WORKER__HTTP__URL_TEMPLATE",
                format!("http://127.0.0.1:{http_port}/devices/{{device_id}}/jobs"),
            ),
        ];
        if self == DevicesOver::Http2 {
            env.push(("FLEETBATCH_WORKER__HTTP__VERSION", "http2".into()));
        }
        if self == DevicesOver::AwsIotJobs {
            env.push(("FLEETBATCH_WORKER__MQTT__PROTOCOL", "aws-iot-jobs".into()));
            // Agents start the job, then report: allow for the extra round trips.
            env.push(("FLEETBATCH_WORKER__ATTEMPT_TIMEOUT_MS", "5000".into()));
        }
        env
    }

    /// Starts the `fleet-sim` process of `devices` devices these devices need (none for the
    /// built-in simulator); returns its base URL.
    pub(crate) async fn start_fleet_sim(
        self,
        sandbox: &mut Sandbox,
        http_port: u16,
        devices: u64,
    ) -> anyhow::Result<Option<String>> {
        let mqtt = match self {
            DevicesOver::Simulator => return Ok(None),
            DevicesOver::Mqtt => "fleetbatch",
            DevicesOver::AwsIotJobs => "aws-iot-jobs",
            DevicesOver::Http | DevicesOver::Http2 => "none",
        };
        let devices = devices.to_string();
        let base = sandbox
            .cluster
            .start_fleet_sim(http_port, &["--devices", &devices, "--mqtt", mqtt])
            .await?;
        Ok(Some(base))
    }
}

/// The devices' own counts from `fleet-sim` (`/deliveries/{job}` and `/stats`) put into
/// `audit` in place of the built-in simulator's.
pub(crate) async fn fleet_sim_audit(
    redis: &mut RedisConn,
    names: &shared::topology::Names,
    job: uuid::Uuid,
    sim: Option<&str>,
) -> anyhow::Result<harness::audit::Audit> {
    let received: Option<std::collections::HashMap<String, u64>> = match sim {
        Some(sim) => Some(
            reqwest::get(format!("{sim}/deliveries/{job}"))
                .await?
                .json()
                .await?,
        ),
        None => None,
    };
    let mut audit = harness::audit::audit_against(redis, names, job, received.as_ref()).await?;
    if let Some(sim) = sim {
        let stats: Value = reqwest::get(format!("{sim}/stats")).await?.json().await?;
        let n = |k: &str| stats[k].as_u64().unwrap_or(0);
        audit.deliveries = n("deliveries");
        audit.applications = n("applications");
        audit.redundant_deliveries = n("redundant_deliveries");
        audit.duplicate_applications = n("duplicate_applications");
    }
    Ok(audit)
}

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<i32> {
    let http_port = harness::cluster::free_port()?;
    let mut env = vec![
        (
            "FLEETBATCH_SIMULATOR__LATENCY_MS",
            args.latency_ms.to_string(),
        ),
        (
            "FLEETBATCH_SIMULATOR__LATENCY_JITTER_MS",
            (args.latency_ms * 3 / 4).to_string(),
        ),
        (
            "FLEETBATCH_SIMULATOR__TRANSIENT_FAILURE_RATE",
            "0.02".into(),
        ),
        (
            "FLEETBATCH_SIMULATOR__PERMANENT_FAILURE_RATE",
            "0.003".into(),
        ),
        ("FLEETBATCH_SIMULATOR__REJECT_RATE", "0.002".into()),
        ("FLEETBATCH_SIMULATOR__OFFLINE_RATE", "0.001".into()),
        ("FLEETBATCH_SIMULATOR__OFFLINE_ATTEMPTS", "2".into()),
        ("FLEETBATCH_WORKER__ATTEMPT_TIMEOUT_MS", "1000".into()),
    ];
    env.extend(args.devices_over.worker_env(http_port));
    let mut sandbox = Sandbox::start(args.config.as_deref(), "demo", args.workers, &env).await?;
    let fleet_sim = args
        .devices_over
        .start_fleet_sim(&mut sandbox, http_port, args.devices)
        .await?;
    let outcome = rollout(&args, &sandbox, fleet_sim.as_deref()).await;
    sandbox.finish(args.keep).await;
    let summary = outcome?;
    let ok = summary["all_terminal"].as_bool() == Some(true)
        && summary["duplicate_applications"].as_u64() == Some(0);
    if args.json {
        println!("{summary}");
    }
    Ok(if ok { 0 } else { 1 })
}

async fn rollout(
    args: &DemoArgs,
    sandbox: &Sandbox,
    fleet_sim: Option<&str>,
) -> anyhow::Result<Value> {
    sandbox.import_fleet(args.devices).await?;
    let job_id = sandbox
        .create_firmware_job(
            "demo: firmware 2.0.0 to the fleet",
            json!({"compatibility": {"hardware_revisions": ["A", "B", "C"]}}),
        )
        .await?;
    let started = Instant::now();
    let job = progress::follow(
        &sandbox.client,
        &job_id,
        Some(args.devices),
        Duration::from_secs(args.timeout_secs),
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    let mut redis =
        shared::store::connect(&sandbox.settings.redis, sandbox.names.key_prefix()).await?;
    let uuid = uuid::Uuid::parse_str(&job_id)?;
    // Over the network the devices count their deliveries themselves (fleet-sim).
    let audit = fleet_sim_audit(&mut redis, &sandbox.names, uuid, fleet_sim).await?;

    let targeted = progress::count(&job, "targeted");
    eprint!("{}", progress::summary(&job));
    eprintln!(
        "  {:<12} {:>10}\n  {:<12} {:>10}\n  {:<12} {:>10}\n  {:<12} {:>10.1}\n  {:<12} {:>10.0}",
        "deliveries",
        audit.deliveries,
        "applications",
        audit.applications,
        "dup. applied",
        audit.duplicate_applications,
        "seconds",
        seconds,
        "devices/s",
        targeted as f64 / seconds.max(0.001),
    );
    Ok(json!({
        "job_id": job_id,
        "state": job["state"],
        "targeted": targeted,
        "succeeded": progress::count(&job, "succeeded"),
        "failed": progress::count(&job, "failed"),
        "rejected": progress::count(&job, "rejected"),
        "timed_out": progress::count(&job, "timed_out"),
        "canceled": progress::count(&job, "canceled"),
        "skipped": progress::count(&job, "skipped"),
        "all_terminal": audit.lost == 0 && audit.counters_exact && progress::is_finished(&job),
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "devices_per_s": (targeted as f64 / seconds.max(0.001)).round(),
        "deliveries": audit.deliveries,
        "applications": audit.applications,
        "redundant_deliveries": audit.redundant_deliveries,
        "extra_deliveries": audit.extra_deliveries,
        "duplicate_applications": audit.duplicate_applications,
    }))
}
