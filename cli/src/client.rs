//! A thin client of the coordinator's HTTP API.

use anyhow::{Context, bail};
use serde::de::DeserializeOwned;
use serde_json::Value;

#[derive(Debug, Clone)]
pub(crate) struct Client {
    http: reqwest::Client,
    /// The same, without an overall timeout (event streams last as long as their job).
    streaming: reqwest::Client,
    base: String,
}

impl Client {
    /// A client of the API at `base`, sending `token` as its bearer token and trusting
    /// `ca_file` (PEM) beside the system's roots.
    pub(crate) fn new(
        base: &str,
        token: Option<&str>,
        ca_file: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        let ca = ca_file
            .map(|path| {
                let pem = std::fs::read(path)
                    .with_context(|| format!("reading --ca-file {}", path.display()))?;
                reqwest::Certificate::from_pem(&pem)
                    .with_context(|| format!("--ca-file {}: not a PEM certificate", path.display()))
            })
            .transpose()?;
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(t) = token.filter(|t| !t.is_empty()) {
            let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
                .context("the token holds characters a header cannot carry")?;
            v.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        let build = |timeout: Option<std::time::Duration>| {
            let mut b = reqwest::Client::builder().default_headers(headers.clone());
            if let Some(ca) = &ca {
                b = b.add_root_certificate(ca.clone());
            }
            if let Some(t) = timeout {
                b = b.timeout(t);
            }
            b.build().context("building the HTTP client")
        };
        Ok(Self {
            http: build(Some(std::time::Duration::from_secs(600)))?,
            streaming: build(None)?,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> anyhow::Result<T> {
        let status = resp.status();
        let text = resp.text().await.context("reading the response")?;
        if !status.is_success() {
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
            let msg = v.get("error").and_then(Value::as_str).unwrap_or(&text);
            match v.get("field").and_then(Value::as_str) {
                Some(f) if !msg.starts_with(f) => bail!("{status}: {f}: {msg}"),
                _ => bail!("{status}: {msg}"),
            }
        }
        serde_json::from_str(&text).with_context(|| format!("unexpected response: {text}"))
    }

    async fn send_get(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        self.http
            .get(self.url(path))
            .send()
            .await
            .with_context(|| format!("cannot reach the coordinator at {}", self.base))
    }

    pub(crate) async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        Self::decode(self.send_get(path).await?).await
    }

    /// A GET whose body is returned as bytes (exports).
    pub(crate) async fn get_bytes(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let resp = self.send_get(path).await?;
        let status = resp.status();
        let body = resp.bytes().await.context("reading the response")?;
        if !status.is_success() {
            bail!("{status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(body.to_vec())
    }

    /// A DELETE.
    pub(crate) async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let resp = self
            .http
            .delete(self.url(path))
            .send()
            .await
            .with_context(|| format!("cannot reach the coordinator at {}", self.base))?;
        Self::decode(resp).await
    }

    /// A JSON PATCH.
    pub(crate) async fn patch<T: DeserializeOwned>(
        &self,
        path: &str,
        body: String,
    ) -> anyhow::Result<T> {
        self.send_json(self.http.patch(self.url(path)), body).await
    }

    /// A JSON PUT.
    pub(crate) async fn put<T: DeserializeOwned>(
        &self,
        path: &str,
        body: String,
    ) -> anyhow::Result<T> {
        self.send_json(self.http.put(self.url(path)), body).await
    }

    async fn send_json<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        body: String,
    ) -> anyhow::Result<T> {
        let req = req
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        self.send(req).await
    }

    pub(crate) async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> anyhow::Result<T> {
        let req = self
            .http
            .post(self.url(path))
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body);
        self.send(req).await
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the coordinator at {}", self.base))?;
        Self::decode(resp).await
    }

    /// Creates a job, with an idempotency key when given (a retried create then returns the
    /// first job); or, with `dry_run`, reports what it would do and creates nothing.
    pub(crate) async fn create_job(
        &self,
        content_type: &str,
        spec: String,
        idempotency_key: Option<&str>,
        dry_run: bool,
    ) -> anyhow::Result<serde_json::Value> {
        let path = if dry_run {
            "/v1/jobs?dry_run=true"
        } else {
            "/v1/jobs"
        };
        self.post_as(path, content_type, spec, idempotency_key)
            .await
    }

    /// A JSON POST that creates a job (a rerun), with an idempotency key when given.
    pub(crate) async fn post_with_key(
        &self,
        path: &str,
        body: String,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<serde_json::Value> {
        self.post_as(path, "application/json", body, idempotency_key)
            .await
    }

    async fn post_as(
        &self,
        path: &str,
        content_type: &str,
        body: String,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<serde_json::Value> {
        let mut req = self
            .http
            .post(self.url(path))
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body);
        if let Some(key) = idempotency_key {
            req = req.header("idempotency-key", key);
        }
        self.send(req).await
    }

    /// Succeeds when `url` answers 2xx within five seconds.
    pub(crate) async fn health(&self, url: &str) -> anyhow::Result<()> {
        let resp = self
            .http
            .get(url)
            .timeout(std::time::Duration::from_secs(5))
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        if !resp.status().is_success() {
            bail!("{url}: {}", resp.status());
        }
        Ok(())
    }

    /// A streaming GET (for Server-Sent Events); no overall timeout.
    pub(crate) async fn stream(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let resp = self
            .streaming
            .get(self.url(path))
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .send()
            .await
            .with_context(|| format!("cannot reach the coordinator at {}", self.base))?;
        if !resp.status().is_success() {
            let status = resp.status();
            bail!("{status}: {}", resp.text().await.unwrap_or_default());
        }
        Ok(resp)
    }
}
