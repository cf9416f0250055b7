//! `fleetbatch dlq ...`: the dead-letter queue.

use clap::Subcommand;
use serde_json::{Value, json};

use crate::{
    client::Client,
    output::{self, Table},
};

#[derive(Debug, Subcommand)]
pub(crate) enum DlqCmd {
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
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `dlq` command.
pub(crate) async fn run(client: &Client, cmd: DlqCmd) -> anyhow::Result<()> {
    match cmd {
        DlqCmd::List { limit, json } => {
            let v: Value = client.get(&format!("/v1/dlq?limit={limit}")).await?;
            if json {
                output::print_json(&v);
                return Ok(());
            }
            let messages = v["messages"].as_array().cloned().unwrap_or_default();
            let mut t = Table::new(["MESSAGE", "FROM", "BYTES", "REASON"]);
            for m in &messages {
                t.row([
                    output::text(m, "message_id"),
                    output::text(m, "source_queue"),
                    m["size"].to_string(),
                    output::text(m, "reason"),
                ]);
            }
            println!("{} dead-lettered message(s)", messages.len());
            t.print();
        }
        DlqCmd::Replay {
            ids,
            only_decodable,
            json,
        } => {
            let mut body = json!({"only_decodable": only_decodable});
            if !ids.is_empty() {
                body["message_ids"] = json!(ids);
            }
            let v: Value = client
                .post("/v1/dlq/replay", "application/json", body.to_string())
                .await?;
            if json {
                output::print_json(&v);
            } else {
                println!("replayed {}, kept {}", v["replayed"], v["kept"]);
            }
        }
    }
    Ok(())
}
