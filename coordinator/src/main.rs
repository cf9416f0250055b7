//! `coordinator`: the fleetbatch coordinator service (HTTP API, planners, aggregation).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Splits fleetbatch jobs into device tasks and aggregates their results.
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
        tracing::error!(error.message = %e, error.cause_chain = %shared::telemetry::chain(e.as_ref()), "coordinator failed");
        eprintln!("coordinator: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings =
        shared::config::Settings::load(args.config.as_deref()).context("loading settings")?;
    let _telemetry = shared::telemetry::init(
        "fleetbatch-coordinator",
        &format!("coordinator-{}", std::process::id()),
        &settings.telemetry,
    )
    .context("setting up telemetry")?;
    let stop = shared::shutdown::token();
    // Redis must be reachable to start; the broker may come and go (see `startup`).
    shared::supervise::with_reconnect("coordinator", stop, |stop| {
        let settings = settings.clone();
        async move {
            let app = coordinator::startup::Application::build(settings)
                .await
                .context("starting the coordinator")?;
            app.run_until_stopped(stop.cancelled_owned()).await
        }
    })
    .await
}
