//! Where the coordinator may send requests on a job's behalf (webhooks): an allowlist of
//! hosts, or else public addresses only, so the API cannot be used to reach internal
//! services.
//!
//! Owns the decision for one URL: its scheme, its host against the allowlist, and every
//! address the host resolves to (checked when the job is created and again before each
//! POST, so a name that later resolves inside the network is still refused). It never sends
//! anything itself.

use std::net::IpAddr;

/// The outbound policy, from settings.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Hosts that may be called (exact names); empty: any public host.
    pub allowed_hosts: Vec<String>,
    /// Also allow loopback, private, link-local and other non-public addresses.
    pub allow_private: bool,
}

impl Policy {
    /// The policy the coordinator's settings describe.
    pub fn from_settings(c: &shared::config::CoordinatorSettings) -> Self {
        Self {
            allowed_hosts: c
                .webhook_allowed_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            allow_private: c.webhook_allow_private,
        }
    }

    /// Whether `url` may be called.
    ///
    /// # Errors
    /// Why not, for the caller's error message.
    pub async fn check(&self, url: &str) -> Result<(), String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!("{url:?} is not an http(s) URL"));
        }
        let host = parsed
            .host_str()
            .ok_or_else(|| format!("{url:?} names no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        if !self.allowed_hosts.is_empty() && !self.allowed_hosts.contains(&host) {
            return Err(format!(
                "host {host} is not in coordinator.webhook_allowed_hosts"
            ));
        }
        if self.allow_private {
            return Ok(());
        }
        let port = parsed.port_or_known_default().unwrap_or(443);
        let addrs: Vec<IpAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| format!("host {host} does not resolve: {e}"))?
                .map(|a| a.ip())
                .collect(),
        };
        match addrs.iter().find(|ip| !is_public(**ip)) {
            Some(ip) => Err(format!(
                "host {host} is at {ip}, not a public address (coordinator.webhook_allow_private)"
            )),
            None if addrs.is_empty() => Err(format!("host {host} does not resolve")),
            None => Ok(()),
        }
    }
}

/// Whether an address is on the public internet (not loopback, private, link-local, CGNAT,
/// multicast, documentation, unspecified or unique-local).
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_unspecified()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b)))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn internal_addresses_are_refused_unless_allowed() {
        let strict = Policy::default();
        for url in [
            "http://127.0.0.1:9/x",
            "http://10.1.2.3/x",
            "http://192.168.0.1/x",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/x",
            "http://[fd00::1]/x",
            "http://[::ffff:10.0.0.1]/x",
            "http://100.64.0.1/x",
            "http://localhost:8080/x",
            "ftp://93.184.216.34/x",
        ] {
            assert!(strict.check(url).await.is_err(), "{url} allowed");
        }
        assert!(strict.check("https://93.184.216.34/hook").await.is_ok());
        let open = Policy {
            allow_private: true,
            ..Policy::default()
        };
        assert!(open.check("http://127.0.0.1:9/x").await.is_ok());
    }

    #[tokio::test]
    async fn an_allowlist_admits_only_its_hosts() {
        let p = Policy {
            allowed_hosts: vec!["hooks.example.com".into()],
            allow_private: true,
        };
        assert!(p.check("https://hooks.example.com/a").await.is_ok());
        let e = p
            .check("https://evil.example.com/a")
            .await
            .expect_err("refused");
        assert!(e.contains("webhook_allowed_hosts"), "{e}");
    }
}
