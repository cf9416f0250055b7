//! Only who may, can (guarantee 6): every route refuses anonymous callers (but the probes),
//! each role reaches exactly the routes the policy gives it, scoped operators stay inside
//! their groups, revoked and expired tokens stop working at once, and every state-changing
//! call leaves one audit entry naming its caller.

use std::time::Duration;

use coordinator::access::{
    Role,
    policy::{Access, ROUTES},
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{TestApp, client_with_token, firmware_job, spawn_app};

const DEVICES: u64 = 200;

/// One call made in the test, for checking the audit log afterwards.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Call {
    actor: String,
    action: String,
    status: u16,
}

struct Caller {
    name: &'static str,
    role: Option<Role>,
    client: reqwest::Client,
}

async fn create_token(app: &TestApp, body: Value) -> (String, String) {
    let r = app
        .http
        .post(app.url("/v1/tokens"))
        .json(&body)
        .send()
        .await
        .expect("create token");
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value = r.json().await.expect("json");
    assert!(
        v["token"].get("secret_sha256").is_none(),
        "the hash is not shown: {v}"
    );
    (
        v["token"]["id"].as_str().expect("id").to_owned(),
        v["secret"].as_str().expect("secret").to_owned(),
    )
}

/// A page of the audit log.
async fn audit(app: &TestApp, query: &str) -> Value {
    let r = app
        .http
        .get(app.url(&format!("/v1/audit?{query}")))
        .send()
        .await
        .expect("audit");
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.expect("json")
}

/// A body that the route accepts (so an allowed call is not refused for its body).
fn body_for(method: &Method, route: &str, region: &str) -> Option<(String, &'static str)> {
    if *method != Method::POST && *method != Method::DELETE {
        return None;
    }
    match route {
        "/v1/jobs" => Some((
            firmware_job(json!({"target": {"groups": [region]}})).to_string(),
            "application/json",
        )),
        "/v1/devices/import" => Some((String::new(), "application/x-ndjson")),
        "/v1/tokens" => Some((
            json!({"name": "made-in-table", "role": "viewer"}).to_string(),
            "application/json",
        )),
        "/v1/dlq/replay" => Some(("{}".into(), "application/json")),
        _ => None,
    }
}

/// A client for the route walk: it sees each route's own answer (a redirect is not followed,
/// so what it records is what the audit log records).
fn walker(token: Option<&str>) -> reqwest::Client {
    crate::helpers::with_token(
        reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()),
        token,
    )
}

#[tokio::test]
async fn every_route_admits_exactly_the_roles_the_policy_names_and_every_write_is_audited() {
    // Arrange: a finished job to read, tokens of every role, an operator scoped to one region.
    let app = spawn_app(1, &[]).await;
    app.import_fleet(DEVICES).await;
    let [a, b] = [harness::fleet::REGIONS[0], harness::fleet::REGIONS[1]];
    let done = app
        .create_job(&firmware_job(json!({"target": {"groups": [a]}})))
        .await;
    app.wait_for_job(done, Duration::from_secs(60)).await;
    let mut calls: Vec<Call> = vec![
        Call {
            actor: "bootstrap-admin".into(),
            action: "POST /v1/devices/import".into(),
            status: 200,
        },
        Call {
            actor: "bootstrap-admin".into(),
            action: "POST /v1/jobs".into(),
            status: 201,
        },
    ];
    let mut tokens = Vec::new();
    for (name, role) in [
        ("viewer-1", "viewer"),
        ("operator-1", "operator"),
        ("admin-1", "admin"),
    ] {
        let (_, secret) = create_token(&app, json!({"name": name, "role": role})).await;
        calls.push(Call {
            actor: "bootstrap-admin".into(),
            action: "POST /v1/tokens".into(),
            status: 201,
        });
        tokens.push((name, role.parse::<Role>().expect("role"), secret));
    }
    let mut callers = vec![Caller {
        name: "unauthenticated",
        role: None,
        client: walker(None),
    }];
    callers.push(Caller {
        name: "bogus",
        role: None,
        client: walker(Some("fbt_0000")),
    });
    for (name, role, secret) in &tokens {
        callers.push(Caller {
            name,
            role: Some(*role),
            client: walker(Some(secret)),
        });
    }

    // Act and assert: every route, every caller.
    for (method, route, access) in ROUTES {
        for caller in &callers {
            // Ids that exist: a finished job, a token made to be revoked.
            let mut path = route.replace("{id}", &done.to_string());
            if *route == "/v1/tokens/{id}" {
                let (id, _) =
                    create_token(&app, json!({"name": "to-revoke", "role": "viewer"})).await;
                calls.push(Call {
                    actor: "bootstrap-admin".into(),
                    action: "POST /v1/tokens".into(),
                    status: 201,
                });
                path = format!("/v1/tokens/{id}");
            }
            if *route == "/v1/jobs/{id}/cancel" {
                // A fresh unfinished job each time (a finished one answers 409 to an admin).
                let id = app
                    .create_job(&firmware_job(
                        json!({"target": {"groups": [a]}, "rollout": {"max_per_second": 1}}),
                    ))
                    .await;
                calls.push(Call {
                    actor: "bootstrap-admin".into(),
                    action: "POST /v1/jobs".into(),
                    status: 201,
                });
                path = format!("/v1/jobs/{id}/cancel");
            }
            let mut req = caller.client.request(method.clone(), app.url(&path));
            if let Some((body, ct)) = body_for(method, route, a) {
                req = req.header("content-type", ct).body(body);
            }
            // Headers only: an event stream would go on.
            let status = req.send().await.expect("request").status();
            let needed = match access {
                Access::Public | Access::Metrics => None,
                Access::Role(r) => Some(*r),
            };
            let allowed = needed.is_none_or(|n| caller.role.is_some_and(|r| r >= n));
            let expected_refusal = if caller.role.is_none() {
                StatusCode::UNAUTHORIZED
            } else {
                StatusCode::FORBIDDEN
            };
            if allowed {
                assert!(
                    status != StatusCode::UNAUTHORIZED
                        && status != StatusCode::FORBIDDEN
                        && !status.is_server_error(),
                    "{} on {method} {path}: {status}",
                    caller.name
                );
            } else {
                assert_eq!(
                    status, expected_refusal,
                    "{} on {method} {path}",
                    caller.name
                );
            }
            if *method != Method::GET {
                calls.push(Call {
                    actor: if caller.role.is_some() {
                        caller.name.to_owned()
                    } else {
                        "unauthenticated".into()
                    },
                    action: format!("{method} {route}"),
                    status: status.as_u16(),
                });
            }
        }
    }

    // A scoped operator: its own region yes; another region, a device of another region and
    // the whole fleet no, each refused naming what is outside.
    let (_, scoped_secret) = create_token(
        &app,
        json!({"name": "eu-ops", "role": "operator", "groups": [a]}),
    )
    .await;
    calls.push(Call {
        actor: "bootstrap-admin".into(),
        action: "POST /v1/tokens".into(),
        status: 201,
    });
    let scoped = client_with_token(Some(&scoped_secret));
    let outsider = (0..DEVICES)
        .map(harness::fleet::device)
        .find(|d| d.groups.iter().any(|g| g == b))
        .expect("a device of region b")
        .id;
    for (target, want, named) in [
        (json!({"groups": [a]}), 201, None),
        (json!({"groups": [a, b]}), 403, Some(b.to_owned())),
        (json!({"devices": [outsider]}), 403, Some(outsider.clone())),
        (
            json!({"filter": {"model": "gw-100"}}),
            403,
            Some("whole fleet".to_owned()),
        ),
    ] {
        let r = scoped
            .post(app.url("/v1/jobs"))
            .json(&firmware_job(json!({"target": target})))
            .send()
            .await
            .expect("create");
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or_default();
        assert_eq!(status, want, "{target}: {body}");
        if let Some(n) = named {
            let msg = body["error"].as_str().unwrap_or_default();
            assert!(msg.contains(&n), "the refusal names {n}: {body}");
        }
        calls.push(Call {
            actor: "eu-ops".into(),
            action: "POST /v1/jobs".into(),
            status,
        });
    }

    // Revocation holds from the next request; an expired token is refused.
    let (id, secret) = create_token(&app, json!({"name": "short-lived", "role": "viewer"})).await;
    calls.push(Call {
        actor: "bootstrap-admin".into(),
        action: "POST /v1/tokens".into(),
        status: 201,
    });
    let short = client_with_token(Some(&secret));
    let whoami = short
        .get(app.url("/v1/whoami"))
        .send()
        .await
        .expect("whoami");
    assert_eq!(whoami.status(), StatusCode::OK);
    let r = app
        .http
        .delete(app.url(&format!("/v1/tokens/{id}")))
        .send()
        .await
        .expect("revoke");
    assert_eq!(r.status(), StatusCode::OK);
    calls.push(Call {
        actor: "bootstrap-admin".into(),
        action: "DELETE /v1/tokens/{id}".into(),
        status: 200,
    });
    let revoked_at = tokio::time::Instant::now();
    let r = short
        .get(app.url("/v1/jobs"))
        .send()
        .await
        .expect("after revoke");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
    assert!(r.text().await.unwrap_or_default().contains("revoked"));
    let (_, secret) = create_token(
        &app,
        json!({"name": "one-second", "role": "viewer", "expires_in_secs": 1}),
    )
    .await;
    calls.push(Call {
        actor: "bootstrap-admin".into(),
        action: "POST /v1/tokens".into(),
        status: 201,
    });
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = client_with_token(Some(&secret))
        .get(app.url("/v1/jobs"))
        .send()
        .await
        .expect("expired");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.text().await.unwrap_or_default().contains("expired"));

    // Assert: one audit entry per state-changing call, with the caller's identity and the
    // status it was answered.
    let mut logged = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = audit(&app, &format!("limit=1000&cursor={cursor}")).await;
        for e in page["entries"].as_array().expect("entries") {
            let action = e["action"].as_str().expect("action");
            if action.starts_with("job.") {
                continue;
            }
            assert!(
                !e["request_id"].as_str().unwrap_or_default().is_empty(),
                "{e}"
            );
            assert!(
                e["remote"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with("127.0.0.1:"),
                "{e}"
            );
            logged.push(Call {
                actor: e["actor"].as_str().expect("actor").to_owned(),
                action: action.to_owned(),
                status: e["status"].as_u64().expect("status") as u16,
            });
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_owned(),
            None => break,
        }
    }
    logged.sort();
    calls.sort();
    assert_eq!(
        logged, calls,
        "the audit log holds exactly the state-changing calls"
    );
    // Job state changes are logged too, by the coordinator.
    let lifecycle = audit(&app, &format!("job_id={done}&action=job.")).await;
    let states: Vec<&str> = lifecycle["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(states.contains(&"job.COMPLETED"), "{lifecycle}");
    app.teardown().await;
}
