//! Encryption in transit and identities from an identity provider: the API over HTTPS with a
//! private CA (the CLI trusts it with `--ca-file`), a whole job against a TLS Redis that lets
//! in only an ACL user confined to the deployment's keys, and OIDC bearer JWTs accepted only
//! when signed by the provider's key for this API, unexpired, with a role; and each component
//! on its own least-privilege broker user.

use std::time::Duration;

use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{TestApp, TestCa, firmware_job, spawn_app, with_token};

/// A private Redis with TLS only (its own CA) and one ACL user, `fleet`, confined to keys
/// of namespaces starting with `t` (the suite's), with the default user off. Killed when
/// dropped.
struct TlsRedis {
    _child: tokio::process::Child,
    port: u16,
}

async fn tls_redis(ca: &TestCa) -> TlsRedis {
    let port = harness::cluster::free_port().expect("port");
    let child = tokio::process::Command::new(crate::helpers::system_binary("redis-server"))
        .args([
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--tls-port",
            &port.to_string(),
        ])
        .args(["--tls-cert-file", &ca.path("server.pem")])
        .args(["--tls-key-file", &ca.path("server.key")])
        .args(["--tls-ca-cert-file", &ca.path("ca.pem")])
        .args([
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--dir", &ca.path(""), "--logfile", &ca.path("redis.log")])
        .args(["--user", "default", "off"])
        .args([
            "--user",
            "fleet",
            "on",
            ">s3cret-pass",
            "~{t*",
            "+@all",
            "-@dangerous",
        ])
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server starts");
    crate::helpers::wait_for_port(port, "the TLS Redis").await;
    TlsRedis {
        _child: child,
        port,
    }
}

/// Runs the CLI with `args` (no token or CA from the environment); its exit code, stdout and
/// stderr.
async fn cli(args: &[&str], token: &str) -> (Option<i32>, String, String) {
    let out = tokio::process::Command::new(
        harness::cluster::bin_dir()
            .expect("bins")
            .join("fleetbatch"),
    )
    .env_remove("FLEETBATCH_CA_FILE")
    .env("FLEETBATCH_TOKEN", token)
    .args(args)
    .output()
    .await
    .expect("cli runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_job_runs_with_the_api_on_https_and_redis_on_tls_with_an_acl_user() {
    // Arrange: a private CA, a TLS-only Redis with an ACL user, and a cluster whose API
    // serves HTTPS and whose every process (and this test) reaches Redis over TLS as that
    // user.
    let ca = TestCa::new();
    let redis = tls_redis(&ca).await;
    let url = format!("rediss://fleet:s3cret-pass@127.0.0.1:{}/", redis.port);
    let (ca_pem, cert, key) = (
        ca.path("ca.pem"),
        ca.path("server.pem"),
        ca.path("server.key"),
    );
    let env = [
        ("FLEETBATCH_REDIS__URL", url.as_str()),
        ("FLEETBATCH_REDIS__CA_FILE", ca_pem.as_str()),
        ("FLEETBATCH_COORDINATOR__TLS__CERT_FILE", cert.as_str()),
        ("FLEETBATCH_COORDINATOR__TLS__KEY_FILE", key.as_str()),
        ("FLEETBATCH_CA_FILE", ca_pem.as_str()),
    ];
    let app = spawn_app(2, &env).await;
    assert!(
        app.cluster.api.starts_with("https://"),
        "{}",
        app.cluster.api
    );

    // The ACL is real: without the user, and as the user outside its keys, Redis refuses.
    let mut anonymous = app.settings.redis.clone();
    anonymous.url = format!("rediss://127.0.0.1:{}/", redis.port);
    let refused = async {
        let mut c = shared::store::connect(&anonymous, "").await?;
        redis::cmd("GET")
            .arg("t-probe")
            .query_async::<Option<String>>(&mut c)
            .await
            .map_err(shared::store::StoreError::from)
    };
    assert!(refused.await.is_err(), "the default user is off");
    let mut own = app.redis.clone();
    let outside: redis::RedisResult<()> = redis::cmd("SET")
        .arg("other:key")
        .arg("1")
        .query_async(&mut own)
        .await;
    let e = outside.expect_err("keys outside the namespaces are refused");
    assert!(e.to_string().to_lowercase().contains("noperm"), "{e}");

    // Act + assert: a job over HTTPS, with state in the TLS Redis, completes exactly.
    let (id, _) = app.run_fleet_job(2_000, json!({})).await;

    // The CLI reaches the HTTPS API when told to trust the CA, and refuses an unknown
    // certificate without it.
    let api = app.cluster.api.as_str();
    let token = app.cluster.admin_token.as_str();
    let (code, out, err) = cli(
        &[
            "--api",
            api,
            "--ca-file",
            &ca_pem,
            "job",
            "get",
            &id.to_string(),
            "--json",
        ],
        token,
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    let shown: Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(shown["job_id"], id.to_string());
    let (code, _, err) = cli(&["--api", api, "job", "list"], token).await;
    assert_ne!(code, Some(0), "an unknown CA is refused");
    assert!(err.contains("cannot reach the coordinator"), "{err}");
    // Plain HTTP to the HTTPS port gets no answer a client could use.
    let plain = api.replace("https://", "http://");
    let r = reqwest::Client::new()
        .get(format!("{plain}/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(r.is_err() || !r.is_ok_and(|r| r.status().is_success()));
    app.teardown().await;
}

/// An Ed25519 identity provider: its key set, and JWTs it (or a forger) signs.
pub(crate) struct Provider {
    key: SigningKey,
    kid: &'static str,
}

impl Provider {
    pub(crate) fn new(kid: &'static str) -> Self {
        let mut seed = [0u8; 32];
        seed[..16].copy_from_slice(Uuid::new_v4().as_bytes());
        seed[16..].copy_from_slice(Uuid::new_v4().as_bytes());
        Self {
            key: SigningKey::from_bytes(&seed),
            kid,
        }
    }

    pub(crate) fn jwks(&self) -> Value {
        json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "use": "sig", "alg": "EdDSA", "kid": self.kid,
            "x": b64(self.key.verifying_key().as_bytes()),
        }]})
    }

    /// A JWT with `claims` (merged over valid ones) and header `alg`.
    pub(crate) fn token(&self, claims: Value, alg: &str) -> String {
        let now = shared::now_ms() / 1000;
        let mut body = json!({
            "iss": ISSUER, "aud": "fleetbatch-api", "sub": "alice",
            "iat": now, "exp": now + 600, "roles": ["fleet-ops"], "fleet_groups": ["fleet"],
        });
        for (k, v) in claims.as_object().expect("object") {
            body[k] = v.clone();
        }
        let header = json!({"alg": alg, "typ": "JWT", "kid": self.kid});
        let signing_input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(body.to_string().as_bytes())
        );
        let signature = self.key.sign(signing_input.as_bytes());
        format!("{signing_input}.{}", b64(&signature.to_bytes()))
    }
}

pub(crate) const ISSUER: &str = "https://idp.example.test/realms/fleet";

pub(crate) fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

async fn call(app: &TestApp, token: &str, method: reqwest::Method, path: &str) -> (u16, Value) {
    let client = with_token(reqwest::Client::builder(), Some(token));
    let mut req = client.request(method.clone(), app.url(path));
    if method == reqwest::Method::POST {
        req = req.json(&firmware_job(json!({"target": {"groups": ["fleet"]}})));
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn oidc_tokens_are_callers_only_when_signed_by_the_provider_for_this_api_and_unexpired() {
    // Arrange: the provider's key set in a file; its `roles` claim mapped to fleetbatch roles,
    // `fleet_groups` scoping operators.
    let idp = Provider::new("idp-1");
    let dir = tempfile::tempdir().expect("tempdir");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, idp.jwks().to_string()).expect("jwks");
    let jwks = jwks.display().to_string();
    let env = [
        ("FLEETBATCH_COORDINATOR__AUTH__OIDC__ISSUER", ISSUER),
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
            "fleet-ops=operator,fleet-viewers=viewer",
        ),
        (
            "FLEETBATCH_COORDINATOR__AUTH__OIDC__GROUPS_CLAIM",
            "fleet_groups",
        ),
    ];
    let app = spawn_app(1, &env).await;
    app.import_fleet(100).await;
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;

    // A valid operator token of group `fleet`: a caller named after its subject, scoped.
    let operator = idp.token(json!({}), "EdDSA");
    let (status, who) = call(&app, &operator, get.clone(), "/v1/whoami").await;
    assert_eq!(status, 200, "{who}");
    assert_eq!(who["subject"], "oidc:alice", "{who}");
    assert_eq!(who["role"], "operator", "{who}");
    assert_eq!(who["groups"], json!(["fleet"]), "{who}");
    let (status, created) = call(&app, &operator, post.clone(), "/v1/jobs").await;
    assert_eq!(status, 201, "{created}");
    // Scoped: the whole fleet is outside its groups.
    let other_group = idp.token(json!({"fleet_groups": ["elsewhere"]}), "EdDSA");
    let (status, body) = call(&app, &other_group, post.clone(), "/v1/jobs").await;
    assert_eq!(status, 403, "{body}");
    // A viewer reads but may not write.
    let viewer = idp.token(json!({"sub": "bob", "roles": "fleet-viewers"}), "EdDSA");
    assert_eq!(call(&app, &viewer, get.clone(), "/v1/jobs").await.0, 200);
    let (status, body) = call(&app, &viewer, post.clone(), "/v1/jobs").await;
    assert_eq!(status, 403, "{body}");

    // Refused, each with its reason: expired, wrong audience, wrong issuer, forged (same key
    // id, another key), a key the provider does not have, a shared-secret algorithm, no role.
    let now = shared::now_ms() / 1000;
    let forger = Provider::new("idp-1");
    let stranger = Provider::new("idp-9");
    let cases = [
        (
            "expired",
            idp.token(json!({"exp": now - 3600}), "EdDSA"),
            "expired",
        ),
        (
            "audience",
            idp.token(json!({"aud": "another-api"}), "EdDSA"),
            "wrong audience",
        ),
        (
            "issuer",
            idp.token(json!({"iss": "https://evil.example"}), "EdDSA"),
            "wrong issuer",
        ),
        ("forged", forger.token(json!({}), "EdDSA"), "bad signature"),
        (
            "unknown key",
            stranger.token(json!({}), "EdDSA"),
            "no key \"idp-9\"",
        ),
        ("hs256", idp.token(json!({}), "HS256"), "not accepted"),
        (
            "no role",
            idp.token(json!({"roles": ["staff"]}), "EdDSA"),
            "maps to no role",
        ),
    ];
    for (name, token, reason) in cases {
        let (status, body) = call(&app, &token, get.clone(), "/v1/jobs").await;
        assert_eq!(status, 401, "{name}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(reason), "{name}: {error}");
    }

    // The audit log names the OIDC subject of the job it created.
    let audit: Value = app
        .http
        .get(app.url("/v1/audit?actor=oidc:alice"))
        .send()
        .await
        .expect("audit")
        .json()
        .await
        .expect("json");
    let entries = audit["entries"].as_array().cloned().unwrap_or_default();
    assert!(
        entries.iter().any(|e| e["action"] == "POST /v1/jobs"
            && e["status"] == 201
            && e["role"] == "operator"),
        "{audit}"
    );
    let job_id: Uuid = created["job_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("job id");
    app.wait_for_job(job_id, Duration::from_secs(60)).await;
    app.teardown().await;
}

#[tokio::test]
async fn half_sent_requests_are_dropped_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let app = spawn_app(0, &[("FLEETBATCH_COORDINATOR__HEADER_TIMEOUT_SECS", "1")]).await;
    let addr = app.cluster.api.trim_start_matches("http://").to_owned();
    // 50 clients each send half a request and go quiet.
    let mut conns = Vec::new();
    for _ in 0..50 {
        let mut c = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        c.write_all(b"GET /v1/jobs HTTP/1.1\r\nHost: fleetbatch\r\n")
            .await
            .expect("half a request");
        conns.push(c);
    }
    // Each is closed by the coordinator within a few seconds, not held.
    let closed = futures::future::join_all(conns.into_iter().map(|mut c| async move {
        let mut buf = [0u8; 512];
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match c.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
        read.await.is_ok()
    }))
    .await;
    assert!(
        closed.iter().all(|c| *c),
        "{} of 50 connections still open after 5 s",
        closed.iter().filter(|c| !**c).count()
    );
    // The API still answers.
    assert_eq!(app.job_if_any().await, None);
    app.teardown().await;
}

/// The broker users `deploy/rabbitmq/users.sh` makes for a namespace; deleted when dropped.
struct BrokerUsers {
    namespace: String,
}

impl Drop for BrokerUsers {
    fn drop(&mut self) {
        for role in ["coordinator", "worker"] {
            let _ = std::process::Command::new("rabbitmqctl")
                .args(["-q", "delete_user", &format!("{}-{role}", self.namespace)])
                .output();
        }
    }
}

/// `amqp://` URL of the test broker with another user.
fn amqp_url_as(user: &str, password: &str) -> String {
    let mut url = url::Url::parse(&shared::config::test_amqp_url()).expect("amqp url");
    url.set_username(user).expect("user");
    url.set_password(Some(password)).expect("password");
    url.to_string()
}

#[tokio::test]
async fn each_component_runs_with_its_own_least_privilege_broker_user() {
    // Arrange: the namespace's users from the deploy script.
    let namespace = format!("t{}", &Uuid::new_v4().simple().to_string()[..12]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/rabbitmq/users.sh");
    let out = std::process::Command::new("bash")
        .args([script, &namespace])
        .env("COORDINATOR_PASSWORD", "coord-pass")
        .env("WORKER_PASSWORD", "worker-pass")
        .output()
        .expect("users.sh runs");
    let _users = BrokerUsers {
        namespace: namespace.clone(),
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let coordinator_url = amqp_url_as(&format!("{namespace}-coordinator"), "coord-pass");
    let worker_url = amqp_url_as(&format!("{namespace}-worker"), "worker-pass");

    // The coordinator (and this test) with the coordinator's user, two workers with theirs.
    let mut app = spawn_app(
        0,
        &[
            ("FLEETBATCH_NAMESPACE", namespace.as_str()),
            ("FLEETBATCH_AMQP__URL", coordinator_url.as_str()),
        ],
    )
    .await;
    for _ in 0..2 {
        app.cluster
            .start_worker_with(&[("FLEETBATCH_AMQP__URL".into(), worker_url.clone())])
            .expect("worker");
    }

    // Act + assert: a job completes exactly, and the worker's user cannot do what workers
    // never do.
    app.run_fleet_job(2_000, json!({})).await;
    let mut as_worker = app.settings.amqp.clone();
    as_worker.url = worker_url.clone();
    let names = app.names.clone();
    let refused = |what: &str, r: Result<(), lapin::Error>| {
        let e = r.expect_err(what);
        assert!(e.to_string().contains("ACCESS_REFUSED"), "{what}: {e}");
    };
    let conn = shared::amqp::connect(&as_worker, "e2e-worker-rights")
        .await
        .expect("the worker's user connects");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(Default::default())
        .await
        .expect("confirms");
    let r = async {
        ch.basic_publish(
            names.control_exchange().into(),
            "".into(),
            Default::default(),
            b"cancel everything",
            Default::default(),
        )
        .await?
        .await
        .map(|_| ())
    };
    refused("publishing a control message", r.await);
    let ch = conn.create_channel().await.expect("channel");
    let r = ch
        .basic_get(names.results_queue().into(), Default::default())
        .await
        .map(|_| ());
    refused("reading results", r);
    for queue in [names.tasks_queue(), names.dead_queue()] {
        // A refusal closes the channel: a fresh one each time.
        let ch = conn.create_channel().await.expect("channel");
        let r = ch
            .queue_delete(queue.clone().into(), Default::default())
            .await
            .map(|_| ());
        refused(&format!("deleting {queue}"), r);
    }
    let _ = conn.close(200, "done".into()).await;
    app.teardown().await;
}

/// A page on another site cannot change anything through a visitor's browser: a `text/plain`
/// POST (which a browser sends cross-site without asking first) carrying another `Origin`,
/// or marked `Sec-Fetch-Site: cross-site`, is refused and creates nothing, even with valid
/// credentials; the same request from the API's own origin, or from a client that is not a
/// browser, goes through. Reads are unaffected.
#[tokio::test]
async fn a_cross_site_request_from_a_browser_changes_nothing() {
    let app = spawn_app(0, &[]).await;
    app.import_fleet(10).await;
    let spec = serde_json::to_string(&firmware_job(json!({}))).expect("json");
    let host = app.cluster.api.trim_start_matches("http://").to_owned();
    let post = |headers: Vec<(&'static str, String)>| {
        let mut r = app
            .http
            .post(app.url("/v1/jobs"))
            .header("content-type", "text/plain")
            .body(spec.clone());
        for (k, v) in headers {
            r = r.header(k, v);
        }
        r.send()
    };
    let jobs = || async {
        let page: Value = app
            .http
            .get(app.url("/v1/jobs"))
            .header("origin", "https://elsewhere.example")
            .send()
            .await
            .expect("list")
            .json()
            .await
            .expect("json");
        page["jobs"].as_array().map_or(0, Vec::len)
    };
    for headers in [
        vec![("origin", "https://elsewhere.example".to_owned())],
        vec![("origin", "null".to_owned())],
        vec![("sec-fetch-site", "cross-site".to_owned())],
        vec![
            ("sec-fetch-site", "same-site".to_owned()),
            ("origin", format!("http://{host}")),
        ],
    ] {
        let r = post(headers.clone()).await.expect("post");
        let status = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        assert_eq!(status, 403, "{headers:?}: {body}");
        assert!(body.contains("may not change anything"), "{body}");
    }
    assert_eq!(jobs().await, 0, "a refused request created a job");
    // The API's own origin, and a client that names none, are served.
    let own = post(vec![
        ("origin", format!("http://{host}")),
        ("sec-fetch-site", "same-origin".to_owned()),
    ])
    .await
    .expect("post");
    assert_eq!(
        own.status().as_u16(),
        201,
        "{}",
        own.text().await.unwrap_or_default()
    );
    let cli = post(vec![]).await.expect("post");
    assert_eq!(cli.status().as_u16(), 201);
    assert_eq!(jobs().await, 2);
    app.teardown().await;
}
