//! `fleetbatch token ...` and `fleetbatch audit`: API tokens and the audit log (admin).

use clap::Subcommand;
use serde_json::{Value, json};

use crate::{
    client::Client,
    output::{self, Page, Table},
};

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCmd {
    /// Create an API token; its secret is printed once and never again.
    Create {
        /// Who or what uses it (shown in the audit log), e.g. `ci-pipeline`.
        #[arg(long)]
        name: String,
        /// viewer (read), operator (create and cancel jobs) or admin.
        #[arg(long)]
        role: String,
        /// Confine an operator or viewer to these groups (comma separated or repeated).
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// Lifetime, e.g. `30d`, `12h` (default: until revoked).
        #[arg(long)]
        expires: Option<humantime::Duration>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List tokens (never their secrets).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: it stops working on every coordinator at its next request.
    Revoke {
        /// The token's id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `token` command.
pub(crate) async fn token(client: &Client, cmd: TokenCmd) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Create {
            name,
            role,
            groups,
            expires,
            json,
        } => {
            let mut body = json!({"name": name, "role": role, "groups": groups});
            if let Some(d) = expires {
                body["expires_in_secs"] = json!(d.as_secs().max(1));
            }
            let v: Value = client
                .post("/v1/tokens", "application/json", body.to_string())
                .await?;
            if json {
                output::print_json(&v);
            } else {
                eprintln!(
                    "token {} ({}) created; its secret is shown this once:",
                    output::text(&v["token"], "id"),
                    output::text(&v["token"], "role")
                );
                println!("{}", output::text(&v, "secret"));
            }
        }
        TokenCmd::List { json } => {
            let v: Value = client.get("/v1/tokens").await?;
            if json {
                output::print_json(&v);
                return Ok(());
            }
            let mut t = Table::new(["ID", "NAME", "ROLE", "GROUPS", "EXPIRES", "REVOKED"]);
            for tok in v["tokens"].as_array().into_iter().flatten() {
                let groups: Vec<String> = tok["groups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|g| g.as_str().map(str::to_owned))
                    .collect();
                t.row([
                    output::text(tok, "id"),
                    output::text(tok, "name"),
                    output::text(tok, "role"),
                    groups.join(","),
                    time(&tok["expires_at_ms"]),
                    time(&tok["revoked_at_ms"]),
                ]);
            }
            t.print();
        }
        TokenCmd::Revoke { id, json } => {
            let v: Value = client.delete(&format!("/v1/tokens/{id}")).await?;
            if json {
                output::print_json(&v);
            } else {
                println!("revoked {}", output::text(&v["token"], "id"));
            }
        }
    }
    Ok(())
}

/// `fleetbatch keys ...`: job-document signing keys.
#[derive(Debug, Subcommand)]
pub(crate) enum KeysCmd {
    /// Generate an Ed25519 signing key: the private seed goes to
    /// `coordinator.signing.key`, the public key to every device (`key_id=public`).
    Generate {
        /// Its key id.
        #[arg(long, default_value = "k1")]
        key_id: String,
    },
}

/// Runs a `keys` command (local: it calls no API).
pub(crate) fn keys(cmd: KeysCmd) -> anyhow::Result<()> {
    match cmd {
        KeysCmd::Generate { key_id } => {
            let k = shared::signing::Signer25519::generate(&key_id).map_err(anyhow::Error::msg)?;
            output::print_json(&json!({
                "key_id": key_id,
                "private_key": k.seed_hex(),
                "public_key": k.public_hex(),
                "device_entry": format!("{key_id}={}", k.public_hex()),
            }));
        }
    }
    Ok(())
}

/// Filters of `fleetbatch audit`.
#[derive(Debug, clap::Args)]
pub(crate) struct AuditArgs {
    /// Only this actor (token name, `bootstrap-admin`, `coordinator`).
    #[arg(long)]
    actor: Option<String>,
    /// Only entries about this job.
    #[arg(long)]
    job: Option<String>,
    /// Only this outcome: ok, refused or error.
    #[arg(long)]
    outcome: Option<String>,
    /// Only actions starting with this, e.g. `POST /v1/jobs` or `job.`.
    #[arg(long)]
    action: Option<String>,
    #[command(flatten)]
    page: Page,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `audit`.
pub(crate) async fn audit(client: &Client, args: AuditArgs) -> anyhow::Result<()> {
    let mut q = args.page.query();
    for (k, v) in [
        ("actor", &args.actor),
        ("job_id", &args.job),
        ("outcome", &args.outcome),
        ("action", &args.action),
    ] {
        if let Some(v) = v {
            q.push((k, v.clone()));
        }
    }
    let v: Value = client
        .get(&format!("/v1/audit?{}", output::query(&q)))
        .await?;
    if args.json {
        output::print_json(&v);
        return Ok(());
    }
    let mut t = Table::new(["AT", "ACTOR", "ROLE", "ACTION", "JOB", "STATUS", "FROM"]);
    for e in v["entries"].as_array().into_iter().flatten() {
        t.row([
            time(&e["at_ms"]),
            output::text(e, "actor"),
            output::text(e, "role"),
            output::text(e, "action"),
            output::text(e, "job_id"),
            output::text(e, "status"),
            output::text(e, "remote"),
        ]);
    }
    t.print();
    output::next_page(&v);
    Ok(())
}

/// A time in ms since the epoch as RFC 3339 (empty when absent).
fn time(v: &Value) -> String {
    v.as_u64()
        .map(|ms| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
            )
            .to_string()
        })
        .unwrap_or_default()
}
