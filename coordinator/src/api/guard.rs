//! The guard every routed request passes: request id, authentication, authorization, and the
//! audit entry of every state-changing call (refused ones too).
//!
//! Owns the order: resolve the caller from `Authorization: Bearer`, compare its role with
//! what [`crate::access::policy`] says the route needs, run the handler, then append the
//! audit entry with the status answered. Handlers add what the call did through an
//! [`AuditDetail`] response extension. It never looks at request bodies.

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

    let (caller, mut response) = match authorize(&app, &method, &route, req.headers()).await {
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
        Access::Public => return Ok(None),
        Access::Metrics if auth.metrics_public => return Ok(None),
        Access::Metrics => crate::access::Role::Viewer,
        Access::Role(r) => r,
    };
    let caller = if auth.required {
        identify(app, headers).await?
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

async fn identify(app: &AppState, headers: &HeaderMap) -> Result<Caller, Refusal> {
    let unauthorized = |m: String| (None, ApiError::new(StatusCode::UNAUTHORIZED, m));
    let secret = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| unauthorized(tokens::Refused::Missing.to_string()))?;
    if let Some(oidc) = &app.oidc
        && looks_like_jwt(secret)
    {
        return oidc
            .verify(secret)
            .await
            .map_err(|e| unauthorized(e.to_string()));
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
        Ok(Err(refused)) => Err(unauthorized(refused.to_string())),
        Err(e) => Err((None, ApiError::internal(e))),
    }
}

/// A JWT is three base64url parts, the header's starting `ey` (`{"`); API tokens start
/// `fbt_`.
fn looks_like_jwt(secret: &str) -> bool {
    secret.starts_with("ey") && secret.split('.').count() == 3
}
