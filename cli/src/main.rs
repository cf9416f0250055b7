//! `fleetbatch`: the operator's CLI. Talks to the coordinator's HTTP API; `demo`, `chaos` and
//! `bench` also start a coordinator and workers of their own (through the `harness` crate).
//!
//! # Layout
//! - [`commands`]: one module per command group (`devices`/`groups`, `job`, `dlq`, `demo`,
//!   `chaos`, `bench`).
//! - [`client`]: the HTTP client of the coordinator's API.
//! - [`output`]: JSON, tables and the pagination words shared by every command.
//! - [`progress`]: following a job (progress bar over Server-Sent Events) and its summary.
//! - [`sandbox`]: a throw-away namespace with its own coordinator and workers.
//!
//! The client's own environment variables (`FLEETBATCH_API`, `FLEETBATCH_TOKEN`) are not settings: the services
//! ignore them, so one shell can run both.

mod client;
mod commands;
mod output;
mod progress;
mod sandbox;

use clap::{CommandFactory, Parser, Subcommand};

use client::Client;
use commands::{access, bench, chaos, demo, devices, dlq, jobs, queries, schedules, templates};

/// Run batch jobs on fleets of devices.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Coordinator API address.
    #[arg(
        long,
        env = "FLEETBATCH_API",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    api: String,
    /// Bearer token for the API (an API token, or the bootstrap admin token).
    #[arg(long, env = "FLEETBATCH_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) to trust for an HTTPS API beside the system's roots (a private
    /// CA).
    #[arg(long, env = "FLEETBATCH_CA_FILE", global = true)]
    ca_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The device registry.
    #[command(subcommand)]
    Devices(devices::DevicesCmd),
    /// Device groups and their sizes.
    Groups {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Jobs.
    #[command(subcommand)]
    Job(jobs::JobCmd),
    /// Saved device queries (dynamic groups), named by jobs as `target.saved_query`.
    #[command(subcommand)]
    Query(queries::QueryCmd),
    /// Job templates: a spec with parameters (`job create --template NAME --param k=v`).
    #[command(subcommand)]
    Template(templates::TemplateCmd),
    /// Recurring jobs: each occurrence of a cron schedule creates a child job.
    #[command(subcommand)]
    Schedule(schedules::ScheduleCmd),
    /// The dead-letter queue: messages that could not be processed, with the reason.
    #[command(subcommand)]
    Dlq(dlq::DlqCmd),
    /// API tokens (admin): create, list, revoke.
    #[command(subcommand)]
    Token(access::TokenCmd),
    /// The audit log (admin): every state-changing call and job state change, newest first.
    Audit(access::AuditArgs),
    /// Job-document signing keys.
    #[command(subcommand)]
    Keys(access::KeysCmd),
    /// Start a coordinator and workers against the local RabbitMQ and Redis, register a
    /// simulated fleet, roll a firmware update out to it, and print a summary.
    Demo(demo::DemoArgs),
    /// Run a job while killing workers every few seconds and the coordinator once; print
    /// `lost`, `duplicate_applications`, `extra_deliveries` and `counters_exact` as one JSON
    /// line; exit non-zero if any check fails.
    Chaos(chaos::ChaosArgs),
    /// Measure throughput, latency and memory: the raw broker pipeline, then fleetbatch on
    /// the same number of devices; medians of several runs, one JSON line per case.
    Bench(bench::BenchArgs),
    /// Check that a fleetbatch process is alive (exit 0) or not (exit 1): the coordinator's
    /// `/healthz` by default, or any `/healthz` URL (a worker's). For container health checks.
    Health {
        /// The URL to check (default: the API's `/healthz`).
        #[arg(long)]
        url: Option<String>,
    },
    /// Print a shell completion script (`fleetbatch completions bash > /etc/bash_completion.d/fleetbatch`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("fleetbatch: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let client = Client::new(&cli.api, cli.token.as_deref(), cli.ca_file.as_deref())?;
    match cli.command {
        Command::Demo(args) => std::process::exit(demo::run(args).await?),
        Command::Chaos(args) => std::process::exit(chaos::run(args).await?),
        Command::Bench(args) => std::process::exit(bench::run(args).await?),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "fleetbatch",
                &mut std::io::stdout(),
            );
        }
        Command::Health { url } => {
            let url = url.unwrap_or_else(|| client.url("/healthz"));
            client.health(&url).await?;
        }
        Command::Groups { json } => devices::groups(&client, json).await?,
        Command::Devices(cmd) => devices::run(&client, cmd).await?,
        Command::Job(cmd) => jobs::run(&client, cmd).await?,
        Command::Schedule(cmd) => schedules::run(&client, cmd).await?,
        Command::Template(cmd) => templates::run(&client, cmd).await?,
        Command::Query(cmd) => queries::run(&client, cmd).await?,
        Command::Dlq(cmd) => dlq::run(&client, cmd).await?,
        Command::Token(cmd) => access::token(&client, cmd).await?,
        Command::Audit(args) => access::audit(&client, args).await?,
        Command::Keys(cmd) => access::keys(cmd)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
