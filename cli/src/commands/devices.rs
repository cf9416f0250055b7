//! `fleetbatch devices ...` and `fleetbatch groups`: the device registry.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};
use serde_json::Value;

use crate::{
    client::Client,
    output::{self, Table, query},
};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum FileFormat {
    Csv,
    Ndjson,
}

#[derive(Debug, Subcommand)]
pub(crate) enum DevicesCmd {
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
        /// Print the import report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List devices, in id order.
    List {
        #[command(flatten)]
        filter: DeviceFilter,
        #[command(flatten)]
        page: output::Page,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Count devices.
    Count {
        #[command(flatten)]
        filter: DeviceFilter,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One device's record.
    Show {
        /// Device id.
        id: String,
    },
    /// Change a device: each option given replaces the stored value (`--group` and `--tag`
    /// replace all groups or all tags; repeat them for several).
    Update {
        /// Device id.
        id: String,
        /// Model.
        #[arg(long)]
        model: Option<String>,
        /// Hardware revision.
        #[arg(long)]
        hardware_revision: Option<String>,
        /// Firmware version.
        #[arg(long)]
        firmware_version: Option<String>,
        /// Group (repeatable): the device's groups become exactly these.
        #[arg(long = "group")]
        groups: Vec<String>,
        /// Tag `key=value` (repeatable): the device's tags become exactly these.
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Remove a device from the registry and its groups (jobs keep their records of it).
    Delete {
        /// Device id.
        id: String,
    },
    /// The unfinished jobs waiting for a device or running on it, in the order the device
    /// gets them (one at a time: priority, then creation).
    Jobs {
        /// Device id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
pub(crate) struct DeviceFilter {
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
    /// Only devices with this tag (`key=value`).
    #[arg(long)]
    tag: Option<String>,
    /// Only devices matching this query, e.g. `firmware_version < 2.1.0 and tags.site in
    /// (berlin, paris)` (fields id, model, hardware_revision, firmware_version, group,
    /// tags.KEY; operators = != < <= > >= in prefix).
    #[arg(long)]
    query: Option<String>,
}

impl DeviceFilter {
    fn query(&self) -> Vec<(&'static str, String)> {
        [
            ("group", &self.group),
            ("model", &self.model),
            ("hardware_revision", &self.hardware_revision),
            ("firmware_version", &self.firmware_version),
            ("tag", &self.tag),
            ("query", &self.query),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
        .collect()
    }
}

/// Runs a `devices` command.
pub(crate) async fn run(client: &Client, cmd: DevicesCmd) -> anyhow::Result<()> {
    match cmd {
        DevicesCmd::Show { id } => {
            let v: Value = client.get(&format!("/v1/devices/{id}")).await?;
            output::print_json(&v);
        }
        DevicesCmd::Update {
            id,
            model,
            hardware_revision,
            firmware_version,
            groups,
            tags,
        } => {
            let mut patch = serde_json::Map::new();
            for (k, v) in [
                ("model", model),
                ("hardware_revision", hardware_revision),
                ("firmware_version", firmware_version),
            ] {
                if let Some(v) = v {
                    patch.insert(k.into(), Value::String(v));
                }
            }
            if !groups.is_empty() {
                patch.insert("groups".into(), serde_json::json!(groups));
            }
            if !tags.is_empty() {
                let mut map = serde_json::Map::new();
                for t in &tags {
                    let (k, v) = t
                        .split_once('=')
                        .ok_or_else(|| anyhow::anyhow!("--tag {t:?}: expected key=value"))?;
                    map.insert(k.to_owned(), Value::String(v.to_owned()));
                }
                patch.insert("tags".into(), Value::Object(map));
            }
            let v: Value = client
                .patch(
                    &format!("/v1/devices/{id}"),
                    Value::Object(patch).to_string(),
                )
                .await?;
            output::print_json(&v);
        }
        DevicesCmd::Delete { id } => {
            let _: Value = client.delete(&format!("/v1/devices/{id}")).await?;
            println!("{id} deleted");
        }
        DevicesCmd::Jobs { id, json } => {
            let v: Value = client.get(&format!("/v1/devices/{id}/jobs")).await?;
            if json {
                output::print_json(&v);
                return Ok(());
            }
            let history = v["history"].as_array().cloned().unwrap_or_default();
            if !history.is_empty() {
                println!("history (newest first):");
            }
            for h in &history {
                println!(
                    "  {}  {:<20}  job {:<11}  device {:<18}  attempts {}  {}",
                    h["job_id"].as_str().unwrap_or_default(),
                    h["name"].as_str().unwrap_or("-"),
                    h["job_state"].as_str().unwrap_or_default(),
                    h["state"].as_str().unwrap_or_default(),
                    h["attempts"],
                    h["error"].as_str().unwrap_or_default(),
                );
            }
            let jobs = v["jobs"].as_array().cloned().unwrap_or_default();
            if jobs.is_empty() {
                println!("{id}: no unfinished job");
            } else {
                println!("line (the order the device gets them):");
            }
            for (i, j) in jobs.iter().enumerate() {
                println!(
                    "{}. {}  {:<20}  priority {:<4}  job {:<11}  device {}",
                    i + 1,
                    j["job_id"].as_str().unwrap_or_default(),
                    j["name"].as_str().unwrap_or("-"),
                    j["priority"],
                    j["job_state"].as_str().unwrap_or_default(),
                    j["state"].as_str().unwrap_or_default(),
                );
            }
        }
        DevicesCmd::Import {
            file,
            format,
            generate,
            json,
        } => {
            let report: Value = match (generate, file) {
                (Some(n), _) => {
                    client
                        .post(
                            "/v1/devices/import?format=ndjson",
                            "application/x-ndjson",
                            harness::fleet::ndjson(n),
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
            if json {
                output::print_json(&report);
            } else {
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
            }
            if report["failed"].as_u64().unwrap_or(0) > 0 {
                std::process::exit(2);
            }
        }
        DevicesCmd::List { filter, page, json } => {
            let mut q = filter.query();
            q.extend(page.query());
            let v: Value = client.get(&format!("/v1/devices?{}", query(&q))).await?;
            if json {
                output::print_json(&v);
                return Ok(());
            }
            let mut t = Table::new(["DEVICE", "MODEL", "HW", "FIRMWARE", "GROUPS", "TAGS"]);
            for d in v["devices"].as_array().into_iter().flatten() {
                let tags: Vec<String> = d["tags"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                    .collect();
                let groups: Vec<&str> = d["groups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                t.row([
                    output::text(d, "id"),
                    output::text(d, "model"),
                    output::text(d, "hardware_revision"),
                    output::text(d, "firmware_version"),
                    groups.join(";"),
                    tags.join(";"),
                ]);
            }
            t.print();
            output::next_page(&v);
        }
        DevicesCmd::Count { filter, json } => {
            let v: Value = client
                .get(&format!("/v1/devices/count?{}", query(&filter.query())))
                .await?;
            if json {
                output::print_json(&v);
            } else {
                println!("{}", v["count"]);
            }
        }
    }
    Ok(())
}

/// Runs `groups`.
pub(crate) async fn groups(client: &Client, json: bool) -> anyhow::Result<()> {
    let v: Value = client.get("/v1/groups").await?;
    if json {
        output::print_json(&v);
        return Ok(());
    }
    let mut t = Table::new(["GROUP", "DEVICES"]);
    for g in v["groups"].as_array().into_iter().flatten() {
        t.row([output::text(g, "group"), g["devices"].to_string()]);
    }
    t.print();
    Ok(())
}
