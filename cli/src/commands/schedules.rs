//! `fleetbatch schedule`: recurring jobs (create, list, show, pause, resume, delete).

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::Value;

use crate::{
    client::Client,
    output::{self, Table},
};

#[derive(Debug, Subcommand)]
pub(crate) enum ScheduleCmd {
    /// Create a recurring job from a job file with `schedule.cron` (TOML or JSON): each
    /// occurrence creates a child job.
    Create {
        /// The job file.
        #[arg(long)]
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every schedule with its next occurrence.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One schedule with its child jobs, newest first.
    Show {
        /// Schedule id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop firing occurrences.
    Pause {
        /// Schedule id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Fire occurrences again, from now on (none missed during the pause runs).
    Resume {
        /// Schedule id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a schedule; its child jobs stay.
    Delete {
        /// Schedule id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn when(v: &Value, field: &str) -> String {
    v[field]
        .as_u64()
        .map(|ms| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
            )
            .to_string()
        })
        .unwrap_or_else(|| "-".into())
}

fn summary(v: &Value) {
    println!(
        "{} {} {:?} ({}) next {}",
        output::text(v, "schedule_id"),
        output::text(v, "state"),
        output::text(v, "cron"),
        output::text(v, "time_zone"),
        when(v, "next_occurrence_ms"),
    );
    for r in v["runs"].as_array().into_iter().flatten() {
        println!(
            "  {} {}",
            when(r, "occurrence_ms"),
            output::text(r, "job_id")
        );
    }
}

pub(crate) async fn run(client: &Client, cmd: ScheduleCmd) -> anyhow::Result<()> {
    let (v, json): (Value, bool) = match cmd {
        ScheduleCmd::Create { file, json } => {
            let (ct, text) = super::read_document(&file).await?;
            (client.post("/v1/schedules", ct, text).await?, json)
        }
        ScheduleCmd::List { json } => {
            let v: Value = client.get("/v1/schedules").await?;
            if !json {
                let mut t =
                    Table::new(["SCHEDULE", "NAME", "STATE", "CRON", "ZONE", "NEXT", "RUNS"]);
                for s in v["schedules"].as_array().into_iter().flatten() {
                    t.row([
                        output::text(s, "schedule_id"),
                        output::text(s, "name"),
                        output::text(s, "state"),
                        output::text(s, "cron"),
                        output::text(s, "time_zone"),
                        when(s, "next_occurrence_ms"),
                        s["runs"].as_array().map_or(0, Vec::len).to_string(),
                    ]);
                }
                t.print();
                return Ok(());
            }
            (v, json)
        }
        ScheduleCmd::Show { id, json } => (client.get(&format!("/v1/schedules/{id}")).await?, json),
        ScheduleCmd::Pause { id, json } => (
            client
                .post(&format!("/v1/schedules/{id}/pause"), "application/json", "")
                .await?,
            json,
        ),
        ScheduleCmd::Resume { id, json } => (
            client
                .post(
                    &format!("/v1/schedules/{id}/resume"),
                    "application/json",
                    "",
                )
                .await?,
            json,
        ),
        ScheduleCmd::Delete { id, json } => {
            let v: Value = client.delete(&format!("/v1/schedules/{id}")).await?;
            if !json {
                println!("{id} deleted");
                return Ok(());
            }
            (v, json)
        }
    };
    if json {
        output::print_json(&v);
    } else {
        summary(&v);
    }
    Ok(())
}
