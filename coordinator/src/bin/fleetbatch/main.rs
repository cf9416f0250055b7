//! `fleetbatch`: the operator's CLI. Talks to the coordinator's HTTP API; `demo` also starts a
//! coordinator and workers of its own.

mod bench;
mod chaos;
mod client;
mod demo;
mod progress;
mod sandbox;

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

use client::Client;

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The device registry.
    #[command(subcommand)]
    Devices(DevicesCmd),
    /// Device groups and their sizes.
    Groups,
    /// Jobs.
    #[command(subcommand)]
    Job(JobCmd),
    /// The dead-letter queue: messages that could not be processed, with the reason.
    #[command(subcommand)]
    Dlq(DlqCmd),
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
}

#[derive(Debug, Subcommand)]
enum DlqCmd {
    /// List dead-lettered messages (they stay in the queue).
    List {
        /// How many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Put dead-lettered messages back on the queue they came from.
    Replay {
        /// Only this message id (repeatable); all when absent.
        #[arg(long = "id")]
        ids: Vec<String>,
        /// Only messages that decode (skip garbage).
        #[arg(long)]
        only_decodable: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FileFormat {
    Csv,
    Ndjson,
}

#[derive(Debug, Subcommand)]
enum DevicesCmd {
    /// Import devices from a CSV (header row) or NDJSON file.
    Import {
        /// The file.
        #[arg(required_unless_present = "generate")]
        file: Option<PathBuf>,
        /// Format (default: from the file extension).
        #[arg(long, value_enum)]
        format: Option<FileFormat>,
        /// Instead of a file: register N generated devices dev-0000000.. in group `fleet`
        /// (the devices `fleet-sim --devices N` plays).
        #[arg(long, conflicts_with = "file")]
        generate: Option<u64>,
    },
    /// List devices.
    List {
        #[command(flatten)]
        filter: DeviceFilter,
        /// Devices to show.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Count devices.
    Count {
        #[command(flatten)]
        filter: DeviceFilter,
    },
}

#[derive(Debug, clap::Args)]
struct DeviceFilter {
    /// Only this group.
    #[arg(long)]
    group: Option<String>,
    /// Only this model.
    #[arg(long)]
    model: Option<String>,
    /// Only this hardware revision.
    #[arg(long)]
    hardware_revision: Option<String>,
    /// Only this firmware version.
    #[arg(long)]
    firmware_version: Option<String>,
}

impl DeviceFilter {
    fn query(&self) -> String {
        let mut q = Vec::new();
        for (k, v) in [
            ("group", &self.group),
            ("model", &self.model),
            ("hardware_revision", &self.hardware_revision),
            ("firmware_version", &self.firmware_version),
        ] {
            if let Some(v) = v {
                q.push(format!("{k}={}", urlencode(v)));
            }
        }
        q.join("&")
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[derive(Debug, Subcommand)]
enum JobCmd {
    /// Create a job from a TOML or JSON file, or from flags.
    Create(Box<CreateArgs>),
    /// Show a job's state and counters.
    Get {
        /// Job id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the newest jobs.
    List {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Cancel a job: queued devices end CANCELED, deliveries under way finish.
    Cancel {
        /// Job id.
        id: String,
    },
    /// Per-device status.
    Devices {
        /// Job id.
        id: String,
        /// Only this state (queued, succeeded, failed, rejected, timed_out, canceled, skipped).
        #[arg(long)]
        status: Option<String>,
        /// Most devices to print.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Devices that did not succeed, with their last error.
    Report {
        /// Job id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Follow a job until it finishes.
    Watch {
        /// Job id.
        id: String,
    },
    /// Every device's result and readings (data-retrieval jobs), as CSV or NDJSON.
    Results {
        /// Job id.
        id: String,
        /// csv or ndjson.
        #[arg(long, default_value = "csv")]
        format: ResultsFormat,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ResultsFormat {
    Csv,
    Ndjson,
}

#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// Job file (.toml or .json). Without it, the job is built from the flags below.
    file: Option<PathBuf>,
    /// Job name.
    #[arg(long)]
    name: Option<String>,
    /// Target device (repeatable).
    #[arg(long = "device")]
    devices: Vec<String>,
    /// Target group (repeatable).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Action: firmware_update, configuration, reboot, command, data_retrieval.
    #[arg(long)]
    action: Option<String>,
    /// Firmware URL.
    #[arg(long)]
    url: Option<String>,
    /// Firmware version.
    #[arg(long = "firmware-version")]
    firmware_version: Option<String>,
    /// Firmware SHA-256.
    #[arg(long)]
    sha256: Option<String>,
    /// Configuration document (JSON).
    #[arg(long)]
    document: Option<String>,
    /// Command name.
    #[arg(long = "command-name")]
    command_name: Option<String>,
    /// Metric to read, for data_retrieval (repeatable).
    #[arg(long = "metric")]
    metrics: Vec<String>,
    /// Compatible hardware revision (repeatable); others are SKIPPED.
    #[arg(long = "compatible-hardware")]
    compatible_hardware: Vec<String>,
    /// Publishing rate limit (devices per second).
    #[arg(long)]
    max_per_second: Option<u32>,
    /// Delivery attempts per device.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Follow the job until it finishes.
    #[arg(long)]
    watch: bool,
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
    let client = Client::new(&cli.api)?;
    match cli.command {
        Command::Demo(args) => std::process::exit(demo::run(args).await?),
        Command::Chaos(args) => std::process::exit(chaos::run(args).await?),
        Command::Bench(args) => std::process::exit(bench::run(args).await?),
        Command::Groups => print_json(&client.get::<Value>("/v1/groups").await?),
        Command::Devices(cmd) => devices(&client, cmd).await?,
        Command::Job(cmd) => job(&client, cmd).await?,
        Command::Dlq(cmd) => dlq(&client, cmd).await?,
    }
    Ok(())
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

async fn devices(client: &Client, cmd: DevicesCmd) -> anyhow::Result<()> {
    match cmd {
        DevicesCmd::Import {
            file,
            format,
            generate,
        } => {
            let report: Value = match (generate, file) {
                (Some(n), _) => {
                    client
                        .post(
                            "/v1/devices/import?format=ndjson",
                            "application/x-ndjson",
                            coordinator::fleet::ndjson(n),
                        )
                        .await?
                }
                (None, Some(file)) => {
                    let format = match format {
                        Some(f) => f,
                        None if file.extension().is_some_and(|e| e == "csv") => FileFormat::Csv,
                        None => FileFormat::Ndjson,
                    };
                    let (q, ct) = match format {
                        FileFormat::Csv => ("csv", "text/csv"),
                        FileFormat::Ndjson => ("ndjson", "application/x-ndjson"),
                    };
                    let f = tokio::fs::File::open(&file)
                        .await
                        .with_context(|| format!("opening {}", file.display()))?;
                    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(f));
                    client
                        .post(&format!("/v1/devices/import?format={q}"), ct, body)
                        .await?
                }
                (None, None) => bail!("give a file or --generate N"),
            };
            println!(
                "imported {} devices, {} lines refused",
                report["imported"], report["failed"]
            );
            if let Some(errors) = report["errors"].as_array() {
                for e in errors {
                    println!(
                        "  line {}: {}",
                        e["line"],
                        e["error"].as_str().unwrap_or("")
                    );
                }
            }
            if report["failed"].as_u64().unwrap_or(0) > 0 {
                std::process::exit(2);
            }
        }
        DevicesCmd::List { filter, limit } => {
            let v: Value = client
                .get(&format!("/v1/devices?{}&limit={limit}", filter.query()))
                .await?;
            for d in v["devices"].as_array().into_iter().flatten() {
                println!("{}", d);
            }
        }
        DevicesCmd::Count { filter } => {
            let v: Value = client
                .get(&format!("/v1/devices/count?{}", filter.query()))
                .await?;
            println!("{}", v["count"]);
        }
    }
    Ok(())
}

async fn dlq(client: &Client, cmd: DlqCmd) -> anyhow::Result<()> {
    match cmd {
        DlqCmd::List { limit, json } => {
            let v: Value = client.get(&format!("/v1/dlq?limit={limit}")).await?;
            if json {
                print_json(&v);
                return Ok(());
            }
            let messages = v["messages"].as_array().cloned().unwrap_or_default();
            println!("{} dead-lettered message(s)", messages.len());
            for m in messages {
                println!(
                    "{:<38} from {:<28} {} bytes: {}",
                    m["message_id"].as_str().unwrap_or("-"),
                    m["source_queue"].as_str().unwrap_or("?"),
                    m["size"],
                    m["reason"].as_str().unwrap_or("(no reason)")
                );
            }
        }
        DlqCmd::Replay {
            ids,
            only_decodable,
        } => {
            let mut body = json!({"only_decodable": only_decodable});
            if !ids.is_empty() {
                body["message_ids"] = json!(ids);
            }
            let v: Value = client
                .post("/v1/dlq/replay", "application/json", body.to_string())
                .await?;
            println!("replayed {}, kept {}", v["replayed"], v["kept"]);
        }
    }
    Ok(())
}

fn spec_from_flags(a: &CreateArgs) -> anyhow::Result<Value> {
    let action = match a.action.as_deref() {
        Some("firmware_update") | Some("firmware") => json!({
            "type": "firmware_update",
            "url": a.url.clone().context("--url is required for firmware_update")?,
            "version": a.firmware_version.clone().context("--firmware-version is required for firmware_update")?,
            "sha256": a.sha256.clone().context("--sha256 is required for firmware_update")?,
        }),
        Some("configuration") => json!({
            "type": "configuration",
            "document": serde_json::from_str::<Value>(a.document.as_deref().context("--document is required for configuration")?)
                .context("--document: not valid JSON")?,
        }),
        Some("reboot") => json!({"type": "reboot"}),
        Some("command") => json!({
            "type": "command",
            "name": a.command_name.clone().context("--command-name is required for command")?,
        }),
        Some("data_retrieval") => {
            if a.metrics.is_empty() {
                bail!("--metric is required (repeatable) for data_retrieval");
            }
            json!({"type": "data_retrieval", "metrics": a.metrics})
        }
        Some(other) => bail!(
            "--action: unknown action {other:?} (firmware_update, configuration, reboot, command, data_retrieval)"
        ),
        None => bail!("give a job file, or --action with its parameters"),
    };
    let mut spec = json!({
        "name": a.name,
        "target": {"devices": a.devices, "groups": a.groups},
        "action": action,
    });
    if !a.compatible_hardware.is_empty() {
        spec["compatibility"] = json!({"hardware_revisions": a.compatible_hardware});
    }
    if let Some(r) = a.max_per_second {
        spec["rollout"] = json!({"max_per_second": r});
    }
    if let Some(m) = a.max_attempts {
        spec["retry"] = json!({"max_attempts": m});
    }
    Ok(spec)
}

async fn job(client: &Client, cmd: JobCmd) -> anyhow::Result<()> {
    match cmd {
        JobCmd::Create(args) => {
            let created: Value = match &args.file {
                Some(file) => {
                    let text = tokio::fs::read_to_string(file)
                        .await
                        .with_context(|| format!("reading {}", file.display()))?;
                    let ct = if file.extension().is_some_and(|e| e == "toml") {
                        "application/toml"
                    } else {
                        "application/json"
                    };
                    client.post("/v1/jobs", ct, text).await?
                }
                None => {
                    let spec = spec_from_flags(&args)?;
                    client
                        .post("/v1/jobs", "application/json", spec.to_string())
                        .await?
                }
            };
            let id = created["job_id"].as_str().unwrap_or_default().to_owned();
            println!("{id}");
            if args.watch {
                let job = progress::watch(client, &id).await?;
                print!("{}", progress::summary(&job));
            }
        }
        JobCmd::Get { id, json } => {
            let v: Value = client.get(&format!("/v1/jobs/{id}")).await?;
            if json {
                print_json(&v);
            } else {
                print!("{}", progress::summary(&v));
            }
        }
        JobCmd::List { limit } => {
            let v: Value = client.get(&format!("/v1/jobs?limit={limit}")).await?;
            println!(
                "{:<38} {:<12} {:<16} {:>9} {:>9} {:>9}",
                "JOB", "STATE", "ACTION", "TARGETED", "OK", "FAILED"
            );
            for j in v["jobs"].as_array().into_iter().flatten() {
                println!(
                    "{:<38} {:<12} {:<16} {:>9} {:>9} {:>9}",
                    j["job_id"].as_str().unwrap_or(""),
                    j["state"].as_str().unwrap_or(""),
                    j["action"].as_str().unwrap_or(""),
                    progress::count(j, "targeted"),
                    progress::count(j, "succeeded"),
                    progress::count(j, "failed"),
                );
            }
        }
        JobCmd::Cancel { id } => {
            let v: Value = client
                .post(&format!("/v1/jobs/{id}/cancel"), "application/json", "")
                .await?;
            println!(
                "{} {}",
                v["job_id"].as_str().unwrap_or(&id),
                v["state"].as_str().unwrap_or("")
            );
        }
        JobCmd::Devices { id, status, limit } => {
            let mut cursor: Option<String> = None;
            let mut printed = 0usize;
            loop {
                let mut path = format!("/v1/jobs/{id}/devices?limit=1000");
                if let Some(s) = &status {
                    path.push_str(&format!("&status={}", urlencode(s)));
                }
                if let Some(c) = &cursor {
                    path.push_str(&format!("&cursor={c}"));
                }
                let page: Value = client.get(&path).await?;
                for d in page["devices"].as_array().into_iter().flatten() {
                    if printed >= limit {
                        return Ok(());
                    }
                    println!(
                        "{:<24} {:<16} attempts={} {}",
                        d["device_id"].as_str().unwrap_or(""),
                        d["state"].as_str().unwrap_or(""),
                        d["attempts"],
                        d["error"].as_str().unwrap_or("")
                    );
                    printed += 1;
                }
                match page["next_cursor"].as_str() {
                    Some(c) => cursor = Some(c.to_owned()),
                    None => return Ok(()),
                }
            }
        }
        JobCmd::Report { id, json } => {
            let v: Value = client.get(&format!("/v1/jobs/{id}/report")).await?;
            if json {
                print_json(&v);
            } else {
                print!("{}", progress::summary(&v["job"]));
                println!("errors:");
                for (e, n) in v["errors"].as_object().into_iter().flatten() {
                    println!("  {n:>8}  {e}");
                }
                if let Some(readings) = v["readings"].as_object() {
                    println!("readings:");
                    println!(
                        "  {:<20} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10}",
                        "metric", "count", "min", "max", "mean", "p50", "p95"
                    );
                    for (m, s) in readings {
                        let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
                        println!(
                            "  {:<20} {:>8} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                            m,
                            s["count"],
                            f("min"),
                            f("max"),
                            f("mean"),
                            f("p50"),
                            f("p95")
                        );
                    }
                }
                println!("devices:");
                for d in v["failures"].as_array().into_iter().flatten() {
                    println!(
                        "  {:<24} {:<10} attempts={} {}",
                        d["device_id"].as_str().unwrap_or(""),
                        d["state"].as_str().unwrap_or(""),
                        d["attempts"],
                        d["error"].as_str().unwrap_or("")
                    );
                }
            }
        }
        JobCmd::Watch { id } => {
            let job = progress::watch(client, &id).await?;
            print!("{}", progress::summary(&job));
        }
        JobCmd::Results { id, format, output } => {
            let format = match format {
                ResultsFormat::Csv => "csv",
                ResultsFormat::Ndjson => "ndjson",
            };
            let body = client
                .get_bytes(&format!("/v1/jobs/{id}/results?format={format}"))
                .await?;
            match output {
                Some(path) => std::fs::write(&path, &body)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => {
                    use std::io::Write;
                    std::io::stdout().write_all(&body)?;
                }
            }
        }
    }
    Ok(())
}
