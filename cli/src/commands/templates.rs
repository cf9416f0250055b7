//! `fleetbatch template`: job templates (create, list, show, delete). Jobs are made from
//! them with `fleetbatch job create --template NAME --param name=value`.

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::Value;

use crate::{
    client::Client,
    output::{self, Table},
};

#[derive(Debug, Subcommand)]
pub(crate) enum TemplateCmd {
    /// Store a template from a file (TOML or JSON): `name`, `description`,
    /// `[[parameters]]` (name, description, default) and `[spec]` with `{{name}}`
    /// placeholders in its string values.
    Create {
        /// The template file.
        #[arg(long)]
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every template with its parameters.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One template.
    Show {
        /// Template name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a template (jobs made from it stay).
    Delete {
        /// Template name.
        name: String,
    },
}

fn parameters(t: &Value) -> String {
    t["parameters"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| match p["default"].as_str() {
            Some(d) => format!("{}={d}", output::text(p, "name")),
            None => output::text(p, "name"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) async fn run(client: &Client, cmd: TemplateCmd) -> anyhow::Result<()> {
    match cmd {
        TemplateCmd::Create { file, json } => {
            let (ct, text) = super::read_document(&file).await?;
            let v: Value = client.post("/v1/templates", ct, text).await?;
            if json {
                output::print_json(&v);
            } else {
                println!("{} ({})", output::text(&v, "name"), parameters(&v));
            }
        }
        TemplateCmd::List { json } => {
            let v: Value = client.get("/v1/templates").await?;
            if json {
                output::print_json(&v);
                return Ok(());
            }
            let mut t = Table::new(["TEMPLATE", "PARAMETERS", "DESCRIPTION"]);
            for tpl in v["templates"].as_array().into_iter().flatten() {
                t.row([
                    output::text(tpl, "name"),
                    parameters(tpl),
                    output::text(tpl, "description"),
                ]);
            }
            t.print();
        }
        TemplateCmd::Show { name, json } => {
            let v: Value = client.get(&format!("/v1/templates/{name}")).await?;
            if json {
                output::print_json(&v);
            } else {
                println!("{} ({})", output::text(&v, "name"), parameters(&v));
                println!("{}", serde_json::to_string_pretty(&v["spec"])?);
            }
        }
        TemplateCmd::Delete { name } => {
            let _: Value = client.delete(&format!("/v1/templates/{name}")).await?;
            println!("{name} deleted");
        }
    }
    Ok(())
}
