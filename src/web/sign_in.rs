//! Signing in and out: `/` (to the requests or the sign-in page), `/login`, the demo
//! sign-in (`/login/dev`, only when configured), OpenID Connect (`/auth/oidc/start`,
//! `/auth/oidc/callback`) and `/logout`.
//!
//! A sign-in always starts a new session id (a fixated id is worthless); a failed
//! sign-in leaves nobody signed in. The sign-in endpoints share a per-address budget
//! ([`super::limit`]). What this module must never do: sign anyone in on a GET that a
//! cross-site link could trigger, or write a session row for an anonymous visitor.

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::http::header::SET_COOKIE;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;
use tower_sessions::Session;

use super::anon;
use super::error::PageError;
use super::extract::{MaybeUser, check_csrf};
use super::limit::{self, Bucket};
use super::views::{Chrome, CsrfForm};
use crate::auth::{self, SESSION_CSRF, SESSION_SIGNED_IN_AT, SESSION_USER, oidc};
use crate::error::Error;
use crate::policy::Actor;
use crate::state::AppState;

/// `/`, `/login`, `/logout`, OIDC, and `/login/dev` when demo sign-in is on.
pub(crate) fn router(state: &AppState) -> Router<AppState> {
    let mut router = Router::new();
    // Demo sign-in exists only when configured: otherwise the route is simply absent.
    if state.config().auth.dev_login {
        router = router.route(
            "/login/dev",
            limit::limited(state, Bucket::SignIn, post(dev_login)),
        );
    }
    router
        .route("/", get(home))
        .route("/login", get(login_page))
        .route("/logout", post(logout))
        .route(
            "/auth/oidc/start",
            limit::limited(state, Bucket::SignIn, get(oidc_start)),
        )
        .route(
            "/auth/oidc/callback",
            limit::limited(state, Bucket::SignIn, get(oidc_callback)),
        )
}

pub async fn home(user: MaybeUser) -> Redirect {
    if user.actor.is_some() {
        Redirect::to("/requests")
    } else {
        Redirect::to("/login")
    }
}

pub struct DevUserVm {
    pub email: String,
    pub name: String,
    pub groups: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "login.html")]
struct LoginPage {
    chrome: Chrome,
    dev_users: Vec<DevUserVm>,
    oidc_name: Option<String>,
    next: String,
}

#[derive(Deserialize)]
pub struct NextQuery {
    next: Option<String>,
}

pub async fn login_page(
    State(state): State<AppState>,
    user: MaybeUser,
    headers: HeaderMap,
    Query(q): Query<NextQuery>,
) -> Result<Response, PageError> {
    let dev_users = if state.config().auth.dev_login {
        state
            .config()
            .auth
            .dev_users
            .iter()
            .map(|u| DevUserVm {
                email: u.email.clone(),
                name: u.name.clone().unwrap_or_default(),
                groups: u.groups.join(", "),
            })
            .collect()
    } else {
        Vec::new()
    };
    // The demo sign-in forms carry a CSRF token from a sealed cookie, not a session:
    // this page is anyone's, and writes nothing server-side.
    let mut chrome = Chrome::new(&state, &user.session, user.actor.as_ref()).await?;
    let mut set_cookie = None;
    if !dev_users.is_empty() {
        let (csrf, cookie) = anon::login_csrf(&state, &headers)?;
        chrome.csrf = csrf;
        set_cookie = cookie;
    }
    let mut resp = LoginPage {
        chrome,
        dev_users,
        oidc_name: state.oidc.as_ref().map(|o| o.display_name().to_string()),
        next: oidc::safe_next(q.next.as_deref()),
    }
    .into_response();
    if let Some(c) = set_cookie {
        resp.headers_mut().append(SET_COOKIE, c);
    }
    Ok(resp)
}

/// Makes `actor` the user of this session: a new session id (so a fixated id is
/// worthless), a new CSRF token, and the sign-in time for the lifetime checks.
async fn start_session(
    state: &AppState,
    session: &Session,
    actor: &Actor,
) -> Result<(), PageError> {
    session.cycle_id().await?;
    session.insert(SESSION_USER, &actor.user_id).await?;
    session.insert(SESSION_CSRF, auth::new_csrf()).await?;
    session.insert(SESSION_SIGNED_IN_AT, state.now_ms()).await?;
    Ok(())
}

#[derive(Deserialize)]
pub struct DevLoginForm {
    csrf: String,
    email: String,
    #[serde(default)]
    next: Option<String>,
}

pub async fn dev_login(
    State(state): State<AppState>,
    session: Session,
    headers: HeaderMap,
    Form(form): Form<DevLoginForm>,
) -> Result<Redirect, PageError> {
    // Login CSRF: the form must come from this browser's own sign-in page.
    anon::check_login_csrf(&state, &headers, &form.csrf)?;
    let actor = auth::dev_sign_in(&state, &form.email).await?;
    start_session(&state, &session, &actor).await?;
    tracing::info!(user = %actor.email, "signed in (demo)");
    Ok(Redirect::to(&oidc::safe_next(form.next.as_deref())))
}

/// Starts an OIDC sign-in: hands state, nonce and PKCE verifier to this browser in a
/// sealed, short-lived cookie (nothing is stored server-side for a visitor who is not
/// signed in) and sends the browser to the provider.
pub async fn oidc_start(
    State(state): State<AppState>,
    Query(q): Query<NextQuery>,
) -> Result<Response, PageError> {
    let Some(provider) = state.oidc.clone() else {
        return Err(Error::NotFound("page").into());
    };
    let next = oidc::safe_next(q.next.as_deref());
    let (url, pending) = provider.begin(next, state.now_ms()).await?;
    let cookie = anon::pending_cookie(&state, &pending)?;
    Ok(([(SET_COOKIE, cookie)], Redirect::to(&url)).into_response())
}

#[derive(Deserialize)]
pub struct CallbackQuery {
    state: Option<String>,
    code: Option<String>,
    error: Option<String>,
}

/// The provider's redirect back. The answer clears the sign-in cookie whatever the
/// outcome, so a browser presents a started sign-in once, and a failure leaves nobody
/// signed in.
pub async fn oidc_callback(
    State(state): State<AppState>,
    session: Session,
    headers: HeaderMap,
    Query(q): Query<CallbackQuery>,
) -> Result<Response, PageError> {
    let clear = anon::clear_pending(&state);
    let mut resp = match oidc_finish(&state, &session, &headers, &q).await {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    };
    if let Some(c) = clear {
        resp.headers_mut().append(SET_COOKIE, c);
    }
    Ok(resp)
}

async fn oidc_finish(
    state: &AppState,
    session: &Session,
    headers: &HeaderMap,
    q: &CallbackQuery,
) -> Result<Redirect, PageError> {
    let Some(provider) = state.oidc.clone() else {
        return Err(Error::NotFound("page").into());
    };
    let pending = anon::pending(state, headers);
    let had_pending = pending.is_some();
    let result = async {
        let pending = pending.ok_or(oidc::SignInError::NoPending)?;
        if let Some(err) = &q.error {
            // Only the error code, filtered: it is attacker-controlled text.
            let code: String = err
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                .take(64)
                .collect();
            return Err(oidc::SignInError::Provider(code));
        }
        let (Some(st), Some(code)) = (q.state.as_deref(), q.code.as_deref()) else {
            return Err(oidc::SignInError::StateMismatch);
        };
        let identity = provider
            .finish(&pending, st, code, state.clock.now())
            .await?;
        Ok((identity, pending.next))
    }
    .await;
    match result {
        Ok((identity, next)) => {
            let actor = auth::oidc_sign_in(state, &identity).await?;
            start_session(state, session, &actor).await?;
            tracing::info!(user = %actor.email, iss = %identity.issuer, sub = %identity.subject, "signed in (oidc)");
            Ok(Redirect::to(&next))
        }
        Err(e) => {
            // A sign-in this browser started has failed: fail closed, signed out. (A
            // stray callback with no sign-in started changes nothing, so a cross-site
            // link to it cannot sign anyone out.)
            if had_pending {
                session.remove_value(SESSION_USER).await?;
            }
            tracing::info!(reason = %e, "OIDC sign-in refused");
            Err(Error::from(e).into())
        }
    }
}

pub async fn logout(session: Session, Form(form): Form<CsrfForm>) -> Result<Redirect, PageError> {
    check_csrf(&session, &form.csrf).await?;
    // Deletes the server-side record: the old cookie no longer signs anyone in.
    session.flush().await?;
    Ok(Redirect::to("/login"))
}
