//! `twokey login` in the browser: the signed-in user confirms, and the browser is sent
//! to the CLI's loopback listener with a one-time code. The CLI then trades the code and
//! its PKCE verifier for an API token (`POST /api/v1/cli/token`).
//!
//! The redirect goes only to `http://127.0.0.1:<port>/callback` — never to a host taken
//! from the request — so this page cannot be made into an open redirect.
//!
//! The CLI asks for scopes (`scope=requests`, the default, or `requests approve` for
//! `twokey login --approve`); the page says exactly what they allow and for how long,
//! and the token gets those scopes and no others.

use askama::Template;
use askama_web::WebTemplate;
use axum::Form;
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{ApiError, PageError};
use super::extract::WebUser;
use super::limit::{self, Bucket};
use super::views::Chrome;
use crate::auth;
use crate::auth::scopes::{Scope, Scopes};
use crate::error::Error;
use crate::state::AppState;

/// The browser half: `/cli/login`, a page (with the session).
pub(crate) fn router() -> Router<AppState> {
    Router::new().route("/cli/login", get(show).post(confirm))
}

/// The CLI half, under `/api/v1` (no session, JSON errors): `POST /cli/token`, which
/// anyone can reach, so it has a per-address budget.
pub(crate) fn api_router(state: &AppState) -> Router<AppState> {
    Router::new().route(
        "/cli/token",
        limit::limited(state, Bucket::Token, post(token)),
    )
}

#[derive(Deserialize)]
pub struct LoginQuery {
    #[serde(default)]
    port: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    challenge: String,
    #[serde(default)]
    scope: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "cli_login.html")]
struct CliLoginPage {
    chrome: Chrome,
    email: String,
    port: u16,
    state: String,
    challenge: String,
    /// The stored form, for the hidden field.
    scope: String,
    /// What each scope allows, in words.
    allows: Vec<(String, String)>,
    ttl: String,
    approve: bool,
}

/// What the CLI sent, checked: a loopback port, and state and challenge of the shapes it
/// makes (so nothing odd is reflected into the page or the redirect).
fn checked(q: &LoginQuery) -> Result<(u16, String, String, Scopes), Error> {
    let port = q
        .port
        .parse::<u16>()
        .ok()
        .filter(|p| *p >= 1024)
        .ok_or_else(|| Error::invalid("port", "must be the CLI's loopback port"))?;
    let b64url = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !(16..=128).contains(&q.state.len()) || !b64url(&q.state) {
        return Err(Error::invalid(
            "state",
            "is missing or malformed: run twokey login again",
        ));
    }
    if q.challenge.len() != 43 || !b64url(&q.challenge) {
        return Err(Error::invalid(
            "challenge",
            "is missing or malformed: run twokey login again",
        ));
    }
    let scopes = if q.scope.trim().is_empty() {
        Scopes::requests()
    } else {
        Scopes::parse(&q.scope).map_err(|e| Error::invalid("scope", e))?
    };
    Ok((port, q.state.clone(), q.challenge.clone(), scopes))
}

/// GET: a confirm page (never an action).
pub async fn show(
    State(state): State<AppState>,
    user: WebUser,
    Query(q): Query<LoginQuery>,
) -> Result<impl IntoResponse, PageError> {
    let (port, st, challenge, scopes) = checked(&q)?;
    let page = CliLoginPage {
        chrome: Chrome::of(&state, &user).await?,
        email: user.actor.email.clone(),
        port,
        state: st,
        challenge,
        scope: scopes.to_db(),
        allows: scopes
            .iter()
            .map(|s| (s.as_str().to_string(), s.describe().to_string()))
            .collect(),
        ttl: crate::policy::format_duration(state.config().cli_token_ttl()),
        approve: scopes.contains(Scope::Approve),
    };
    // Browsers check a form's redirect against the form-action of the page that holds
    // the form, not of the POST's response: this page must allow the CLI's listener.
    Ok((
        [(
            axum::http::header::CONTENT_SECURITY_POLICY,
            loopback_csp(port),
        )],
        page,
    ))
}

/// The site's CSP, with form submissions (and their redirects) also allowed to exactly
/// the CLI's loopback listener on `port`.
fn loopback_csp(port: u16) -> String {
    super::CSP.replace(
        "form-action 'self'",
        &format!("form-action 'self' http://127.0.0.1:{port}"),
    )
}

#[derive(Deserialize)]
pub struct ConfirmForm {
    csrf: String,
    #[serde(flatten)]
    q: LoginQuery,
}

/// POST: mint the one-time code and send the browser back to the CLI.
pub async fn confirm(
    State(state): State<AppState>,
    user: WebUser,
    Form(form): Form<ConfirmForm>,
) -> Result<impl IntoResponse, PageError> {
    user.check_csrf(&form.csrf).await?;
    let (port, st, challenge, scopes) = checked(&form.q)?;
    let code = auth::begin_cli_login(&state, &user.actor, &challenge, &scopes).await?;
    // The same loopback-only form-action on the redirect response, for browsers that
    // check it there too.
    Ok((
        [(
            axum::http::header::CONTENT_SECURITY_POLICY,
            loopback_csp(port),
        )],
        Redirect::to(&format!(
            "http://127.0.0.1:{port}/callback?code={code}&state={st}"
        )),
    ))
}

/// `POST /api/v1/cli/token {code, verifier}` → `{token}`.
pub async fn token(State(state): State<AppState>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let v: Value = serde_json::from_slice(&body)
        .map_err(|_| Error::invalid("body", "must be JSON with code and verifier"))?;
    let (Some(code), Some(verifier)) = (v["code"].as_str(), v["verifier"].as_str()) else {
        return Err(Error::invalid("body", "must be JSON with code and verifier").into());
    };
    let token = auth::redeem_cli_code(&state, code, verifier).await?;
    Ok(Json(json!({ "token": token })))
}
