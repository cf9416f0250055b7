//! The guard every routed request passes: request id, authentication, authorization, and the
//! audit entry of every state-changing call (refused ones too).
//!
//! Owns the order: resolve the caller from `Authorization: Bearer`, compare its role with
//! what [`crate::access::policy`] says the route needs, run the handler, then append the
//! audit entry with the status answered. Handlers add what the call did through an
//! [`AuditDetail`] response extension. Before any of it, a state-changing request a browser
//! sends from another site is refused (403). It never looks at request bodies.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::{ConnectInfo, MatchedPath, Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use uuid::Uuid;

use super::ApiError;
use crate::{
    access::{
        Caller,
        policy::{self, Access},
        tokens,
    },
    app::AppState,
    audit,
};

/// Header carrying the request id (taken from the caller when it sends a sane one).
pub const REQUEST_ID: &str = "x-request-id";

/// The cookie a browser signed in to the dashboard carries: the caller's API token (or OIDC
/// token), `HttpOnly` and `SameSite=Strict`. It is checked like a bearer token on every
/// request, so a revoked token ends its sessions at once.
pub const SESSION_COOKIE: &str = "fleetbatch_session";

/// The header a signed-in browser's state-changing request must carry: the CSRF token its
/// page was rendered with ([`csrf_token`]).
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The CSRF token of a session: derived from its secret, so a page of this API knows it and
/// a page elsewhere cannot.
pub fn csrf_token(secret: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(format!("fleetbatch csrf\n{secret}").as_bytes());
    hex::encode(&digest[..16])
}

/// The session secret a browser's cookie carries, if any.
pub fn session_secret(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.trim())
        .filter(|v| !v.is_empty())
}

/// The caller a dashboard page is rendered for: its session's, or an anonymous admin when
/// the API requires no authentication; `None` when it must sign in.
pub async fn page_caller(app: &AppState, headers: &HeaderMap) -> Option<(Caller, String)> {
    if !app.settings.coordinator.auth.required {
        return Some((Caller::anonymous_admin(), String::new()));
    }
    let secret = session_secret(headers)?;
    let caller = resolve(app, secret).await.ok()?;
    Some((caller, secret.to_owned()))
}

/// What a state-changing call did, for its audit entry (set by the handler on its response).
#[derive(Debug, Clone)]
pub struct AuditDetail(pub serde_json::Value);

/// The middleware.
pub(super) async fn guard(
    State(app): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let request_id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| Uuid::now_v7().to_string(), str::to_owned);
    let remote = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_default();

    let checked = match cross_site(&method, req.headers()) {
        Some(why) => Err((None, ApiError::new(StatusCode::FORBIDDEN, why))),
        None => authorize(&app, &method, &route, req.headers()).await,
    };
    let (caller, mut response) = match checked {
        Ok(caller) => {
            if let Some(c) = &caller {
                req.extensions_mut().insert(c.clone());
            }
            (caller, next.run(req).await)
        }
        Err((caller, e)) => (caller, e.into_response()),
    };

    if policy::changes_state(&method) {
        let detail = response
            .extensions()
            .get::<AuditDetail>()
            .map(|d| d.0.clone())
            .unwrap_or(serde_json::Value::Null);
        let status = response.status().as_u16();
        let job_id = path
            .strip_prefix("/v1/jobs/")
            .and_then(|rest| rest.split('/').next())
            .map(str::to_owned)
            .or_else(|| detail["job_id"].as_str().map(str::to_owned));
        let entry = audit::Entry {
            at_ms: shared::now_ms(),
            actor: caller
                .as_ref()
                .map_or_else(|| "unauthenticated".to_owned(), |c| c.subject.clone()),
            role: caller
                .as_ref()
                .map(|c| c.role.as_str().to_owned())
                .unwrap_or_default(),
            action: format!("{method} {route}"),
            path,
            job_id,
            status,
            outcome: audit::outcome(status).to_owned(),
            remote,
            request_id: request_id.clone(),
            detail,
            ..Default::default()
        };
        let mut redis = app.redis.clone();
        if let Err(e) = audit::append(
            &mut redis,
            &app.names,
            app.settings.coordinator.audit.retention_days,
            &entry,
        )
        .await
        {
            tracing::error!(request_id, action = entry.action, actor = entry.actor, error.message = %e, "audit entry not written");
        }
        if status == 401 || status == 403 {
            tracing::warn!(
                security_event = "api_refused",
                request_id,
                action = entry.action,
                actor = entry.actor,
                remote = entry.remote,
                status,
                "refused API call"
            );
        }
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    response
}

/// Why a state-changing request sent by a browser from another site is refused, if it is
/// one. Browsers name the site a request comes from (`Sec-Fetch-Site`, `Origin`); a page
/// elsewhere must not change anything here through a visitor's browser, whatever it
/// authenticates with (cookies, or no authentication at all in a development setup).
/// Clients that are not browsers (the CLI, scripts) send neither header.
fn cross_site(method: &Method, headers: &HeaderMap) -> Option<String> {
    if !policy::changes_state(method) {
        return None;
    }
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("unreadable");
        if !matches!(site, "same-origin" | "none") {
            return Some(format!(
                "a cross-site request (Sec-Fetch-Site: {site}) may not change anything"
            ));
        }
    }
    let origin = headers.get(header::ORIGIN)?;
    let origin = origin.to_str().unwrap_or("unreadable");
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let origin_host = origin.split_once("://").map_or(origin, |(_, h)| h);
    (host.is_empty() || origin_host != host)
        .then(|| format!("a request from origin {origin} may not change anything on {host}"))
}

type Refusal = (Option<Caller>, ApiError);

/// The caller, or why the call is refused (401: who are you; 403: you may not).
async fn authorize(
    app: &AppState,
    method: &Method,
    route: &str,
    headers: &HeaderMap,
) -> Result<Option<Caller>, Refusal> {
    let auth = &app.settings.coordinator.auth;
    let needed = match policy::access(method, route) {
        // A public change (signing in or out of the dashboard) is still audited under the
        // caller's name when it brings valid credentials.
        Access::Public if policy::changes_state(method) && auth.required => {
            return Ok(identify(app, method, headers).await.ok());
        }
        Access::Public => return Ok(None),
        Access::Metrics if auth.metrics_public => return Ok(None),
        Access::Metrics => crate::access::Role::Viewer,
        Access::Role(r) => r,
    };
    let caller = if auth.required {
        identify(app, method, headers).await?
    } else {
        Caller::anonymous_admin()
    };
    if caller.role < needed {
        let message = format!(
            "{} ({}) may not {method} {route}: needs the {} role",
            caller.subject,
            caller.role.as_str(),
            needed.as_str()
        );
        return Err((Some(caller), ApiError::new(StatusCode::FORBIDDEN, message)));
    }
    Ok(Some(caller))
}

/// The caller of a request: its bearer token, or a signed-in browser's session cookie (whose
/// state-changing requests must also carry the page's CSRF token).
async fn identify(app: &AppState, method: &Method, headers: &HeaderMap) -> Result<Caller, Refusal> {
    let unauthorized = |m: String| (None, ApiError::new(StatusCode::UNAUTHORIZED, m));
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|s| !s.is_empty());
    let secret = match bearer {
        Some(s) => s,
        None => {
            let s = session_secret(headers)
                .ok_or_else(|| unauthorized(tokens::Refused::Missing.to_string()))?;
            let sent = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
            if policy::changes_state(method) && sent != Some(csrf_token(s).as_str()) {
                return Err((
                    None,
                    ApiError::new(
                        StatusCode::FORBIDDEN,
                        format!(
                            "a change from a signed-in browser needs its page's {CSRF_HEADER} header"
                        ),
                    ),
                ));
            }
            s
        }
    };
    resolve(app, secret).await.map_err(|e| match e {
        Resolved::Refused(m) => unauthorized(m),
        Resolved::Unavailable(e) => (None, e),
    })
}

/// Why a secret names no caller.
#[derive(Debug)]
pub enum Resolved {
    /// Unknown, expired, revoked or badly signed (the message says which).
    Refused(String),
    /// Redis or the identity provider could not be asked.
    Unavailable(ApiError),
}

/// The caller a secret (API token, bootstrap token or OIDC token) names.
pub async fn resolve(app: &AppState, secret: &str) -> Result<Caller, Resolved> {
    if let Some(oidc) = &app.oidc
        && looks_like_jwt(secret)
    {
        return oidc
            .verify(secret)
            .await
            .map_err(|e| Resolved::Refused(e.to_string()));
    }
    if app
        .bootstrap_sha256
        .as_deref()
        .is_some_and(|h| h == tokens::hash(secret))
    {
        return Ok(Caller::bootstrap_admin());
    }
    let mut redis = app.redis.clone();
    match tokens::resolve(&mut redis, &app.names, secret).await {
        Ok(Ok(caller)) => Ok(caller),
        Ok(Err(refused)) => Err(Resolved::Refused(refused.to_string())),
        Err(e) => Err(Resolved::Unavailable(ApiError::internal(e))),
    }
}

/// A JWT is three base64url parts, the header's starting `ey` (`{"`); API tokens start
/// `fbt_`.
fn looks_like_jwt(secret: &str) -> bool {
    secret.starts_with("ey") && secret.split('.').count() == 3
}
