//! `fleetbatch chaos`: a rollout while processes are killed.
//!
//! Runs a job on a simulated fleet with latency, transient failures and offline devices while
//! SIGKILLing a worker every few seconds (and starting a replacement) and SIGKILLing and
//! restarting the coordinator once, then audits the job and prints one JSON line:
//! `lost`, `duplicate_applications`, `extra_deliveries` (with the bound the kills allow),
//! `counters_exact`. Exits non-zero if any check fails.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::{progress, sandbox::Sandbox};

#[derive(Debug, clap::Args)]
pub(crate) struct ChaosArgs {
    /// Devices in the simulated fleet.
    #[arg(long, default_value_t = 100_000)]
    devices: u64,
    /// Worker processes kept running.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Seconds between worker kills.
    #[arg(long, default_value_t = 3.0)]
    kill_every_secs: f64,
    /// Deliveries in flight per worker (bounds the re-sends one kill may cause).
    #[arg(long, default_value_t = 128)]
    concurrency: u64,
    /// Settings file for RabbitMQ and Redis URLs.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Keep the namespace's queues and keys afterwards.
    #[arg(long)]
    keep: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout_secs: u64,
}

pub(crate) async fn run(args: ChaosArgs) -> anyhow::Result<i32> {
    let env = [
        ("FLEETBATCH_SIMULATOR__LATENCY_MS", "5".to_owned()),
        ("FLEETBATCH_SIMULATOR__LATENCY_JITTER_MS", "5".into()),
        (
            "FLEETBATCH_SIMULATOR__TRANSIENT_FAILURE_RATE",
            "0.02".into(),
        ),
        ("FLEETBATCH_SIMULATOR__OFFLINE_RATE", "0.005".into()),
        ("FLEETBATCH_SIMULATOR__OFFLINE_ATTEMPTS", "2".into()),
        (
            "FLEETBATCH_WORKER__CONCURRENCY",
            args.concurrency.to_string(),
        ),
        ("FLEETBATCH_WORKER__ATTEMPT_TIMEOUT_MS", "500".into()),
        ("FLEETBATCH_WORKER__CLAIM_LEASE_MS", "3000".into()),
        ("FLEETBATCH_WORKER__BACKOFF__BUDGET_MS", "1000".into()),
        ("FLEETBATCH_WORKER__RETRY_DELAYS_MS", "500,1000,2000".into()),
    ];
    let mut sandbox = Sandbox::start(args.config.as_deref(), "chaos", args.workers, &env).await?;
    let outcome = chaos(&args, &mut sandbox).await;
    sandbox.finish(args.keep).await;
    let verdict = outcome?;
    println!("{verdict}");
    Ok(if verdict["ok"] == true { 0 } else { 1 })
}

async fn chaos(args: &ChaosArgs, sandbox: &mut Sandbox) -> anyhow::Result<Value> {
    sandbox.import_fleet(args.devices).await?;
    let job_id = sandbox
        .create_firmware_job("chaos", json!({"retry": {"max_attempts": 10}}))
        .await?;
    let started = Instant::now();
    let mut running: Vec<usize> = (0..args.workers).collect();
    let mut worker_kills = 0u64;
    let mut coordinator_restarts = 0u64;
    let mut next_kill = Instant::now() + Duration::from_secs_f64(args.kill_every_secs);
    let job = loop {
        let job: Value = match sandbox.client.get(&format!("/v1/jobs/{job_id}")).await {
            Ok(job) => job,
            // The coordinator is restarting.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if progress::is_finished(&job) {
            break job;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(args.timeout_secs),
            "job did not finish in {}s: {job}",
            args.timeout_secs
        );
        let done = progress::count(&job, "terminal");
        if coordinator_restarts == 0 && done * 10 >= args.devices * 3 {
            eprintln!("chaos: SIGKILL coordinator at {done} devices done");
            sandbox.cluster.signal_coordinator(Signal::SIGKILL)?;
            sandbox
                .cluster
                .wait_coordinator(Duration::from_secs(10))
                .await?;
            sandbox.cluster.start_coordinator().await?;
            coordinator_restarts += 1;
        }
        if Instant::now() >= next_kill {
            let victim = running.remove(0);
            eprintln!("chaos: SIGKILL worker {victim} at {done} devices done");
            sandbox.cluster.signal_worker(victim, Signal::SIGKILL)?;
            sandbox
                .cluster
                .wait_worker(victim, Duration::from_secs(10))
                .await?;
            running.push(sandbox.cluster.start_worker()?);
            worker_kills += 1;
            next_kill = Instant::now() + Duration::from_secs_f64(args.kill_every_secs);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    let mut redis =
        shared::store::connect(&sandbox.settings.redis, sandbox.names.key_prefix()).await?;
    let audit = harness::audit::audit(
        &mut redis,
        &sandbox.names,
        uuid::Uuid::parse_str(&job_id).context("job id")?,
    )
    .await?;
    let extra_bound = worker_kills * args.concurrency;
    let ok = audit.lost == 0
        && audit.duplicate_applications == 0
        && audit.counters_exact
        && audit.extra_deliveries <= extra_bound;
    eprint!("{}", progress::summary(&job));
    Ok(json!({
        "ok": ok,
        "job_id": job_id,
        "targeted": audit.targeted,
        "lost": audit.lost,
        "duplicate_applications": audit.duplicate_applications,
        "extra_deliveries": audit.extra_deliveries,
        "extra_deliveries_bound": extra_bound,
        "counters_exact": audit.counters_exact,
        "worker_kills": worker_kills,
        "coordinator_restarts": coordinator_restarts,
        "deliveries": audit.deliveries,
        "seconds": (seconds * 10.0).round() / 10.0,
    }))
}
