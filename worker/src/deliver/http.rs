//! The HTTP transport: one POST of the fleetbatch request document per attempt, to the device
//! or its gateway, answered by a reply document in the response body.
//!
//! Owns the HTTP client (TLS with the system roots plus an optional CA, connection reuse,
//! HTTP/1.1 or HTTP/2 as `worker.http.version` says) and the mapping of responses to
//! outcomes: 2xx carries the reply document; 408, 429 and 5xx (with or without a body) and
//! connection errors are transient; other statuses are permanent failures. It never records
//! outcomes.

use devices::protocol::DeviceReply;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use shared::config::{HttpSettings, HttpVersion};

use super::request::{DeliverError, DeliveryRequest, Reply, reply_outcome};

/// Building the HTTP client failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpSetupError {
    /// The CA file could not be read or parsed.
    #[error("worker.http.ca_file {path:?}: {problem}")]
    Ca {
        /// The file.
        path: String,
        /// What went wrong.
        problem: String,
    },
    /// The client could not be built.
    #[error("HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// The HTTP transport; cheap to clone.
#[derive(Debug, Clone)]
pub struct HttpTransport {
    client: reqwest::Client,
    settings: std::sync::Arc<HttpSettings>,
}

/// Percent-encodes a device id for a URL path segment.
fn encode_segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// Everything but RFC 3986's unreserved characters is escaped in a path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

impl HttpTransport {
    /// A transport posting to `settings.url_template`.
    ///
    /// # Errors
    /// An unreadable CA file.
    pub fn new(settings: &HttpSettings) -> Result<Self, HttpSetupError> {
        let mut builder = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .user_agent(concat!("fleetbatch-worker/", env!("CARGO_PKG_VERSION")));
        builder = match settings.version {
            HttpVersion::Auto => builder,
            HttpVersion::Http1 => builder.http1_only(),
            HttpVersion::Http2 => builder.http2_prior_knowledge(),
        };
        if let Some(path) = &settings.ca_file {
            let pem = std::fs::read(path).map_err(|e| HttpSetupError::Ca {
                path: path.clone(),
                problem: e.to_string(),
            })?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| HttpSetupError::Ca {
                path: path.clone(),
                problem: e.to_string(),
            })?;
            builder = builder.add_root_certificate(cert);
        }
        Ok(Self {
            client: builder.build()?,
            settings: std::sync::Arc::new(settings.clone()),
        })
    }

    /// One attempt (the caller's timeout bounds it).
    ///
    /// # Errors
    /// The device's answer; unreachable devices are transient.
    pub async fn deliver(&self, req: &DeliveryRequest) -> Result<Reply, DeliverError> {
        let url = self
            .settings
            .url_template
            .replace("{device_id}", &encode_segment(&req.device_id));
        let body = req.to_device_request(None);
        let mut request = self.client.post(&url).json(&body);
        if let Some(auth) = &self.settings.authorization {
            request = request.header(reqwest::header::AUTHORIZATION, auth);
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| DeliverError::Transient(format!("POST {url}: {e}")))?;
        let status = response.status();
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| DeliverError::Transient(format!("reading the response of {url}: {e}")))?
        {
            if bytes.len() + chunk.len() > self.settings.max_response_bytes {
                return Err(DeliverError::Permanent(format!(
                    "response larger than worker.http.max_response_bytes ({})",
                    self.settings.max_response_bytes
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        let reply = serde_json::from_slice::<DeviceReply>(&bytes);
        let transient =
            status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429;
        if !status.is_success() {
            let why = match &reply {
                Ok(r) => r.error.clone().unwrap_or_default(),
                Err(_) => String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            };
            let msg = format!("HTTP {status}: {why}");
            return Err(if transient {
                DeliverError::Transient(msg)
            } else {
                DeliverError::Permanent(msg)
            });
        }
        let reply = reply.map_err(|e| {
            DeliverError::Permanent(format!("response is not a fleetbatch reply document: {e}"))
        })?;
        if reply.execution_id != req.execution_id {
            return Err(DeliverError::Permanent(format!(
                "reply names execution {} instead of {}",
                reply.execution_id, req.execution_id
            )));
        }
        // Over HTTP, progress means "accepted, not finished": ask again on the next attempt.
        reply_outcome(&req.spec, reply)
            .unwrap_or_else(|| Err(DeliverError::Transient("device still working".into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_are_encoded_as_one_path_segment() {
        assert_eq!(encode_segment("dev-0000001"), "dev-0000001");
        assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
    }
}
