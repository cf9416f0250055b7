//! Dynamic targets on real processes: after a partial firmware rollout the registry knows
//! which devices run the new version, so `firmware_version < 2.1.0` selects exactly the
//! devices not yet updated, in a listing, a count and as a job's target; a continuous job
//! reaches devices registered or added to its group after it started; a deleted device
//! leaves the registry.

use std::{collections::HashSet, time::Duration};

use serde_json::{Value, json};
use shared::state::ExecutionState;

use crate::helpers::{fleet_ids, spawn_app};

#[tokio::test]
async fn after_a_partial_rollout_a_version_query_selects_exactly_the_devices_not_yet_updated() {
    let app = spawn_app(
        2,
        &[
            ("FLEETBATCH_SIMULATOR__PERMANENT_FAILURE_RATE", "0.2"),
            ("FLEETBATCH_SIMULATOR__TRANSIENT_FAILURE_RATE", "0"),
            ("FLEETBATCH_SIMULATOR__REJECT_RATE", "0"),
            ("FLEETBATCH_SIMULATOR__OFFLINE_RATE", "0"),
        ],
    )
    .await;
    let n = 2_000;
    app.import_fleet(n).await;
    let query = "firmware_version < 2.1.0";
    let count = |out: String| -> u64 {
        let v: Value = serde_json::from_str(&out).expect("json");
        v["count"].as_u64().expect("count")
    };
    let before = app
        .fleetbatch(&["devices", "count", "--query", query, "--json"])
        .await;
    assert_eq!(count(before), n, "every device starts on 1.x");

    let id = app
        .create_job(&json!({
            "name": "fw 2.1.0",
            "target": {"groups": ["fleet"]},
            "retry": {"max_attempts": 1},
            "action": {"type": "firmware_update", "url": "https://fw.example.com/2.1.0.bin",
                       "version": "2.1.0",
                       "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}
        }))
        .await;
    let job = app.wait_for_job(id, Duration::from_secs(120)).await;
    let statuses = app.assert_exact(id, &fleet_ids(n)).await;
    let not_updated: HashSet<String> = statuses
        .iter()
        .filter(|(_, s)| s.state != ExecutionState::Succeeded)
        .map(|(d, _)| d.clone())
        .collect();
    let succeeded = job["succeeded"].as_u64().expect("succeeded");
    assert!(succeeded > 0 && !not_updated.is_empty(), "{job}");

    // The listing and the count name exactly the devices that did not succeed.
    let listed: Value = serde_json::from_str(
        &app.fleetbatch(&[
            "devices", "list", "--query", query, "--limit", "10000", "--json",
        ])
        .await,
    )
    .expect("json");
    let ids: HashSet<String> = listed["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["id"].as_str().expect("id").to_owned())
        .collect();
    let extra: Vec<_> = ids.difference(&not_updated).take(5).collect();
    let missing: Vec<_> = not_updated.difference(&ids).take(5).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "listed {} devices, {} not updated; listed but updated: {extra:?}, not listed: {missing:?}",
        ids.len(),
        not_updated.len()
    );
    let after = app
        .fleetbatch(&["devices", "count", "--query", query, "--json"])
        .await;
    assert_eq!(count(after), n - succeeded);
    let updated = app
        .fleetbatch(&[
            "devices",
            "count",
            "--query",
            "firmware_version = 2.1.0 and group = fleet",
            "--json",
        ])
        .await;
    assert_eq!(count(updated), succeeded);

    // The same query as a job's target reaches exactly them.
    let (status, body) = app
        .post_job(
            &json!({"target": {"query": "firmware < 2.1.0"},
                    "action": {"type": "reboot"}})
            .to_string(),
            "application/json",
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["field"], "target.query", "{body}");
    let retry = app
        .create_job(&json!({"name": "retry 2.1.0", "target": {"query": query},
            "action": {"type": "reboot"}}))
        .await;
    app.wait_for_job(retry, Duration::from_secs(120)).await;
    app.assert_exact(retry, &not_updated).await;
    app.teardown().await;
}

#[tokio::test]
async fn a_continuous_job_reaches_devices_registered_after_it_started_and_only_those_that_match() {
    let app = spawn_app(
        2,
        &[
            ("FLEETBATCH_SIMULATOR__PERMANENT_FAILURE_RATE", "0"),
            ("FLEETBATCH_SIMULATOR__TRANSIENT_FAILURE_RATE", "0"),
            ("FLEETBATCH_SIMULATOR__REJECT_RATE", "0"),
            ("FLEETBATCH_SIMULATOR__OFFLINE_RATE", "0"),
        ],
    )
    .await;
    app.import_fleet(1_000).await;
    let mut spec = crate::helpers::firmware_job(json!({"continuous": true}));
    spec["target"] = json!({"groups": ["fleet"]});
    let id = app.create_job(&spec).await;
    let running = crate::rollouts::wait_until(&app, id, Duration::from_secs(60), |j| {
        j["succeeded"].as_u64() == Some(1_000)
    })
    .await;
    assert_eq!(
        running["state"], "IN_PROGRESS",
        "a continuous job goes on: {running}"
    );

    // 1,000 devices registered later in the group, and 10 in another group only.
    app.import_fleet(2_000).await;
    let others: Vec<u8> = (0..10)
        .flat_map(|i| {
            let mut line =
                serde_json::to_vec(&json!({"id": format!("other-{i}"), "groups": ["lab"]}))
                    .expect("json");
            line.push(b'\n');
            line
        })
        .collect();
    app.import_ndjson(others).await;
    let grown = crate::rollouts::wait_until(&app, id, Duration::from_secs(60), |j| {
        j["succeeded"].as_u64() == Some(2_000)
    })
    .await;
    assert_eq!(grown["state"], "IN_PROGRESS", "{grown}");
    // A device added to the group later gets it too.
    let updated: Value = serde_json::from_str(
        &app.fleetbatch(&[
            "devices", "update", "other-0", "--group", "lab", "--group", "fleet",
        ])
        .await,
    )
    .expect("json");
    assert_eq!(updated["groups"], json!(["lab", "fleet"]), "{updated}");
    crate::rollouts::wait_until(&app, id, Duration::from_secs(60), |j| {
        j["succeeded"].as_u64() == Some(2_001)
    })
    .await;

    // Ended by a cancel: exactly the 2,001 members, each once.
    let r = app.cancel(id).await;
    assert!((200..300).contains(&r), "{r}");
    let done = app.wait_for_job(id, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "CANCELED", "{done}");
    assert_eq!(done["succeeded"], 2_001, "{done}");
    let mut members = fleet_ids(2_000);
    members.insert("other-0".into());
    app.assert_exact(id, &members).await;

    // A device deleted from the registry leaves its groups; the job keeps its record.
    let out = app.fleetbatch(&["devices", "delete", "dev-0000000"]).await;
    assert!(out.contains("deleted"), "{out}");
    let count: Value = serde_json::from_str(
        &app.fleetbatch(&["devices", "count", "--group", "fleet", "--json"])
            .await,
    )
    .expect("json");
    assert_eq!(count["count"], 2_000, "1,999 generated members and other-0");
    let r = app
        .http
        .get(app.url("/v1/devices/dev-0000000"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404);
    assert_eq!(app.statuses(id).await.len(), 2_001);
    app.teardown().await;
}

#[tokio::test]
async fn a_saved_query_targets_what_it_selects_and_an_unknown_one_is_refused_by_name() {
    let app = spawn_app(1, &[]).await;
    let n = 1_000;
    app.import_fleet(n).await;
    let query = "firmware_version < 1.2.0 and hardware_revision in (A, B)";
    let out = app.fleetbatch(&["query", "save", "old-ab", query]).await;
    assert!(out.contains("old-ab"), "{out}");
    let listed = app.fleetbatch(&["query", "list"]).await;
    assert!(listed.contains("old-ab"), "{listed}");
    let selected: Value = serde_json::from_str(
        &app.fleetbatch(&[
            "devices", "list", "--query", query, "--limit", "10000", "--json",
        ])
        .await,
    )
    .expect("json");
    let expected: HashSet<String> = selected["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["id"].as_str().expect("id").to_owned())
        .collect();
    assert!(!expected.is_empty() && expected.len() < n as usize);

    let id = app
        .create_job(&json!({"target": {"saved_query": "old-ab"}, "action": {"type": "reboot"}}))
        .await;
    let job = app.wait_for_job(id, Duration::from_secs(60)).await;
    assert_eq!(job["spec"]["target"]["query"], query, "{job}");
    app.assert_exact(id, &expected).await;

    let (status, body) = app
        .post_job(
            &json!({"target": {"saved_query": "nope"}, "action": {"type": "reboot"}}).to_string(),
            "application/json",
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["field"], "target.saved_query", "{body}");
    let r = app
        .http
        .put(app.url("/v1/queries/bad"))
        .json(&json!({"query": "firmware ~ 2"}))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 422);
    let out = app.fleetbatch(&["query", "delete", "old-ab"]).await;
    assert!(out.contains("deleted"), "{out}");
    app.teardown().await;
}
