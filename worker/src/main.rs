//! `worker`: a fleetbatch worker process. Run as many as the fleet needs.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Delivers fleetbatch device tasks from RabbitMQ to devices.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Settings file (YAML, TOML or JSON); defaults to $FLEETBATCH_CONFIG, then built-ins.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        tracing::error!(error.message = %e, error.cause_chain = %shared::telemetry::chain(e.as_ref()), "worker failed");
        eprintln!("worker: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings =
        shared::config::Settings::load(args.config.as_deref()).context("loading settings")?;
    let id = worker::startup::worker_id();
    let _telemetry = shared::telemetry::init("fleetbatch-worker", &id, &settings.telemetry)
        .context("setting up telemetry")?;
    worker::startup::run(settings, id, shared::shutdown::token()).await
}
