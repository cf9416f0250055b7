//! OpenID Connect: bearer JWTs from a company's identity provider.
//!
//! Owns the provider's key set (JWKS, from a file or a URL, reloaded on a timer and when a
//! token names a key not yet known) and turning a JWT into a [`Caller`]: signature by a key
//! of the set with an asymmetric algorithm (never `none`, never a shared secret), the
//! configured `iss` and `aud`, `exp` and `nbf` within the leeway, and a role from the role
//! claim. It never stores tokens and never logs one.

use std::{
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde_json::Value;
use shared::config::OidcSettings;
use tokio_util::sync::CancellationToken;

use super::{Caller, Role};

/// Least time between two reloads triggered by unknown key ids.
const MIN_RELOAD_GAP: Duration = Duration::from_secs(30);

/// Why OIDC cannot start.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// A setting is missing or wrong.
    #[error("coordinator.auth.oidc.{field}: {problem}")]
    Setting {
        /// The setting.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The key set could not be loaded.
    #[error("the OIDC key set from {source_name}: {problem}")]
    Jwks {
        /// File or URL.
        source_name: String,
        /// What went wrong.
        problem: String,
    },
}

/// Why a JWT was refused (said in the 401).
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("OIDC token refused: {0}")]
pub struct Invalid(pub String);

/// A verifier of the provider's JWTs.
#[derive(Debug)]
pub struct Oidc {
    settings: OidcSettings,
    role_map: Vec<(String, Role)>,
    keys: RwLock<Arc<JwkSet>>,
    last_load: RwLock<Instant>,
    http: reqwest::Client,
}

impl Oidc {
    /// Loads the key set and keeps it fresh until `shutdown`; `None` while OIDC is off.
    ///
    /// # Errors
    /// A setting is missing or malformed, or the key set cannot be loaded.
    pub async fn start(
        settings: &OidcSettings,
        shutdown: CancellationToken,
    ) -> Result<Option<Arc<Self>>, OidcError> {
        if !settings.enabled() {
            return Ok(None);
        }
        let setting = |field, problem: &str| OidcError::Setting {
            field,
            problem: problem.to_owned(),
        };
        if settings.audience.as_deref().is_none_or(str::is_empty) {
            return Err(setting("audience", "required with an issuer"));
        }
        if settings.jwks_file.is_some() == settings.jwks_url.is_some() {
            return Err(setting(
                "jwks_file",
                "set exactly one of jwks_file and jwks_url",
            ));
        }
        if settings.role_claim.is_empty() {
            return Err(setting("role_claim", "must name a claim"));
        }
        let role_map = parse_role_map(&settings.role_map)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| setting("jwks_url", &e.to_string()))?;
        let oidc = Arc::new(Self {
            settings: settings.clone(),
            role_map,
            keys: RwLock::new(Arc::new(JwkSet { keys: vec![] })),
            last_load: RwLock::new(Instant::now()),
            http,
        });
        oidc.load().await?;
        let refresher = oidc.clone();
        let every = Duration::from_secs(settings.jwks_refresh_secs.max(10));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                if let Err(e) = refresher.load().await {
                    tracing::warn!(error.message = %e, "OIDC key set not reloaded; keeping the previous one");
                }
            }
        });
        Ok(Some(oidc))
    }

    /// Reads the key set from its file or URL and swaps it in.
    async fn load(&self) -> Result<(), OidcError> {
        let (source_name, text) = if let Some(path) = &self.settings.jwks_file {
            let name = path.display().to_string();
            let text = tokio::fs::read_to_string(path)
                .await
                .map_err(|e| OidcError::Jwks {
                    source_name: name.clone(),
                    problem: e.to_string(),
                })?;
            (name, text)
        } else {
            let url = self.settings.jwks_url.clone().unwrap_or_default();
            let fetched = async {
                self.http
                    .get(&url)
                    .send()
                    .await?
                    .error_for_status()?
                    .text()
                    .await
            };
            let text = fetched.await.map_err(|e| OidcError::Jwks {
                source_name: url.clone(),
                problem: e.to_string(),
            })?;
            (url, text)
        };
        let set: JwkSet = serde_json::from_str(&text).map_err(|e| OidcError::Jwks {
            source_name: source_name.clone(),
            problem: format!("not a JWK set: {e}"),
        })?;
        tracing::info!(source = %source_name, keys = set.keys.len(), "OIDC key set loaded");
        *self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(set);
        *self
            .last_load
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
        Ok(())
    }

    fn key_set(&self) -> Arc<JwkSet> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The caller a JWT proves, or why it proves nothing.
    ///
    /// # Errors
    /// The reason the token is refused.
    pub async fn verify(&self, token: &str) -> Result<Caller, Invalid> {
        let invalid = |m: String| Invalid(m);
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| invalid(format!("malformed header: {e}")))?;
        if !is_asymmetric(header.alg) {
            return Err(invalid(format!(
                "algorithm {:?} is not accepted (RS*, PS*, ES*, EdDSA only)",
                header.alg
            )));
        }
        let kid = header
            .kid
            .clone()
            .ok_or_else(|| invalid("the header names no key (kid)".into()))?;
        let mut jwk = self.key_set().find(&kid).cloned();
        if jwk.is_none() && self.may_reload() {
            if let Err(e) = self.load().await {
                tracing::warn!(error.message = %e, "OIDC key set not reloaded");
            }
            jwk = self.key_set().find(&kid).cloned();
        }
        let jwk =
            jwk.ok_or_else(|| invalid(format!("no key {kid:?} in the provider's key set")))?;
        if let Some(alg) = jwk.common.key_algorithm
            && Algorithm::try_from(alg).ok() != Some(header.alg)
        {
            return Err(invalid(format!(
                "key {kid:?} is for {alg}, the token says {:?}",
                header.alg
            )));
        }
        let key = DecodingKey::from_jwk(&jwk)
            .map_err(|e| invalid(format!("key {kid:?} is unusable: {e}")))?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[self.settings.issuer.as_deref().unwrap_or_default()]);
        validation.set_audience(&[self.settings.audience.as_deref().unwrap_or_default()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = self.settings.leeway_secs;
        validation.validate_nbf = true;
        let data = jsonwebtoken::decode::<Value>(token, &key, &validation)
            .map_err(|e| invalid(describe(&e)))?;
        self.caller(&data.claims).map_err(invalid)
    }

    fn may_reload(&self) -> bool {
        self.last_load
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .elapsed()
            >= MIN_RELOAD_GAP
    }

    /// The caller the verified claims describe.
    fn caller(&self, claims: &Value) -> Result<Caller, String> {
        let subject = claims["sub"].as_str().unwrap_or_default();
        let values = strings(&claims[self.settings.role_claim.as_str()]);
        let role = values
            .iter()
            .filter_map(|v| self.role_of(v))
            .max()
            .ok_or_else(|| {
                format!(
                    "claim {:?} ({}) maps to no role",
                    self.settings.role_claim,
                    if values.is_empty() {
                        "absent".to_owned()
                    } else {
                        values.join(", ")
                    }
                )
            })?;
        let groups = match &self.settings.groups_claim {
            Some(claim) if role != Role::Admin && !claims[claim.as_str()].is_null() => {
                Some(strings(&claims[claim.as_str()]))
            }
            _ => None,
        };
        Ok(Caller {
            subject: format!("oidc:{subject}"),
            token_id: None,
            role,
            groups,
        })
    }

    fn role_of(&self, value: &str) -> Option<Role> {
        if self.role_map.is_empty() {
            return value.parse().ok();
        }
        self.role_map
            .iter()
            .find(|(v, _)| v == value)
            .map(|(_, r)| *r)
    }
}

/// `value=role` pairs.
fn parse_role_map(pairs: &[String]) -> Result<Vec<(String, Role)>, OidcError> {
    pairs
        .iter()
        .map(|pair| {
            let (value, role) = pair.rsplit_once('=').ok_or_else(|| OidcError::Setting {
                field: "role_map",
                problem: format!("{pair:?} is not value=role"),
            })?;
            let role = role.trim().parse().map_err(|e| OidcError::Setting {
                field: "role_map",
                problem: format!("{pair:?}: {e}"),
            })?;
            Ok((value.trim().to_owned(), role))
        })
        .collect()
}

/// A claim as a list of strings (a string, a list of strings, or a space-separated scope).
fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        Value::Array(a) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => vec![],
    }
}

fn is_asymmetric(alg: Algorithm) -> bool {
    !matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// The refusal reason a caller can act on.
fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature => "bad signature".into(),
        K::ExpiredSignature => "expired".into(),
        K::ImmatureSignature => "not valid yet (nbf)".into(),
        K::InvalidIssuer => "wrong issuer".into(),
        K::InvalidAudience => "wrong audience".into(),
        K::MissingRequiredClaim(c) => format!("missing claim {c}"),
        K::InvalidAlgorithm => "algorithm does not match the key".into(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier(role_map: &[&str], groups_claim: Option<&str>) -> Oidc {
        Oidc {
            settings: OidcSettings {
                issuer: Some("https://idp.example".into()),
                audience: Some("fleetbatch".into()),
                role_claim: "roles".into(),
                groups_claim: groups_claim.map(str::to_owned),
                ..Default::default()
            },
            role_map: parse_role_map(&role_map.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .expect("role map"),
            keys: RwLock::new(Arc::new(JwkSet { keys: vec![] })),
            last_load: RwLock::new(Instant::now()),
            http: reqwest::Client::new(),
        }
    }

    #[test]
    fn the_highest_mapped_role_wins_and_unmapped_values_give_none() {
        let o = verifier(&["fleet-ops=operator", "fleet-admins=admin"], None);
        let c = o
            .caller(
                &serde_json::json!({"sub": "ana", "roles": ["staff", "fleet-ops", "fleet-admins"]}),
            )
            .expect("a caller");
        assert_eq!((c.role, c.subject.as_str()), (Role::Admin, "oidc:ana"));
        let e = o
            .caller(&serde_json::json!({"sub": "bo", "roles": "staff"}))
            .expect_err("no role");
        assert!(e.contains("maps to no role"), "{e}");
        // Without a map, the values are role names.
        let plain = verifier(&[], None);
        let c = plain
            .caller(&serde_json::json!({"sub": "cy", "roles": "viewer"}))
            .expect("a caller");
        assert_eq!(c.role, Role::Viewer);
    }

    #[test]
    fn operators_are_scoped_by_the_groups_claim_admins_never() {
        let o = verifier(&[], Some("fleet_groups"));
        let c = o
            .caller(
                &serde_json::json!({"sub": "d", "roles": "operator", "fleet_groups": ["eu-west"]}),
            )
            .expect("a caller");
        assert_eq!(c.groups, Some(vec!["eu-west".to_owned()]));
        let c = o
            .caller(&serde_json::json!({"sub": "e", "roles": "admin", "fleet_groups": ["eu-west"]}))
            .expect("a caller");
        assert_eq!(c.groups, None);
    }

    #[test]
    fn a_malformed_role_map_names_the_setting() {
        let e = parse_role_map(&["admins".to_owned()]).expect_err("refused");
        assert!(e.to_string().contains("role_map"), "{e}");
        let e = parse_role_map(&["admins=root".to_owned()]).expect_err("refused");
        assert!(e.to_string().contains("unknown role"), "{e}");
    }
}
