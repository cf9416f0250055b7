//! The dashboard in a real browser: Debian's headless Chromium, driven over WebDriver
//! (chromedriver) against real coordinator and worker processes. An operator signs in,
//! creates a three-wave job after reading its dry run (a field error shown first), sees the
//! counts change without a reload, approves the manual gate, pauses and resumes, and sees it
//! complete with the counts `fleetbatch job get` prints; a viewer sees no button and the API
//! refuses the action when the page's script is made to call it. A screenshot of each page
//! is kept under `target/screenshots/`. A second test times the page of a 100,000-device job.
//!
//! The test command installs `chromium` and `chromium-driver` when missing
//! (`deploy/dev/browser.sh`).

use std::{path::PathBuf, time::Duration};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app, system_binary, wait_for_port};

/// A headless Chromium session, with the chromedriver it talks to.
struct Browser {
    client: Client,
    base: String,
    driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start(app: &TestApp) -> Self {
        let driver = system_binary("chromedriver");
        let chromium = system_binary("chromium");
        assert!(
            std::path::Path::new(&driver).exists() && std::path::Path::new(&chromium).exists(),
            "Chromium and chromedriver are needed (Debian: apt-get install chromium chromium-driver; \
             deploy/dev/browser.sh installs them)"
        );
        let port = harness::cluster::free_port().expect("port");
        let child = tokio::process::Command::new(&driver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            // Its own process group, so the Chromium it starts goes with it (see Drop).
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");
        wait_for_port(port, "chromedriver").await;
        let profile = tempfile::tempdir().expect("profile dir");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                // Without the background-networking flags Chromium keeps calling out to
                // hosts a closed network refuses.
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                    "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }),
        );
        let client = ClientBuilder::rustls()
            .expect("tls")
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a Chromium session");
        Self {
            client,
            base: app.cluster.api.clone(),
            driver: child,
            _profile: profile,
        }
    }

    async fn open(&self, path: &str) {
        self.client
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap_or_else(|e| panic!("open {path}: {e}"));
    }

    async fn sign_in(&self, token: &str) {
        self.open("/ui/login").await;
        self.find("input[name=token]")
            .await
            .send_keys(token)
            .await
            .expect("typed");
        self.click("input[type=submit][value='Sign in']").await;
        self.wait_for_path("/ui/jobs").await;
    }

    async fn sign_out(&self) {
        self.click("input[value='Sign out']").await;
        self.wait_for_path("/ui/login").await;
    }

    /// The element `css`, once it is there (up to a minute).
    async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(Duration::from_secs(60))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
    }

    async fn click(&self, css: &str) {
        self.find(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// The text of the element `css`, once it is there. The page renders itself again when a
    /// job's state or gate changes, so an element found may be gone before it is read: it is
    /// then found again on the new page.
    async fn text(&self, css: &str) -> String {
        let end = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match self.find(css).await.text().await {
                Ok(t) => return t,
                Err(e) => assert!(tokio::time::Instant::now() < end, "the text of {css}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn number(&self, css: &str) -> u64 {
        let t = self.text(css).await;
        t.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{css} shows {t:?}"))
    }

    async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.client
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("script {script}: {e}"))
    }

    async fn path(&self) -> String {
        self.client
            .current_url()
            .await
            .map(|u| u.path().to_owned())
            .unwrap_or_default()
    }

    async fn wait_for_path(&self, prefix: &str) {
        self.until(
            &format!("the page {prefix}"),
            Duration::from_secs(30),
            || async { self.path().await.starts_with(prefix) },
        )
        .await;
    }

    /// Polls `ready` every 200 ms until it holds, failing the test after `limit`.
    async fn until<F, Fut>(&self, what: &str, limit: Duration, ready: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let end = tokio::time::Instant::now() + limit;
        while !ready().await {
            assert!(
                tokio::time::Instant::now() < end,
                "{what}: not within {limit:?} (at {})",
                self.path().await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Keeps a screenshot of the page as `target/screenshots/{name}.png`.
    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = screenshots();
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        std::fs::write(dir.join(format!("{name}.png")), png).expect("screenshot written");
    }

    /// The cells' texts of table `css`, row by row.
    async fn rows(&self, css: &str) -> Vec<Vec<String>> {
        let v = self
            .js(
                "return [...document.querySelectorAll(arguments[0] + ' tr')]\
                 .map(r => [...r.cells].map(c => c.textContent))",
                vec![json!(css)],
            )
            .await;
        serde_json::from_value(v).expect("rows of text")
    }

    async fn has(&self, css: &str) -> bool {
        !self
            .client
            .find_all(Locator::Css(css))
            .await
            .unwrap_or_default()
            .is_empty()
    }
}

impl Drop for Browser {
    /// A test that fails leaves no Chromium behind: the driver's whole process group goes.
    fn drop(&mut self) {
        if let Some(pid) = self.driver.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Where screenshots are kept: `target/screenshots`.
fn screenshots() -> PathBuf {
    harness::cluster::bin_dir()
        .expect("bins")
        .parent()
        .expect("target dir")
        .join("screenshots")
}

/// The job the operator writes: 400 devices at 20 a second, in three waves, the canary's
/// gate waiting for an approval.
const THREE_WAVES: &str = r#"name = "browser-rollout"

[target]
groups = ["fleet"]

[action]
type = "firmware_update"
url = "https://fw.example.com/2.1.0.bin"
version = "2.1.0"
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

[rollout]
max_per_second = 20

[[rollout.waves]]
name = "canary"
count = 20
approval = "manual"

[[rollout.waves]]
name = "half"
percent = 50

[[rollout.waves]]
name = "rest"
"#;

/// Puts `text` in the spec editor as typing would (an `input` event follows).
async fn write_spec(b: &Browser, text: &str) {
    b.js(
        "const s = document.getElementById('spec'); s.value = arguments[0]; \
         s.dispatchEvent(new Event('input'));",
        vec![json!(text)],
    )
    .await;
}

#[tokio::test]
async fn an_operator_runs_a_three_wave_rollout_from_the_browser_and_a_viewer_only_watches() {
    let app = spawn_app(2, &[("FLEETBATCH_SIMULATOR__LATENCY_MS", "5")]).await;
    let n = 400;
    app.import_fleet(n).await;
    let operator = app
        .token_secret(json!({"name": "web-operator", "role": "operator"}))
        .await;
    let viewer = app
        .token_secret(json!({"name": "web-viewer", "role": "viewer"}))
        .await;
    let b = Browser::start(&app).await;

    // Not signed in: the sign-in page.
    b.open("/ui/jobs").await;
    b.wait_for_path("/ui/login").await;
    b.screenshot("sign-in").await;
    b.sign_in(&operator).await;

    // The editor: a misspelt field is named beside it, and nothing can be created.
    b.open("/ui/new").await;
    write_spec(&b, &THREE_WAVES.replace("approval =", "aproval =")).await;
    b.click("#preview").await;
    b.until("the field error", Duration::from_secs(10), || async {
        !b.text("#spec-error").await.is_empty()
    })
    .await;
    let error = b.text("#spec-error").await;
    assert!(error.contains("rollout.waves[0].aproval"), "{error}");
    assert_eq!(
        b.js("return document.getElementById('create').disabled", vec![])
            .await,
        json!(true)
    );

    // The dry run of the right spec: 400 devices, waves of 20, 200 and 180.
    write_spec(&b, THREE_WAVES).await;
    b.click("#preview").await;
    b.text("#preview-waves").await;
    assert_eq!(
        b.rows("#preview-waves").await,
        [
            ["1. canary", "20 devices"],
            ["2. half", "200 devices"],
            ["3. rest", "180 devices"]
        ]
    );
    let summary = b.rows("#preview-summary").await;
    assert_eq!(summary[0], ["targeted", "400"], "{summary:?}");
    assert!(app.job_if_any().await.is_none(), "a dry run created a job");
    b.screenshot("new-job-dry-run").await;

    // Create: the job's page.
    b.click("#create:not([disabled])").await;
    b.wait_for_path("/ui/jobs/").await;
    let id: uuid::Uuid = b
        .path()
        .await
        .trim_start_matches("/ui/jobs/")
        .parse()
        .expect("the job's page");

    // The canary finishes and waits for an approval: the page offers it.
    b.click(&format!("button[data-action='/v1/jobs/{id}/approve']"))
        .await;
    // (The click above happened once the button appeared, after the canary's 20 devices.)
    assert_eq!(app.job(id).await["rollout"]["waves"][0]["size"], 20);

    // After the approval the next wave runs: the counters move while the page stays loaded.
    b.until("the approval taken", Duration::from_secs(30), || async {
        b.has(&format!("button[data-action='/v1/jobs/{id}/pause']"))
            .await
            && !b
                .has(&format!("button[data-action='/v1/jobs/{id}/approve']"))
                .await
    })
    .await;
    b.js("window.stillTheSamePage = true", vec![]).await;
    let before = b.number("#count-succeeded").await;
    b.until("the counters moving", Duration::from_secs(30), || async {
        b.number("#count-succeeded").await >= before + 20
    })
    .await;
    assert_eq!(
        b.js("return window.stillTheSamePage === true", vec![])
            .await,
        json!(true),
        "the page was loaded again to show the counts"
    );
    assert!(b.has("#chart rect").await, "the outcomes chart is drawn");
    b.screenshot("job-running").await;

    // Pause: the page offers resume.
    b.click(&format!("button[data-action='/v1/jobs/{id}/pause']"))
        .await;
    b.until("paused", Duration::from_secs(30), || async {
        b.has(&format!("button[data-action='/v1/jobs/{id}/resume']"))
            .await
    })
    .await;
    assert_eq!(app.job(id).await["state"], "PAUSED");
    assert_eq!(b.text("#job-state").await, "PAUSED");
    b.screenshot("job-paused").await;

    // A viewer watches the paused job: no button, and the call made anyway is refused.
    b.sign_out().await;
    b.sign_in(&viewer).await;
    b.open(&format!("/ui/jobs/{id}")).await;
    assert_eq!(b.text("#job-state").await, "PAUSED");
    assert!(
        !b.has("button[data-action]").await,
        "a viewer sees a button"
    );
    let forced = b
        .client
        .execute_async(
            "const done = arguments[arguments.length - 1]; \
             fetch('/v1/jobs/' + arguments[0] + '/resume', { method: 'POST', \
               credentials: 'same-origin', headers: { 'content-type': 'application/json', \
               'x-csrf-token': document.querySelector('meta[name=\"csrf-token\"]').content }, \
               body: '{}' }).then(r => done(r.status), e => done(String(e)));",
            vec![json!(id.to_string())],
        )
        .await
        .expect("forced call");
    assert_eq!(forced, json!(403), "a viewer's resume");
    assert_eq!(app.job(id).await["state"], "PAUSED");
    b.screenshot("job-as-viewer").await;
    b.sign_out().await;

    // The operator resumes; the job completes and the page shows the CLI's counts.
    b.sign_in(&operator).await;
    b.open(&format!("/ui/jobs/{id}")).await;
    b.click(&format!("button[data-action='/v1/jobs/{id}/resume']"))
        .await;
    b.until("completed", Duration::from_secs(120), || async {
        b.text("#job-state").await == "COMPLETED"
    })
    .await;
    // The page renders itself again once the job finished: read that final render.
    b.until("the final page", Duration::from_secs(30), || async {
        b.js(
            "return document.readyState === 'complete' && document.body.dataset.state",
            vec![],
        )
        .await
            == json!("COMPLETED")
    })
    .await;
    assert!(
        !b.has("button[data-action]").await,
        "a finished job offers a button"
    );
    // A finished job's page has nothing more to follow: it stays as it is.
    b.js("window.stillTheSamePage = true", vec![]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        b.js("return window.stillTheSamePage === true", vec![])
            .await,
        json!(true),
        "a finished job's page loads itself again"
    );
    let cli: Value = serde_json::from_str(
        &app.fleetbatch(&["job", "get", &id.to_string(), "--json"])
            .await,
    )
    .expect("job get --json");
    assert_eq!(cli["state"], "COMPLETED");
    for key in [
        "targeted",
        "succeeded",
        "failed",
        "rejected",
        "timed_out",
        "canceled",
        "skipped",
        "pending",
    ] {
        assert_eq!(
            Some(b.number(&format!("#count-{key}")).await),
            cli[key].as_u64(),
            "{key}"
        );
    }
    assert_eq!(cli["succeeded"].as_u64(), Some(n), "{cli}");
    b.screenshot("job-completed").await;

    // The other pages render for the operator, and with the admin's token, the admin's.
    b.open("/ui/jobs?creator=web-operator").await;
    assert!(b.text("#jobs").await.contains("browser-rollout"));
    b.screenshot("jobs").await;
    b.open("/ui/devices?query=model%20%3D%20nonexistent").await;
    assert!(!b.has("#query-error").await);
    b.open("/ui/devices?query=firmware_version%20%3D%3D").await;
    assert!(b.has("#query-error").await, "a bad query is named");
    b.open("/ui/devices").await;
    b.screenshot("devices").await;
    b.open(&format!("/ui/devices/{}", harness::fleet::device_id(0)))
        .await;
    assert!(
        b.text("#history").await.contains("browser-rollout"),
        "the device's history"
    );
    b.screenshot("device").await;
    for (page, name) in [
        ("/ui/schedules", "schedules"),
        ("/ui/deadletters", "dead-letters"),
    ] {
        b.open(page).await;
        assert!(b.has("h1").await);
        b.screenshot(name).await;
    }
    b.sign_out().await;
    b.sign_in(&app.cluster.admin_token).await;
    b.open("/ui/tokens").await;
    assert!(b.text("#tokens").await.contains("web-viewer"));
    b.screenshot("tokens").await;
    b.open(&format!("/ui/audit?job_id={id}")).await;
    let audit = b.text("#audit").await;
    assert!(
        audit.contains("web-operator") && audit.contains("/approve"),
        "{audit}"
    );
    b.screenshot("audit").await;
    b.client.clone().close().await.expect("browser closed");
    app.teardown().await;
}

/// Devices in the job whose page is timed (`FLEETBATCH_TEST_PAGE_DEVICES` to change).
fn page_devices() -> u64 {
    std::env::var("FLEETBATCH_TEST_PAGE_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

#[tokio::test]
async fn the_page_of_a_100000_device_job_is_ready_in_under_a_second() {
    // 1 % of the devices fail for good: the page has top errors to count too.
    let app = spawn_app(
        2,
        &[
            ("FLEETBATCH_SIMULATOR__LATENCY_MS", "0"),
            ("FLEETBATCH_SIMULATOR__PERMANENT_FAILURE_RATE", "0.01"),
        ],
    )
    .await;
    let n = page_devices();
    app.import_fleet(n).await;
    let id = app
        .create_job(&crate::helpers::firmware_job(json!({"name": "large"})))
        .await;
    let job = app.wait_for_job(id, Duration::from_secs(600)).await;
    assert_eq!(job["targeted"].as_u64(), Some(n), "{job}");
    let b = Browser::start(&app).await;
    b.sign_in(&app.cluster.admin_token).await;

    // Five loads of the job's page, each timed by the browser from the navigation's start
    // to the end of its load event (page, stylesheet and script).
    let mut ms = Vec::new();
    for _ in 0..5 {
        b.open(&format!("/ui/jobs/{id}")).await;
        let t = b
            .js(
                "const n = performance.getEntriesByType('navigation')[0]; \
                 return n.loadEventEnd > 0 ? n.loadEventEnd - n.startTime : null",
                vec![],
            )
            .await;
        ms.push(t.as_f64().expect("a finished load"));
    }
    ms.sort_by(f64::total_cmp);
    let median = ms[2];
    eprintln!("job page of {n} devices: loads {ms:?} ms, median {median:.0} ms");
    // The device table holds one page; the rest is a link away.
    assert_eq!(b.rows("#devices tbody").await.len(), 100);
    assert!(b.has("#next-page").await, "no next page");
    assert!(b.has("#errors").await, "no top errors");
    b.screenshot("job-100000-devices").await;
    assert!(
        median < 1000.0,
        "the page of a {n}-device job took {median:.0} ms (median of {ms:?})"
    );
    b.client.clone().close().await.expect("browser closed");
    app.teardown().await;
}

/// A provider's authorization and token endpoints, as an auto-approving test provider: each
/// authorization hands out a code bound to its PKCE challenge and redirect address; the
/// token endpoint gives an ID token for `carol` (role claim `fleet-ops`) only for a known
/// code with the matching verifier.
async fn start_provider(
    idp: std::sync::Arc<crate::secure::Provider>,
) -> (u16, tokio::task::JoinHandle<()>) {
    use std::{collections::HashMap, sync::Mutex};

    use axum::{
        Form, Router,
        extract::Query,
        response::{IntoResponse, Redirect},
        routing::{get, post},
    };
    use sha2::Digest as _;

    type Codes = std::sync::Arc<Mutex<HashMap<String, (String, String)>>>;
    let codes: Codes = Default::default();
    let given = codes.clone();
    let authorize = move |Query(q): Query<HashMap<String, String>>| {
        let codes = given.clone();
        async move {
            let ok = q.get("response_type").map(String::as_str) == Some("code")
                && q.get("client_id").map(String::as_str) == Some("fleetbatch-api")
                && q.get("code_challenge_method").map(String::as_str) == Some("S256")
                && q.get("scope")
                    .is_some_and(|s| s.split(' ').any(|s| s == "openid"));
            if !ok {
                return (axum::http::StatusCode::BAD_REQUEST, format!("{q:?}")).into_response();
            }
            let code = uuid::Uuid::new_v4().simple().to_string();
            let back = q["redirect_uri"].clone();
            codes
                .lock()
                .expect("codes")
                .insert(code.clone(), (q["code_challenge"].clone(), back.clone()));
            let state = q.get("state").cloned().unwrap_or_default();
            Redirect::to(&format!("{back}?code={code}&state={state}")).into_response()
        }
    };
    let token = move |Form(f): Form<HashMap<String, String>>| {
        let (codes, idp) = (codes.clone(), idp.clone());
        async move {
            let Some((challenge, back)) = f
                .get("code")
                .and_then(|c| codes.lock().expect("codes").remove(c))
            else {
                return (
                    axum::http::StatusCode::BAD_REQUEST,
                    axum::Json(json!({"error": "invalid_grant"})),
                )
                    .into_response();
            };
            let verifier = f.get("code_verifier").cloned().unwrap_or_default();
            let computed = crate::secure::b64(&sha2::Sha256::digest(verifier.as_bytes()));
            if computed != challenge || f.get("redirect_uri") != Some(&back) {
                return (
                    axum::http::StatusCode::BAD_REQUEST,
                    axum::Json(json!({"error": "invalid_grant", "error_description": "PKCE or redirect_uri"})),
                )
                    .into_response();
            }
            axum::Json(json!({
                "access_token": "opaque", "token_type": "Bearer", "expires_in": 600,
                "id_token": idp.token(json!({"sub": "carol", "roles": ["fleet-ops"]}), "EdDSA"),
            }))
            .into_response()
        }
    };
    let router = Router::new()
        .route("/authorize", get(authorize))
        .route("/token", post(token));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("provider port");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .await
            .expect("provider serves");
    });
    (port, server)
}

#[tokio::test]
async fn an_operator_signs_in_at_the_identity_provider_with_pkce() {
    let idp = std::sync::Arc::new(crate::secure::Provider::new("idp-web"));
    let (port, provider) = start_provider(idp.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, idp.jwks().to_string()).expect("jwks");
    let jwks = jwks.display().to_string();
    let authorize = format!("http://127.0.0.1:{port}/authorize");
    let token = format!("http://127.0.0.1:{port}/token");
    let app = spawn_app(
        1,
        &[
            (
                "FLEETBATCH_COORDINATOR__AUTH__OIDC__ISSUER",
                crate::secure::ISSUER,
            ),
            (
                "FLEETBATCH_COORDINATOR__AUTH__OIDC__AUDIENCE",
                "fleetbatch-api",
            ),
            (
                "FLEETBATCH_COORDINATOR__AUTH__OIDC__JWKS_FILE",
                jwks.as_str(),
            ),
            (
                "FLEETBATCH_COORDINATOR__AUTH__OIDC__ROLE_MAP",
                "fleet-ops=operator",
            ),
            (
                "FLEETBATCH_COORDINATOR__AUTH__OIDC__AUTHORIZATION_URL",
                authorize.as_str(),
            ),
            (
                "FLEETBATCH_COORDINATOR__AUTH__OIDC__TOKEN_URL",
                token.as_str(),
            ),
        ],
    )
    .await;
    let b = Browser::start(&app).await;

    // An answer this browser did not ask for is refused, naming why.
    b.open("/ui/oidc/callback?code=forged&state=forged").await;
    let why = b.text("#sign-in-error").await;
    assert!(why.contains("no sign-in was started"), "{why}");

    // The sign-in page leads to the provider and back, signed in as the provider's user with
    // the role its claim maps to.
    b.open("/ui/login").await;
    b.click("#sso").await;
    b.wait_for_path("/ui/jobs").await;
    let who = b.text("header .who").await;
    assert_eq!(who, "oidc:carol (operator)");
    assert!(
        b.has("a[href='/ui/new']").await,
        "an operator may create jobs"
    );
    b.screenshot("signed-in-at-the-provider").await;

    // The session is the provider's ID token: the API's audit names the same caller.
    b.open("/ui/jobs").await;
    assert_eq!(b.text("header .who").await, "oidc:carol (operator)");
    b.client.clone().close().await.expect("browser closed");
    provider.abort();
    app.teardown().await;
}
