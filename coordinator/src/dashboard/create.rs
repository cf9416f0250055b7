//! The new-job page: a spec editor (TOML or JSON, as `fleetbatch job create` takes), its dry
//! run shown before anything exists (targets, skipped devices by reason, the breakdown by
//! group, model and hardware revision, waves, ETA), and the create itself. Field errors
//! from the API are shown beside the editor, naming the field.
//!
//! The page's script calls `POST /v1/jobs?dry_run=true`, then `POST /v1/jobs` with an
//! idempotency key bound to the previewed text; it never creates anything itself.

use std::sync::Arc;

use axum::{
    extract::{Query, State},
    response::{IntoResponse, Response},
};
use maud::html;

use super::{SignedIn, forbidden, page};
use crate::{access::Role, app::AppState};

/// The spec the editor opens with: three waves, the second behind a manual approval.
const EXAMPLE: &str = r#"name = "firmware 2.1.0"

[target]
# Every device of the registry not on 2.1.0 yet.
query = "firmware_version < 2.1.0"

[action]
type = "firmware_update"
url = "https://fw.example.com/2.1.0.bin"
version = "2.1.0"
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

[[rollout.waves]]
name = "canary"
percent = 5
success_threshold = 95
approval = "manual"

[[rollout.waves]]
name = "early"
percent = 25
success_threshold = 95

[[rollout.waves]]
name = "everyone"
"#;

#[derive(serde::Deserialize)]
pub(super) struct NewQuery {
    /// Start from this job's spec (a copy to edit).
    from: Option<uuid::Uuid>,
}

pub(super) async fn editor(
    State(app): State<Arc<AppState>>,
    SignedIn { caller, csrf }: SignedIn,
    Query(q): Query<NewQuery>,
) -> Response {
    if caller.role < Role::Operator {
        return forbidden(Role::Operator);
    }
    let mut redis = app.redis.clone();
    let start = match q.from {
        Some(id) => match crate::jobs::get(&mut redis, &app.names, id).await {
            Ok(Some(job)) => {
                let mut spec = job.spec;
                spec.name = spec.name.map(|n| format!("{n} (copy)"));
                serde_json::to_string_pretty(&spec).unwrap_or_default()
            }
            Ok(None) => EXAMPLE.to_owned(),
            Err(e) => return crate::api::unavailable(e),
        },
        None => EXAMPLE.to_owned(),
    };
    page(
        "New job",
        Some(&caller),
        &csrf,
        None,
        html! {
            h1 { "New job" }
            p.hint {
                "The job spec in TOML or JSON (a document starting with " code { "{" } " is JSON), as "
                code { "fleetbatch job create" } " takes it. Preview shows what it would do; nothing exists until you create it."
            }
            textarea id="spec" spellcheck="false" rows="24" { (start) }
            p.error id="spec-error" {}
            div.actions {
                button id="preview" type="button" { "Preview (dry run)" }
                button id="create" type="button" disabled { "Create job" }
            }
            div id="preview-out" {}
        },
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use shared::job::{JobSpec, SpecFormat, SpecLimits};

    #[test]
    fn the_editor_opens_with_a_valid_three_wave_spec() {
        let limits = SpecLimits {
            max_document_bytes: 64 * 1024,
            max_explicit_devices: 10,
        };
        let spec = JobSpec::parse(super::EXAMPLE, SpecFormat::Toml, limits).expect("valid");
        assert_eq!(spec.rollout.waves.len(), 3);
        assert!(spec.target.query.is_some());
    }
}
