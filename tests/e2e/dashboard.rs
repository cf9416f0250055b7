//! The dashboard as a browser uses it, over real HTTP against real coordinator and worker
//! processes: sign in with a token (session cookie), read the jobs and job pages, pause and
//! resume through the page's buttons' API calls with the page's CSRF token, see the final
//! counts equal the API's; a viewer's page has no buttons and the API refuses the action;
//! a change without the CSRF token, or from another site, is refused.

use std::time::Duration;

use reqwest::{StatusCode, header};
use serde_json::{Value, json};

use crate::{
    devices::get_json,
    helpers::{TestApp, firmware_job, spawn_app},
};

/// A browser: no bearer token, no redirects followed, cookies kept by hand.
struct Browser {
    http: reqwest::Client,
    cookie: Option<String>,
    origin: String,
}

impl Browser {
    fn new(app: &TestApp) -> Self {
        Self {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            cookie: None,
            origin: app.cluster.api.clone(),
        }
    }

    async fn get(&self, path: &str) -> (StatusCode, String, reqwest::header::HeaderMap) {
        let mut r = self.http.get(format!("{}{path}", self.origin));
        if let Some(c) = &self.cookie {
            r = r.header(header::COOKIE, c);
        }
        let r = r.send().await.expect("get");
        let (status, headers) = (r.status(), r.headers().clone());
        (status, r.text().await.unwrap_or_default(), headers)
    }

    /// Signs in with `token`; returns the answer's status.
    async fn sign_in(&mut self, token: &str) -> StatusCode {
        let r = self
            .http
            .post(format!("{}/ui/login", self.origin))
            .header(header::ORIGIN, &self.origin)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            // Tokens are letters, digits and `_`: nothing to escape.
            .body(format!("token={token}"))
            .send()
            .await
            .expect("sign in");
        if let Some(set) = r.headers().get(header::SET_COOKIE) {
            let set = set.to_str().expect("cookie");
            assert!(
                set.contains("HttpOnly") && set.contains("SameSite=Strict"),
                "{set}"
            );
            self.cookie = set.split(';').next().map(str::to_owned);
        }
        r.status()
    }

    /// What a page's button does: POST to the API with the cookie, from this origin.
    async fn press(&self, path: &str, csrf: Option<&str>, origin: &str) -> (StatusCode, String) {
        let mut r = self
            .http
            .post(format!("{}{path}", self.origin))
            .header(header::ORIGIN, origin)
            .header(header::CONTENT_TYPE, "application/json")
            .body("{}");
        if let Some(c) = &self.cookie {
            r = r.header(header::COOKIE, c);
        }
        if let Some(t) = csrf {
            r = r.header("x-csrf-token", t);
        }
        let r = r.send().await.expect("post");
        (r.status(), r.text().await.unwrap_or_default())
    }
}

/// The CSRF token a page was rendered with.
fn csrf_of(page: &str) -> String {
    let at = page
        .find(r#"name="csrf-token" content=""#)
        .expect("csrf meta")
        + 27;
    page[at..].split('"').next().expect("csrf value").to_owned()
}

/// The number a page shows for counter `key`.
fn shown(page: &str, key: &str) -> u64 {
    let marker = format!(r#"id="count-{key}">"#);
    let at = page
        .find(&marker)
        .unwrap_or_else(|| panic!("no {key} counter"))
        + marker.len();
    page[at..]
        .split('<')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{key} counter is not a number"))
}

#[tokio::test]
async fn an_operator_steers_a_job_from_the_dashboard_and_a_viewer_only_watches() {
    // Some devices fail for good: the page then shows its top errors and offers a rerun.
    let app = spawn_app(
        1,
        &[("FLEETBATCH_SIMULATOR__PERMANENT_FAILURE_RATE", "0.05")],
    )
    .await;
    let n = 300;
    app.import_fleet(n).await;
    let operator = app
        .token_secret(json!({"name": "dash-operator", "role": "operator"}))
        .await;
    let viewer = app
        .token_secret(json!({"name": "dash-viewer", "role": "viewer"}))
        .await;
    // 30 devices a second: the job runs for about ten seconds.
    let id = app
        .create_job(&firmware_job(json!({
            "name": "dashboard-rollout",
            "rollout": {"max_per_second": 30}
        })))
        .await;

    // Nobody signed in: every page leads to the sign-in page; a wrong token is refused there.
    let mut browser = Browser::new(&app);
    let (status, _, headers) = browser.get("/ui/jobs").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers[header::LOCATION], "/ui/login");
    assert_eq!(browser.sign_in("fbt_wrong").await, StatusCode::UNAUTHORIZED);
    assert!(browser.cookie.is_none());

    // The operator signs in, finds the job in the list and opens it.
    assert_eq!(browser.sign_in(&operator).await, StatusCode::SEE_OTHER);
    let (status, list, _) = browser.get("/ui/jobs").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        list.contains(&id.to_string()) && list.contains("dashboard-rollout"),
        "{list}"
    );
    let (_, filtered, _) = browser.get("/ui/jobs?state=COMPLETED").await;
    assert!(!filtered.contains(&id.to_string()), "filtered by state");
    let (status, page, _) = browser.get(&format!("/ui/jobs/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    let pause = format!("/v1/jobs/{id}/pause");
    assert!(
        page.contains(&format!(r#"data-action="{pause}""#)),
        "{page}"
    );
    assert!(page.contains("/ui/assets/app.js"));
    let csrf = csrf_of(&page);
    let own = browser.origin.clone();

    // Without the page's CSRF token, or from another site, the button's call is refused.
    let (status, body) = browser.press(&pause, None, &own).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = browser
        .press(&pause, Some(&csrf), "https://elsewhere.example")
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(app.job(id).await["state"], "IN_PROGRESS");

    // Pause and resume, as the buttons do.
    let (status, body) = browser.press(&pause, Some(&csrf), &own).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(app.job(id).await["state"], "PAUSED");
    let (_, paused, _) = browser.get(&format!("/ui/jobs/{id}")).await;
    assert!(paused.contains(&format!(r#"data-action="/v1/jobs/{id}/resume""#)));
    let (status, body) = browser
        .press(&format!("/v1/jobs/{id}/resume"), Some(&csrf), &own)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // A viewer sees the job without buttons, and the API refuses the action if forced.
    let mut watcher = Browser::new(&app);
    assert_eq!(watcher.sign_in(&viewer).await, StatusCode::SEE_OTHER);
    let (_, seen, _) = watcher.get(&format!("/ui/jobs/{id}")).await;
    assert!(
        !seen.contains("data-action"),
        "a viewer's page offers actions"
    );
    let (status, _) = watcher.press(&pause, Some(&csrf_of(&seen)), &own).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Done: the page shows the counts the API gives.
    let job = app.wait_for_job(id, Duration::from_secs(120)).await;
    let (_, done, _) = browser.get(&format!("/ui/jobs/{id}")).await;
    for key in [
        "succeeded",
        "failed",
        "rejected",
        "timed_out",
        "canceled",
        "targeted",
    ] {
        assert_eq!(Some(shown(&done, key)), job[key].as_u64(), "{key}");
    }
    for gone in ["pause", "resume", "cancel", "approve"] {
        assert!(
            !done.contains(&format!("/v1/jobs/{id}/{gone}")),
            "a finished job offers {gone}"
        );
    }
    // Its audit trail names who paused it; its top errors are there when devices failed.
    let trail = &done[done.find(r#"id="trail""#).expect("audit trail")..];
    assert!(
        trail.contains("dash-operator") && trail.contains("/pause"),
        "{trail}"
    );
    let of = |k: &str| job[k].as_u64().unwrap_or(0);
    let failed = [
        "failed",
        "rejected",
        "timed_out",
        "unhealthy",
        "rolled_back",
    ]
    .iter()
    .map(|k| of(k))
    .sum::<u64>();
    assert_eq!(
        done.contains(r#"id="errors""#),
        failed > 0,
        "top errors with {failed} failures"
    );
    // Failed or timed out devices: its page offers a rerun of exactly them.
    let undone = of("failed") + of("timed_out");
    let rerun = format!("/v1/jobs/{id}/rerun");
    assert_eq!(
        done.contains(&format!(r#"data-action="{rerun}""#)),
        undone > 0,
        "rerun button"
    );
    if undone > 0 {
        let (status, body) = browser.press(&rerun, Some(&csrf), &own).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let again: Value = serde_json::from_str(&body).expect("json");
        let again = again["job_id"]
            .as_str()
            .expect("job id")
            .parse()
            .expect("uuid");
        let second = app.wait_for_job(again, Duration::from_secs(120)).await;
        assert_eq!(second["targeted"].as_u64(), Some(undone), "{second}");
    }
    assert!(undone > 0, "no device failed: the rerun was not exercised");
    // Its devices, a page at a time, each linking to the device's page.
    assert!(
        done.contains(r#"id="next-page""#),
        "300 devices fill more than a page"
    );
    let (status, device, _) = browser.get("/ui/devices/dev-0000001").await;
    assert_eq!(status, StatusCode::OK);
    assert!(device.contains("dev-0000001"));

    // The actions are in the audit log under the operator's token.
    let audit = get_json(&app, &app.url(&format!("/v1/audit?job_id={id}"))).await;
    let by_operator: Vec<&str> = audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["actor"] == "dash-operator" && e["outcome"] == "ok")
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(
        by_operator.contains(&"POST /v1/jobs/{id}/pause")
            && by_operator.contains(&"POST /v1/jobs/{id}/resume"),
        "{audit}"
    );

    // Signing out ends the session.
    let r = browser
        .http
        .post(format!("{}/ui/logout", browser.origin))
        .header(header::ORIGIN, &own)
        .send()
        .await
        .expect("logout");
    let cleared = r.headers()[header::SET_COOKIE].to_str().expect("cookie");
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    app.teardown().await;
}
