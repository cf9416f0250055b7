//! `fleetbatch query`: saved device queries (dynamic groups), named by jobs as
//! `target.saved_query`.

use clap::Subcommand;
use serde_json::{Value, json};

use crate::{
    client::Client,
    output::{self, Table},
};

#[derive(Debug, Subcommand)]
pub(crate) enum QueryCmd {
    /// Save (or replace) a query under a name, e.g. `query save old-fw 'firmware_version <
    /// 2.1.0'`; it is checked first.
    Save {
        /// Name.
        name: String,
        /// The query.
        query: String,
    },
    /// Every saved query.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a saved query (jobs created with it keep its text).
    Delete {
        /// Name.
        name: String,
    },
}

pub(crate) async fn run(client: &Client, cmd: QueryCmd) -> anyhow::Result<()> {
    match cmd {
        QueryCmd::Save { name, query } => {
            let v: Value = client
                .put(
                    &format!("/v1/queries/{name}"),
                    json!({ "query": query }).to_string(),
                )
                .await?;
            println!(
                "{}: {}",
                output::text(&v, "name"),
                output::text(&v, "query")
            );
        }
        QueryCmd::List { json } => {
            let v: Value = client.get("/v1/queries").await?;
            if json {
                output::print_json(&v);
                return Ok(());
            }
            let mut t = Table::new(["QUERY", "TEXT"]);
            for q in v["queries"].as_array().into_iter().flatten() {
                t.row([output::text(q, "name"), output::text(q, "query")]);
            }
            t.print();
        }
        QueryCmd::Delete { name } => {
            let _: Value = client.delete(&format!("/v1/queries/{name}")).await?;
            println!("{name} deleted");
        }
    }
    Ok(())
}
