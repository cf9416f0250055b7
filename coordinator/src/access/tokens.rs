//! API tokens: created with a role (and optionally groups and an expiry), shown once, stored
//! as a SHA-256 hash, listed, revoked.
//!
//! Owns the token records in Redis and resolving a presented secret to a [`Caller`]. Every
//! request looks its token up in Redis, so a revocation holds on every coordinator from the
//! next request on. Secrets are 256-bit random strings, so a plain SHA-256 (not a slow
//! password hash) is what keeps a leaked database from yielding usable tokens. It never
//! stores or logs a secret.

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shared::redis_conn::RedisConn;
use shared::{now_ms, store::StoreError, topology::Names};
use uuid::Uuid;

use super::{Caller, Role};

/// Prefix of every API token's secret (lets secret scanners recognise leaked ones).
pub const SECRET_PREFIX: &str = "fbt_";

/// A stored token (never the secret).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct TokenRecord {
    /// Its id.
    pub id: Uuid,
    /// Who or what uses it (e.g. `ci-pipeline`): the subject in the audit log.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Groups it is confined to (empty: the whole fleet).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Creation time (ms since the epoch).
    pub created_at_ms: u64,
    /// Who created it.
    pub created_by: String,
    /// Expiry (ms since the epoch), if any.
    pub expires_at_ms: Option<u64>,
    /// Revocation time, once revoked.
    pub revoked_at_ms: Option<u64>,
    /// The SHA-256 of the secret (hex): the name of its lookup key.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret_sha256: String,
}

impl TokenRecord {
    /// The record as the API shows it (without the secret's hash).
    pub fn public(&self) -> Self {
        Self {
            secret_sha256: String::new(),
            ..self.clone()
        }
    }
}

/// What a new token is for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Groups it is confined to.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Lifetime in seconds (none: until revoked).
    pub expires_in_secs: Option<u64>,
}

/// Why a presented token was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Refused {
    /// No token, or not a bearer token.
    #[error("no bearer token: send `Authorization: Bearer <token>`")]
    Missing,
    /// Not a token this deployment issued.
    #[error("unknown token")]
    Unknown,
    /// Revoked.
    #[error("token {0} was revoked")]
    Revoked(Uuid),
    /// Expired.
    #[error("token {0} has expired")]
    Expired(Uuid),
}

/// The SHA-256 of a secret, hex.
pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new random secret: the prefix and 64 hex digits (two version-4 UUIDs, 244 random bits
/// from the operating system's generator).
fn new_secret() -> String {
    format!(
        "{SECRET_PREFIX}{}{}",
        Uuid::new_v4().simple(),
        Uuid::new_v4().simple()
    )
}

/// Checks a new token's fields.
///
/// # Errors
/// The field at fault and the problem.
pub fn validate(new: &NewToken) -> Result<(), (&'static str, String)> {
    let name = new.name.trim();
    if name.is_empty() || name.len() > 128 {
        return Err(("name", "must be 1 to 128 characters".into()));
    }
    if name.chars().any(char::is_control) {
        return Err(("name", "must not contain control characters".into()));
    }
    if new.role == Role::Admin && !new.groups.is_empty() {
        return Err(("groups", "an admin token cannot be scoped to groups".into()));
    }
    if let Some(secs) = new.expires_in_secs
        && !(1..=10 * 365 * 86_400).contains(&secs)
    {
        return Err((
            "expires_in_secs",
            "must be between 1 second and 10 years".into(),
        ));
    }
    Ok(())
}

/// Creates a token; returns its record and its secret (shown once, never stored).
///
/// # Errors
/// Redis errors.
pub async fn create(
    redis: &mut RedisConn,
    names: &Names,
    new: &NewToken,
    created_by: &str,
) -> Result<(TokenRecord, String), StoreError> {
    let secret = new_secret();
    let now = now_ms();
    let record = TokenRecord {
        id: Uuid::now_v7(),
        name: new.name.trim().to_owned(),
        role: new.role,
        groups: new.groups.clone(),
        created_at_ms: now,
        created_by: created_by.to_owned(),
        expires_at_ms: new
            .expires_in_secs
            .map(|s| now.saturating_add(s.saturating_mul(1000))),
        revoked_at_ms: None,
        secret_sha256: hash(&secret),
    };
    let json = to_json(&record);
    let () = redis::pipe()
        .atomic()
        .hset(names.tokens(), record.id.to_string(), json)
        .ignore()
        .set(
            names.token_secret(&record.secret_sha256),
            record.id.to_string(),
        )
        .ignore()
        .query_async(redis)
        .await?;
    Ok((record, secret))
}

/// Every token, newest first.
///
/// # Errors
/// Redis errors or a corrupt record.
pub async fn list(redis: &mut RedisConn, names: &Names) -> Result<Vec<TokenRecord>, StoreError> {
    let raw: Vec<String> = redis.hvals(names.tokens()).await?;
    let mut out = raw
        .iter()
        .map(|r| parse(names, r).map(|t| t.public()))
        .collect::<Result<Vec<_>, _>>()?;
    out.sort_by_key(|t| std::cmp::Reverse(t.id));
    Ok(out)
}

/// Revokes a token: its secret stops working on the next request anywhere. `None` when no
/// such token exists; revoking twice keeps the first time.
///
/// # Errors
/// Redis errors or a corrupt record.
pub async fn revoke(
    redis: &mut RedisConn,
    names: &Names,
    id: Uuid,
) -> Result<Option<TokenRecord>, StoreError> {
    let raw: Option<String> = redis.hget(names.tokens(), id.to_string()).await?;
    let Some(raw) = raw else { return Ok(None) };
    let mut record = parse(names, &raw)?;
    if record.revoked_at_ms.is_none() {
        record.revoked_at_ms = Some(now_ms());
    }
    // The secret's lookup key stays, so the next request with it is told it was revoked.
    let () = redis
        .hset(names.tokens(), id.to_string(), to_json(&record))
        .await?;
    Ok(Some(record.public()))
}

/// The caller a presented secret stands for, checked against the store now.
///
/// # Errors
/// `Ok(Err(..))` when the token is refused; `Err` on Redis errors.
pub async fn resolve(
    redis: &mut RedisConn,
    names: &Names,
    secret: &str,
) -> Result<Result<Caller, Refused>, StoreError> {
    if !secret.starts_with(SECRET_PREFIX) {
        return Ok(Err(Refused::Unknown));
    }
    let id: Option<String> = redis.get(names.token_secret(&hash(secret))).await?;
    let Some(id) = id else {
        return Ok(Err(Refused::Unknown));
    };
    let raw: Option<String> = redis.hget(names.tokens(), &id).await?;
    let Some(raw) = raw else {
        return Ok(Err(Refused::Unknown));
    };
    let record = parse(names, &raw)?;
    Ok(judge(&record, now_ms()))
}

fn to_json(record: &TokenRecord) -> String {
    // Invariant: a struct of strings, numbers and a uuid always serialises.
    serde_json::to_string(record).unwrap_or_default()
}

fn parse(names: &Names, raw: &str) -> Result<TokenRecord, StoreError> {
    serde_json::from_str(raw).map_err(|e| StoreError::Corrupt {
        key: names.tokens(),
        problem: e.to_string(),
    })
}

/// Whether a stored token may be used at `now`.
fn judge(record: &TokenRecord, now: u64) -> Result<Caller, Refused> {
    if record.revoked_at_ms.is_some() {
        return Err(Refused::Revoked(record.id));
    }
    if record.expires_at_ms.is_some_and(|e| e <= now) {
        return Err(Refused::Expired(record.id));
    }
    Ok(Caller {
        subject: record.name.clone(),
        token_id: Some(record.id),
        role: record.role,
        groups: (!record.groups.is_empty()).then(|| record.groups.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> TokenRecord {
        TokenRecord {
            id: Uuid::now_v7(),
            name: "ci".into(),
            role: Role::Operator,
            groups: vec!["eu-west".into()],
            created_at_ms: 1,
            created_by: "admin".into(),
            expires_at_ms: Some(1_000),
            revoked_at_ms: None,
            secret_sha256: "ab".into(),
        }
    }

    #[test]
    fn a_live_token_stands_for_its_name_role_and_groups() {
        let c = judge(&record(), 999).expect("live");
        assert_eq!(c.subject, "ci");
        assert_eq!(c.role, Role::Operator);
        assert_eq!(c.groups, Some(vec!["eu-west".to_owned()]));
    }

    #[test]
    fn expired_and_revoked_tokens_are_refused() {
        let r = record();
        assert_eq!(judge(&r, 1_000).err(), Some(Refused::Expired(r.id)));
        let revoked = TokenRecord {
            revoked_at_ms: Some(5),
            ..r.clone()
        };
        assert_eq!(judge(&revoked, 10).err(), Some(Refused::Revoked(r.id)));
        let unscoped = TokenRecord {
            groups: vec![],
            expires_at_ms: None,
            ..r
        };
        assert_eq!(judge(&unscoped, u64::MAX).expect("live").groups, None);
    }

    #[test]
    fn secrets_are_random_prefixed_and_stored_only_as_hashes() {
        let (a, b) = (new_secret(), new_secret());
        assert_ne!(a, b);
        assert!(a.starts_with(SECRET_PREFIX) && a.len() == SECRET_PREFIX.len() + 64);
        assert_eq!(hash(&a).len(), 64);
        assert_ne!(hash(&a), hash(&b));
        assert!(
            !serde_json::to_string(&record().public())
                .expect("json")
                .contains("secret")
        );
    }

    #[test]
    fn new_tokens_are_checked_field_by_field() {
        let ok = NewToken {
            name: "ci".into(),
            role: Role::Operator,
            groups: vec!["a".into()],
            expires_in_secs: Some(86_400),
        };
        assert!(validate(&ok).is_ok());
        let bad_name = NewToken {
            name: " ".into(),
            ..ok.clone()
        };
        assert_eq!(validate(&bad_name).err().map(|e| e.0), Some("name"));
        let scoped_admin = NewToken {
            role: Role::Admin,
            ..ok.clone()
        };
        assert_eq!(validate(&scoped_admin).err().map(|e| e.0), Some("groups"));
        let forever = NewToken {
            expires_in_secs: Some(u64::MAX),
            ..ok
        };
        assert_eq!(
            validate(&forever).err().map(|e| e.0),
            Some("expires_in_secs")
        );
    }
}
