//! What the browser of a visitor who is not signed in carries instead of a session:
//! the sign-in form's CSRF token and an OpenID Connect sign-in in progress, each in its
//! own sealed cookie ([`crate::auth::sealed`]). No anonymous request writes a row.
//!
//! Both cookies are HttpOnly and, behind https, `Secure` with the `__Host-` prefix, so a
//! sibling subdomain cannot plant one (cookie tossing). The CSRF cookie is
//! `SameSite=Strict`; the sign-in cookie must be `Lax`, as the provider's redirect back
//! is a cross-site navigation.

use axum::http::{HeaderMap, HeaderValue, header};
use serde::{Deserialize, Serialize};
use time::Duration;
use tower_sessions::cookie::{Cookie, SameSite};

use super::error::PageError;
use crate::auth::{self, oidc};
use crate::error::Error;
use crate::state::AppState;

const CSRF_COOKIE: &str = "twokey_login_csrf";
const OIDC_COOKIE: &str = "twokey_oidc";
/// How long a sign-in page's form works.
const CSRF_TTL_MS: i64 = 60 * 60 * 1000;

#[derive(Serialize, Deserialize)]
struct LoginCsrf {
    csrf: String,
}

fn name(state: &AppState, base: &str) -> String {
    if state.config().secure_cookies() {
        format!("__Host-{base}")
    } else {
        base.to_string()
    }
}

fn read(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| Cookie::parse(c.trim().to_string()).ok())
        .find(|c| c.name() == name)
        .map(|c| c.value().to_string())
}

fn set(
    state: &AppState,
    name: String,
    value: String,
    max_age_ms: i64,
    same_site: SameSite,
) -> Option<HeaderValue> {
    let cookie = Cookie::build((name, value))
        .path("/")
        .http_only(true)
        .secure(state.config().secure_cookies())
        .same_site(same_site)
        .max_age(Duration::milliseconds(max_age_ms))
        .build();
    HeaderValue::from_str(&cookie.to_string()).ok()
}

/// The sign-in form's CSRF token: the one this browser holds if still good, else a new
/// one with the `Set-Cookie` that gives it to the browser.
pub fn login_csrf(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(String, Option<HeaderValue>), PageError> {
    let cookie = name(state, CSRF_COOKIE);
    let now = state.now_ms();
    if let Some(held) =
        read(headers, &cookie).and_then(|v| state.sealer.open::<LoginCsrf>(&cookie, &v, now))
    {
        return Ok((held.csrf, None));
    }
    let csrf = auth::new_csrf();
    let sealed = state.sealer.seal(
        &cookie,
        &LoginCsrf { csrf: csrf.clone() },
        now + CSRF_TTL_MS,
    )?;
    Ok((
        csrf,
        set(state, cookie, sealed, CSRF_TTL_MS, SameSite::Strict),
    ))
}

/// Refuses a sign-in form whose CSRF token is not the one in this browser's cookie
/// (login CSRF: nobody can sign your browser in as someone else).
pub fn check_login_csrf(
    state: &AppState,
    headers: &HeaderMap,
    submitted: &str,
) -> Result<(), PageError> {
    let cookie = name(state, CSRF_COOKIE);
    let held = read(headers, &cookie)
        .and_then(|v| state.sealer.open::<LoginCsrf>(&cookie, &v, state.now_ms()));
    match held {
        Some(h) if auth::secrets_equal(&h.csrf, submitted) => Ok(()),
        _ => Err(PageError(Error::forbidden(
            "this form has expired or did not come from twokey; reload the page and try again",
        ))),
    }
}

/// The `Set-Cookie` that hands a started sign-in to the browser, for as long as a
/// sign-in may take.
pub fn pending_cookie(state: &AppState, pending: &oidc::Pending) -> Result<HeaderValue, PageError> {
    let cookie = name(state, OIDC_COOKIE);
    let sealed = state
        .sealer
        .seal(&cookie, pending, pending.started_at + oidc::PENDING_TTL_MS)?;
    set(state, cookie, sealed, oidc::PENDING_TTL_MS, SameSite::Lax)
        .ok_or_else(|| PageError(Error::Internal("sign-in cookie".into())))
}

/// The sign-in this browser started, if its cookie is authentic and not expired.
pub fn pending(state: &AppState, headers: &HeaderMap) -> Option<oidc::Pending> {
    let cookie = name(state, OIDC_COOKIE);
    read(headers, &cookie).and_then(|v| state.sealer.open(&cookie, &v, state.now_ms()))
}

/// The `Set-Cookie` that ends a sign-in in progress: the callback sends it whatever the
/// outcome, so a browser presents one sign-in once.
pub fn clear_pending(state: &AppState) -> Option<HeaderValue> {
    set(
        state,
        name(state, OIDC_COOKIE),
        String::new(),
        0,
        SameSite::Lax,
    )
}
