//! Dashboard sign-in at the company's identity provider: the OAuth 2.0 authorization code
//! flow with PKCE (the `oauth2` crate), for providers configured under
//! `coordinator.auth.oidc` with an `authorization_url`.
//!
//! Owns the two steps: `/ui/oidc/start` sends the browser to the provider with a fresh
//! state and PKCE challenge (kept in a short-lived `HttpOnly` cookie scoped to
//! `/ui/oidc`), and `/ui/oidc/callback` checks the state, exchanges the code for the
//! provider's tokens and signs in with the ID token, which every request then checks like
//! any OIDC bearer token (signature, issuer, audience, expiry, role). It never trusts a token
//! it has not verified, and never logs one.

use std::sync::Arc;

use axum::{
    extract::{Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
};
use maud::html;
use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet, EndpointSet,
    ExtraTokenFields, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope,
    StandardTokenResponse, TokenUrl,
    basic::{
        BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
        BasicTokenType,
    },
};
use shared::config::OidcSettings;

use super::{login_form, session_cookie};
use crate::{api::guard, app::AppState};

/// The cookie holding the state and PKCE verifier between the two steps.
const FLOW_COOKIE: &str = "fleetbatch_oidc";
/// How long a sign-in at the provider may take.
const FLOW_SECS: u32 = 600;

/// The ID token the token endpoint answers with, beside the access token.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
struct IdToken {
    id_token: Option<String>,
}

impl ExtraTokenFields for IdToken {}

type Client = oauth2::Client<
    BasicErrorResponse,
    StandardTokenResponse<IdToken, BasicTokenType>,
    BasicTokenIntrospectionResponse,
    oauth2::StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// Where the provider sends the browser back: `redirect_url`, or this coordinator's address
/// as the browser reached it (the provider accepts only the addresses registered for the
/// client).
fn redirect(app: &AppState, headers: &HeaderMap) -> Option<String> {
    if let Some(url) = &app.settings.coordinator.auth.oidc.redirect_url {
        return Some(url.clone());
    }
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let scheme = if app.settings.coordinator.tls.cert_file.is_some() {
        "https"
    } else {
        "http"
    };
    Some(format!("{scheme}://{host}/ui/oidc/callback"))
}

/// The provider's client, or what is wrong with the settings.
fn client(s: &OidcSettings, redirect: Option<String>) -> Result<Client, String> {
    let setting = |name: &str, v: &Option<String>| {
        v.clone()
            .ok_or_else(|| format!("coordinator.auth.oidc.{name} is not set"))
    };
    let bad =
        |name: &'static str| move |e: url::ParseError| format!("coordinator.auth.oidc.{name}: {e}");
    let id = s
        .client_id
        .clone()
        .or_else(|| s.audience.clone())
        .ok_or("coordinator.auth.oidc.client_id is not set")?;
    let mut client = oauth2::Client::new(ClientId::new(id))
        .set_auth_uri(
            AuthUrl::new(setting("authorization_url", &s.authorization_url)?)
                .map_err(bad("authorization_url"))?,
        )
        .set_token_uri(
            TokenUrl::new(setting("token_url", &s.token_url)?).map_err(bad("token_url"))?,
        )
        .set_redirect_uri(
            RedirectUrl::new(setting("redirect_url", &redirect)?).map_err(bad("redirect_url"))?,
        );
    if let Some(secret) = &s.client_secret {
        client = client.set_client_secret(ClientSecret::new(secret.clone()));
    }
    Ok(client)
}

/// An answer naming what went wrong, on the sign-in page.
fn refused(status: StatusCode, why: &str) -> Response {
    tracing::warn!(why, "dashboard sign-in at the identity provider refused");
    let clear = format!("{FLOW_COOKIE}=; HttpOnly; SameSite=Lax; Path=/ui/oidc; Max-Age=0");
    (
        status,
        [(header::SET_COOKIE, clear)],
        login_form(Some(why), true),
    )
        .into_response()
}

/// `GET /ui/oidc/start`: to the provider.
pub(super) async fn start(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let s = &app.settings.coordinator.auth.oidc;
    if !s.sign_in() {
        return StatusCode::NOT_FOUND.into_response();
    }
    let client = match client(s, redirect(&app, &headers)) {
        Ok(c) => c,
        Err(e) => return refused(StatusCode::SERVICE_UNAVAILABLE, &e),
    };
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut request = client
        .authorize_url(CsrfToken::new_random)
        .add_scope(Scope::new("openid".into()))
        .set_pkce_challenge(challenge);
    for scope in s.scopes.iter().filter(|s| *s != "openid") {
        request = request.add_scope(Scope::new(scope.clone()));
    }
    let (url, state) = request.url();
    // SameSite=Lax: the provider's redirect back is a top-level navigation from its site.
    let secure = if app.settings.coordinator.tls.cert_file.is_some() {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{FLOW_COOKIE}={}.{}; HttpOnly; SameSite=Lax; Path=/ui/oidc; Max-Age={FLOW_SECS}{secure}",
        state.secret(),
        verifier.secret()
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to(url.as_str())).into_response()
}

#[derive(serde::Deserialize)]
pub(super) struct Callback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// The state and PKCE verifier `start` left in the browser.
fn flow(headers: &HeaderMap) -> Option<(String, String)> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(&format!("{FLOW_COOKIE}=")))
        .find_map(|v| v.split_once('.'))
        .map(|(s, v)| (s.to_owned(), v.to_owned()))
}

/// The HTTP client the exchange goes through.
async fn send(
    http: &reqwest::Client,
    request: oauth2::HttpRequest,
) -> Result<oauth2::HttpResponse, std::io::Error> {
    let request = reqwest::Request::try_from(request).map_err(std::io::Error::other)?;
    let response = http.execute(request).await.map_err(std::io::Error::other)?;
    let mut answer = axum::http::Response::builder().status(response.status());
    for (name, value) in response.headers() {
        answer = answer.header(name, value);
    }
    let body = response.bytes().await.map_err(std::io::Error::other)?;
    answer.body(body.to_vec()).map_err(std::io::Error::other)
}

/// The provider's tokens for `code`.
async fn exchange(
    client: &Client,
    code: String,
    verifier: String,
) -> Result<StandardTokenResponse<IdToken, BasicTokenType>, String> {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let call = move |r: oauth2::HttpRequest| {
        let http = http.clone();
        async move { send(&http, r).await }
    };
    client
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(PkceCodeVerifier::new(verifier))
        .request_async(&call)
        .await
        .map_err(|e| match e {
            oauth2::RequestTokenError::ServerResponse(r) => format!("refused: {r}"),
            other => other.to_string(),
        })
}

/// `GET /ui/oidc/callback`: back from the provider with a code.
pub(super) async fn callback(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<Callback>,
) -> Response {
    let s = &app.settings.coordinator.auth.oidc;
    if !s.sign_in() {
        return StatusCode::NOT_FOUND.into_response();
    }
    if let Some(e) = q.error {
        let detail = q.error_description.unwrap_or_default();
        return refused(
            StatusCode::UNAUTHORIZED,
            &format!("the identity provider refused: {e} {detail}"),
        );
    }
    let Some((expected, verifier)) = flow(&headers) else {
        return refused(
            StatusCode::BAD_REQUEST,
            "no sign-in was started from this browser (or it took over 10 minutes)",
        );
    };
    if q.state.as_deref() != Some(expected.as_str()) {
        return refused(
            StatusCode::BAD_REQUEST,
            "the answer is not for the sign-in this browser started (state differs)",
        );
    }
    let Some(code) = q.code else {
        return refused(StatusCode::BAD_REQUEST, "the provider sent no code");
    };
    let client = match client(s, redirect(&app, &headers)) {
        Ok(c) => c,
        Err(e) => return refused(StatusCode::SERVICE_UNAVAILABLE, &e),
    };
    let tokens = match exchange(&client, code, verifier).await {
        Ok(t) => t,
        Err(e) => {
            return refused(
                StatusCode::BAD_GATEWAY,
                &format!("the provider's token endpoint: {e}"),
            );
        }
    };
    let Some(id_token) = tokens.extra_fields().id_token.clone() else {
        return refused(
            StatusCode::BAD_GATEWAY,
            "the provider answered without an ID token (is `openid` an allowed scope?)",
        );
    };
    match guard::resolve(&app, &id_token).await {
        Ok(caller) => {
            tracing::info!(
                subject = caller.subject,
                "dashboard sign-in at the identity provider"
            );
            let clear = format!("{FLOW_COOKIE}=; HttpOnly; SameSite=Lax; Path=/ui/oidc; Max-Age=0");
            // A page, not a redirect: the next navigation starts on this site, so the
            // `SameSite=Strict` session cookie goes with it.
            (
                // Appended: both cookies are set (an array of headers would keep the last).
                axum::response::AppendHeaders([
                    (header::SET_COOKIE, session_cookie(&app, &id_token)),
                    (header::SET_COOKIE, clear),
                ]),
                html! {
                    (maud::DOCTYPE)
                    html lang="en" {
                        head {
                            meta charset="utf-8";
                            meta http-equiv="refresh" content="0; url=/ui/jobs";
                            title { "Signed in · fleetbatch" }
                        }
                        body { p { "Signed in as " (caller.subject) ". " a href="/ui/jobs" { "Continue" } } }
                    }
                },
            )
                .into_response()
        }
        Err(guard::Resolved::Refused(why)) => refused(StatusCode::UNAUTHORIZED, &why),
        Err(guard::Resolved::Unavailable(e)) => e.into_response(),
    }
}
