//! `fleetbatch demo`: a whole rollout on this machine.
//!
//! Starts a coordinator and workers (child processes) in a fresh namespace of the configured
//! RabbitMQ and Redis, registers a generated fleet through the API, creates a firmware update
//! for the `fleet` group (old hardware revision D is incompatible and SKIPPED), follows it
//! with a progress bar, prints a summary with the simulator's delivery counts, and removes
//! the namespace's queues and keys. Exits 0 only if every targeted device reached a terminal
//! state and no device applied the job twice.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context;
use coordinator::{fleet, local::Cluster};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use redis::AsyncCommands;
use serde_json::{Value, json};
use shared::{config::Settings, topology::Names};

use crate::{client::Client, progress};

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
}

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<i32> {
    let settings = Settings::load(args.config.as_deref()).context("loading settings")?;
    let namespace = format!("demo-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let log_dir = std::env::temp_dir().join(format!("fleetbatch-{namespace}"));
    let env = vec![
        ("FLEETBATCH_NAMESPACE".into(), namespace.clone()),
        ("FLEETBATCH_AMQP__URL".into(), settings.amqp.url.clone()),
        ("FLEETBATCH_REDIS__URL".into(), settings.redis.url.clone()),
        ("FLEETBATCH_AMQP__QUEUE_EXPIRES_MS".into(), "3600000".into()),
        (
            "FLEETBATCH_SIMULATOR__LATENCY_MS".into(),
            args.latency_ms.to_string(),
        ),
        (
            "FLEETBATCH_SIMULATOR__LATENCY_JITTER_MS".into(),
            (args.latency_ms * 3 / 4).to_string(),
        ),
        (
            "FLEETBATCH_SIMULATOR__TRANSIENT_FAILURE_RATE".into(),
            "0.02".into(),
        ),
        (
            "FLEETBATCH_SIMULATOR__PERMANENT_FAILURE_RATE".into(),
            "0.003".into(),
        ),
        ("FLEETBATCH_SIMULATOR__REJECT_RATE".into(), "0.002".into()),
        ("FLEETBATCH_SIMULATOR__OFFLINE_RATE".into(), "0.001".into()),
        ("FLEETBATCH_SIMULATOR__OFFLINE_ATTEMPTS".into(), "2".into()),
        (
            "FLEETBATCH_WORKER__ATTEMPT_TIMEOUT_MS".into(),
            "1000".into(),
        ),
        (
            "RUST_LOG".into(),
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        ),
    ];
    eprintln!(
        "fleetbatch demo: namespace {namespace}, logs in {}",
        log_dir.display()
    );
    let mut cluster = Cluster::new(coordinator::local::bin_dir()?, log_dir, env)?;
    let outcome = rollout(&args, &settings, &Names::new(&namespace), &mut cluster).await;
    cluster.stop_all(Duration::from_secs(30)).await;
    if !args.keep
        && let Err(e) = cleanup(&settings, &namespace).await
    {
        eprintln!("fleetbatch demo: cleanup of {namespace} failed: {e:#}");
    }
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
    settings: &Settings,
    names: &Names,
    cluster: &mut Cluster,
) -> anyhow::Result<Value> {
    cluster.start_coordinator().await?;
    for _ in 0..args.workers {
        cluster.start_worker()?;
    }
    let client = Client::new(&cluster.api)?;

    eprintln!("registering {} simulated devices...", args.devices);
    let t = Instant::now();
    let report: Value = client
        .post(
            "/v1/devices/import?format=ndjson",
            "application/x-ndjson",
            fleet::ndjson(args.devices),
        )
        .await?;
    eprintln!(
        "registered {} devices in {:.1}s",
        report["imported"],
        t.elapsed().as_secs_f64()
    );

    let spec = json!({
        "name": "demo: firmware 2.0.0 to the fleet",
        "target": {"groups": ["fleet"]},
        "action": {
            "type": "firmware_update",
            "url": "https://firmware.example.com/gw/2.0.0.bin",
            "version": "2.0.0",
            "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        },
        "compatibility": {"hardware_revisions": ["A", "B", "C"]},
        "retry": {"max_attempts": 5}
    });
    let created: Value = client
        .post("/v1/jobs", "application/json", spec.to_string())
        .await?;
    let job_id = created["job_id"].as_str().context("no job id")?.to_owned();
    eprintln!("job {job_id} created");
    let started = Instant::now();
    let job = progress::follow(
        &client,
        &job_id,
        Some(args.devices),
        Duration::from_secs(args.timeout_secs),
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();

    let mut redis = shared::store::connect(&settings.redis).await?;
    let job_uuid = uuid::Uuid::parse_str(&job_id)?;
    let totals: std::collections::HashMap<String, u64> =
        redis.hgetall(names.sim_totals(job_uuid)).await?;
    let t = |k: &str| totals.get(k).copied().unwrap_or(0);

    let targeted = progress::count(&job, "targeted");
    let terminal = progress::count(&job, "terminal");
    eprint!("{}", progress::summary(&job));
    eprintln!(
        "  {:<12} {:>10}\n  {:<12} {:>10}\n  {:<12} {:>10}\n  {:<12} {:>10.1}\n  {:<12} {:>10.0}",
        "deliveries",
        t("deliveries"),
        "applications",
        t("applications"),
        "dup. applied",
        t("duplicate_applications"),
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
        "all_terminal": targeted == terminal && progress::is_finished(&job),
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "devices_per_s": (targeted as f64 / seconds.max(0.001)).round(),
        "deliveries": t("deliveries"),
        "applications": t("applications"),
        "redundant_deliveries": t("redundant_deliveries"),
        "duplicate_applications": t("duplicate_applications"),
    }))
}

/// Deletes the namespace's queues, exchanges and Redis keys.
async fn cleanup(settings: &Settings, namespace: &str) -> anyhow::Result<()> {
    let names = Names::new(namespace);
    let conn = shared::amqp::connect(&settings.amqp, "fleetbatch-demo-cleanup").await?;
    let ch = conn.create_channel().await?;
    let mut queues = vec![
        names.tasks_queue(),
        names.results_queue(),
        names.dead_queue(),
    ];
    queues.extend((0..settings.worker.retry_delays_ms.len()).map(|n| names.retry_queue(n)));
    for q in queues {
        ch.queue_delete(q.into(), QueueDeleteOptions::default())
            .await?;
    }
    for e in [
        names.tasks_exchange(),
        names.results_exchange(),
        names.dead_exchange(),
        names.control_exchange(),
    ] {
        ch.exchange_delete(e.into(), ExchangeDeleteOptions::default())
            .await?;
    }
    let _ = conn.close(200, "done".into()).await;
    let mut redis = shared::store::connect(&settings.redis).await?;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{namespace}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut redis)
            .await?;
        if !keys.is_empty() {
            let _: i64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut redis)
                .await?;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    Ok(())
}
