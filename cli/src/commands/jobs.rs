//! `fleetbatch job ...`: creating, following, inspecting, steering (pause, resume, approve)
//! and cancelling jobs.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::{
    client::Client,
    output::{self, Table, query},
    progress,
};

#[derive(Debug, Subcommand)]
pub(crate) enum JobCmd {
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
        #[command(flatten)]
        page: output::Page,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job: queued devices end CANCELED, deliveries under way finish.
    Cancel {
        /// Job id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pause a job: nothing new is published and parked retries wait; deliveries under
    /// way finish.
    Pause(SteerArgs),
    /// Resume a paused job from its checkpoint (a job paused by a failed wave gate goes on
    /// to the next wave).
    Resume(SteerArgs),
    /// Let the next wave start: the wave waiting for approval, at its gate or soak, or the
    /// wave whose failed gate paused the job.
    Approve(SteerArgs),
    /// Per-device status, in device-id order.
    Devices {
        /// Job id.
        id: String,
        /// Only this state (queued, succeeded, failed, rejected, timed_out, canceled, skipped).
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        page: output::Page,
        /// Every page, not only the first.
        #[arg(long)]
        all: bool,
        /// Print JSON (one object with `devices` and `next_cursor`; with --all, every device).
        #[arg(long)]
        json: bool,
    },
    /// Devices that did not succeed, with their last error.
    Report {
        /// Job id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A new job with a finished job's action for exactly its devices that ended in the
    /// given states (default FAILED and TIMED_OUT), however many.
    Rerun(FollowUpArgs),
    /// Delete a finished job's data now (record, statuses, results; export them first with
    /// `job results`). A job that is not finished is refused.
    Delete {
        /// Job id.
        id: String,
    },
    /// A new job with a finished job's rollback action (its spec's `rollback`) for its
    /// devices that ended in the given states (default SUCCEEDED and FAILED).
    Rollback(FollowUpArgs),
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
pub(crate) enum ResultsFormat {
    Csv,
    Ndjson,
}

/// Pause, resume, approve.
#[derive(Debug, clap::Args)]
pub(crate) struct SteerArgs {
    /// Job id.
    id: String,
    /// Why, for the job's record and the audit log.
    #[arg(long)]
    reason: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

async fn steer(client: &Client, word: &str, a: SteerArgs) -> anyhow::Result<()> {
    let body = match &a.reason {
        Some(r) => json!({ "reason": r }).to_string(),
        None => String::new(),
    };
    let v: Value = client
        .post(
            &format!("/v1/jobs/{}/{word}", a.id),
            "application/json",
            body,
        )
        .await?;
    if a.json {
        output::print_json(&v);
    } else {
        println!(
            "{} {}",
            v["job_id"].as_str().unwrap_or(&a.id),
            v["state"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// A job made from an earlier one (rerun, rollback).
#[derive(Debug, clap::Args)]
pub(crate) struct FollowUpArgs {
    /// The earlier job.
    id: String,
    /// Terminal states whose devices are targeted, comma separated (e.g.
    /// FAILED,TIMED_OUT,REJECTED).
    #[arg(long, value_delimiter = ',')]
    states: Vec<String>,
    /// Make it safe to retry (as job create --idempotency-key).
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Create nothing: print what the job would do (as job create --dry-run).
    #[arg(long)]
    dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub(crate) struct CreateArgs {
    /// Job file (.toml or .json). Without it, the job is built from a template or from the
    /// flags below.
    #[arg(conflicts_with = "template")]
    file: Option<PathBuf>,
    /// Make the job from this template (`fleetbatch template list`), with `--param`s.
    #[arg(long)]
    template: Option<String>,
    /// A template parameter, `name=value` (repeatable).
    #[arg(long = "param", requires = "template", value_parser = parse_param)]
    params: Vec<(String, String)>,
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
    /// Make the create safe to retry: the same key returns the first job (for 24 hours)
    /// instead of starting a second rollout.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Create nothing: print what the job would do (devices targeted, sent and skipped by
    /// reason, by group, model and hardware revision, and the publishing time).
    #[arg(long, conflicts_with = "watch")]
    dry_run: bool,
    /// Print JSON (the created job; with --watch, the finished job).
    #[arg(long)]
    json: bool,
}

fn parse_param(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?}: expected name=value"))
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

/// A dry run, for people.
fn dry_run_summary(p: &Value) -> String {
    let n = |k: &str| p[k].as_u64().unwrap_or(0);
    let mut out = format!(
        "dry run: nothing created\ntargeted {}: {} to send, {} skipped\n",
        n("targeted"),
        n("to_send"),
        n("skipped")
    );
    match p["publish_secs"].as_f64() {
        Some(s) => {
            out += &format!(
                "publishing at {} devices/s takes {:.0} s\n",
                p["max_per_second"], s
            )
        }
        None => out += "no rate limit: as fast as the workers take tasks\n",
    }
    if let Some(waves) = p["waves"].as_array().filter(|w| !w.is_empty()) {
        out += &format!("waves (soaks add {} s):\n", n("soak_secs"));
        for w in waves {
            out += &format!(
                "  {:<24} {:>10}\n",
                w["name"].as_str().unwrap_or("-"),
                w["size"].as_u64().unwrap_or(0)
            );
        }
    }
    for (title, key) in [
        ("skipped", "skipped_by_reason"),
        ("by group", "by_group"),
        ("by model", "by_model"),
        ("by hardware revision", "by_hardware_revision"),
    ] {
        if let Some(map) = p[key].as_object().filter(|m| !m.is_empty()) {
            out += &format!("{title}:\n");
            for (k, v) in map {
                out += &format!("  {k}: {v}\n");
            }
        }
    }
    out
}

/// Creates a rerun or a rollback of a job and prints its id.
async fn follow_up(client: &Client, kind: &str, a: FollowUpArgs) -> anyhow::Result<()> {
    let states: Vec<String> = a.states.iter().map(|s| s.trim().to_uppercase()).collect();
    let body = if states.is_empty() {
        json!({})
    } else {
        json!({ "states": states })
    };
    let query = if a.dry_run { "?dry_run=true" } else { "" };
    let v = client
        .post_with_key(
            &format!("/v1/jobs/{}/{kind}{query}", a.id),
            body.to_string(),
            a.idempotency_key.as_deref(),
        )
        .await?;
    if a.json {
        output::print_json(&v);
    } else if a.dry_run {
        print!("{}", dry_run_summary(&v));
    } else {
        println!("{}", v["job_id"].as_str().unwrap_or_default());
    }
    Ok(())
}

/// Runs a `job` command.
pub(crate) async fn run(client: &Client, cmd: JobCmd) -> anyhow::Result<()> {
    match cmd {
        JobCmd::Create(args) => {
            if let Some(template) = &args.template {
                let params: serde_json::Map<String, Value> = args
                    .params
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect();
                let path = format!(
                    "/v1/templates/{template}/jobs{}",
                    if args.dry_run { "?dry_run=true" } else { "" }
                );
                let v = client
                    .post_with_key(
                        &path,
                        json!({ "parameters": params }).to_string(),
                        args.idempotency_key.as_deref(),
                    )
                    .await?;
                if args.json {
                    output::print_json(&v);
                } else if args.dry_run {
                    print!("{}", dry_run_summary(&v));
                } else {
                    println!("{}", v["job_id"].as_str().unwrap_or_default());
                }
                return Ok(());
            }
            let (ct, spec) = match &args.file {
                Some(file) => super::read_document(file).await?,
                None => ("application/json", spec_from_flags(&args)?.to_string()),
            };
            if args.dry_run {
                let preview: Value = client.create_job(ct, spec, None, true).await?;
                if args.json {
                    output::print_json(&preview);
                } else {
                    print!("{}", dry_run_summary(&preview));
                }
                return Ok(());
            }
            let created: Value = client
                .create_job(ct, spec, args.idempotency_key.as_deref(), false)
                .await?;
            let id = created["job_id"].as_str().unwrap_or_default().to_owned();
            if args.watch {
                if !args.json {
                    println!("{id}");
                }
                let job = progress::watch(client, &id).await?;
                if args.json {
                    output::print_json(&job);
                } else {
                    print!("{}", progress::summary(&job));
                }
            } else if args.json {
                output::print_json(&created);
            } else {
                println!("{id}");
            }
        }
        JobCmd::Get { id, json } => {
            let v: Value = client.get(&format!("/v1/jobs/{id}")).await?;
            if json {
                output::print_json(&v);
            } else {
                print!("{}", progress::summary(&v));
            }
        }
        JobCmd::List { page, json } => {
            let v: Value = client
                .get(&format!("/v1/jobs?{}", query(&page.query())))
                .await?;
            if json {
                output::print_json(&v);
                return Ok(());
            }
            let mut t = Table::new(["JOB", "NAME", "STATE", "ACTION", "TARGETED", "OK", "FAILED"]);
            for j in v["jobs"].as_array().into_iter().flatten() {
                t.row([
                    output::text(j, "job_id"),
                    output::text(j, "name"),
                    output::text(j, "state"),
                    output::text(j, "action"),
                    progress::count(j, "targeted").to_string(),
                    progress::count(j, "succeeded").to_string(),
                    progress::count(j, "failed").to_string(),
                ]);
            }
            t.print();
            output::next_page(&v);
        }
        JobCmd::Pause(args) => steer(client, "pause", args).await?,
        JobCmd::Resume(args) => steer(client, "resume", args).await?,
        JobCmd::Approve(args) => steer(client, "approve", args).await?,
        JobCmd::Rerun(args) => follow_up(client, "rerun", args).await?,
        JobCmd::Delete { id } => {
            let _: Value = client.delete(&format!("/v1/jobs/{id}")).await?;
            println!("{id} deleted");
        }
        JobCmd::Rollback(args) => follow_up(client, "rollback", args).await?,
        JobCmd::Cancel { id, json } => {
            let v: Value = client
                .post(&format!("/v1/jobs/{id}/cancel"), "application/json", "")
                .await?;
            if json {
                output::print_json(&v);
            } else {
                println!(
                    "{} {}",
                    v["job_id"].as_str().unwrap_or(&id),
                    v["state"].as_str().unwrap_or("")
                );
            }
        }
        JobCmd::Devices {
            id,
            status,
            page,
            all,
            json,
        } => {
            let mut cursor = page.cursor.clone();
            let mut devices = Vec::new();
            let mut next: Option<String>;
            loop {
                let mut q = Vec::new();
                if let Some(s) = &status {
                    q.push(("status", s.clone()));
                }
                q.push(("limit", page.limit.to_string()));
                if let Some(c) = &cursor {
                    q.push(("cursor", c.clone()));
                }
                let v: Value = client
                    .get(&format!("/v1/jobs/{id}/devices?{}", query(&q)))
                    .await?;
                devices.extend(v["devices"].as_array().cloned().unwrap_or_default());
                next = v["next_cursor"].as_str().map(str::to_owned);
                match (&next, all) {
                    (Some(c), true) => cursor = Some(c.clone()),
                    _ => break,
                }
            }
            let v = json!({"devices": devices, "next_cursor": next});
            if json {
                output::print_json(&v);
                return Ok(());
            }
            let mut t = Table::new(["DEVICE", "STATE", "ATTEMPTS", "ERROR"]);
            for d in &devices {
                t.row([
                    output::text(d, "device_id"),
                    output::text(d, "state"),
                    d["attempts"].to_string(),
                    output::text(d, "error"),
                ]);
            }
            t.print();
            output::next_page(&v);
        }
        JobCmd::Report { id, json } => {
            let v: Value = client.get(&format!("/v1/jobs/{id}/report")).await?;
            if json {
                output::print_json(&v);
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
