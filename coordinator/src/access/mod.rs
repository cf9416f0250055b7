//! Who may call the API: identities, roles, group scopes and the route policy.
//!
//! Owns turning a request's bearer token into a [`Caller`] ([`tokens`] for API tokens,
//! [`oidc`] for an identity provider's JWTs), the table of what
//! each route needs ([`policy`]), and the check that a scoped operator's job stays inside
//! its groups ([`scope`]). It never handles a request's business: the API's guard asks it
//! who is calling and whether they may, then hands the request on.

pub mod oidc;
pub mod policy;
pub mod scope;
pub mod tokens;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What a caller may do; each role may do everything the ones before it may.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read devices, jobs, reports and dead letters.
    Viewer,
    /// Also create and cancel jobs (within its groups, when scoped).
    Operator,
    /// Also manage tokens, import into and change the registry, replay dead letters, read
    /// the audit log.
    Admin,
}

impl Role {
    /// The role's name as the API and CLI spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?} (viewer, operator or admin)"
            )),
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Caller {
    /// Who: the token's name, `bootstrap-admin`, or `anonymous` while authentication is off.
    pub subject: String,
    /// The API token used, if one was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_id: Option<Uuid>,
    /// What it may do.
    pub role: Role,
    /// The groups it is confined to; `None`: the whole fleet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<String>>,
}

impl Caller {
    /// The caller while authentication is turned off.
    pub fn anonymous_admin() -> Self {
        Self {
            subject: "anonymous".into(),
            token_id: None,
            role: Role::Admin,
            groups: None,
        }
    }

    /// The bootstrap admin (the token from settings).
    pub fn bootstrap_admin() -> Self {
        Self {
            subject: "bootstrap-admin".into(),
            token_id: None,
            role: Role::Admin,
            groups: None,
        }
    }
}
