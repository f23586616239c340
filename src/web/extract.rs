//! Extractors that *are* the permission checks: a handler that takes [`WebUser`],
//! [`AdminUser`] (or [`SessionAdmin`]) or [`ApiUser`] cannot run for anyone else, and
//! [`ApiToken::require`] refuses a token without the scope an action needs. Checks that
//! need the object loaded first (may this user see this request, this session, this
//! link?) stay with the object: in `access`, `policy` and the handler's lookup.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Redirect, Response};
use tower_sessions::Session;

use super::error::{ApiError, PageError};
use crate::auth::scopes::Scope;
use crate::auth::{self, SESSION_CSRF, SESSION_LAST_SEEN, SESSION_SIGNED_IN_AT, SESSION_USER};
use crate::error::Error;
use crate::policy::Actor;
use crate::state::AppState;

/// A person signed in through the browser, with the session they came with.
pub struct WebUser {
    pub actor: Actor,
    pub session: Session,
}

impl WebUser {
    /// Refuses a form post whose CSRF token does not match the session's.
    pub async fn check_csrf(&self, submitted: &str) -> Result<(), PageError> {
        check_csrf(&self.session, submitted).await
    }
}

/// Compares a submitted CSRF token with the session's in constant time.
pub async fn check_csrf(session: &Session, submitted: &str) -> Result<(), PageError> {
    let expected: Option<String> = session.get(SESSION_CSRF).await?;
    match expected {
        Some(expected) if auth::secrets_equal(&expected, submitted) => Ok(()),
        _ => Err(PageError(Error::forbidden(
            "this form has expired or did not come from twokey; reload the page and try again",
        ))),
    }
}

async fn session_of(parts: &mut Parts, state: &AppState) -> Result<Session, PageError> {
    Session::from_request_parts(parts, state)
        .await
        .map_err(|(_, msg)| PageError(Error::Internal(format!("session layer missing: {msg}"))))
}

/// Sends a signed-out visitor to sign in, then back to the page they asked for.
fn to_login(parts: &Parts) -> Response {
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let next = if parts.method == axum::http::Method::GET {
        format!("/login?next={}", urlencode(target))
    } else {
        "/login".to_string()
    };
    Redirect::to(&next).into_response()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The signed-in user of a session, if the session is still valid: inside its absolute
/// lifetime, used within the idle timeout (both on the injected clock; the session
/// store's own expiry is a backstop), and not older than the user's last forced
/// re-sign-in.
async fn signed_in(state: &AppState, session: &Session) -> Result<Option<Actor>, PageError> {
    let Some(user_id) = session.get::<String>(SESSION_USER).await? else {
        return Ok(None);
    };
    let signed_in_at = session.get::<i64>(SESSION_SIGNED_IN_AT).await?.unwrap_or(0);
    let last_seen = session
        .get::<i64>(SESSION_LAST_SEEN)
        .await?
        .unwrap_or(signed_in_at);
    let lifetime_ms = state.config().session_lifetime().as_millis() as i64;
    let idle_ms = state.config().session_idle_timeout().as_millis() as i64;
    let now = state.now_ms();
    let actor = auth::session_actor(state, &user_id).await?;
    match actor {
        Some(actor)
            if signed_in_at > actor.sessions_valid_after
                && now - signed_in_at < lifetime_ms
                && now - last_seen < idle_ms =>
        {
            // Recorded at most once a minute, so browsing does not write on every page.
            if now - last_seen > 60_000 {
                session.insert(SESSION_LAST_SEEN, now).await?;
            }
            Ok(Some(actor))
        }
        _ => {
            // Expired, forced out, or the user is gone: end the session for good.
            session.flush().await?;
            Ok(None)
        }
    }
}

impl FromRequestParts<AppState> for WebUser {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let session = session_of(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        match signed_in(state, &session)
            .await
            .map_err(IntoResponse::into_response)?
        {
            Some(actor) => Ok(WebUser { actor, session }),
            None => Err(to_login(parts)),
        }
    }
}

/// The session of a visitor who may not be signed in.
pub struct MaybeUser {
    pub actor: Option<Actor>,
    pub session: Session,
}

impl FromRequestParts<AppState> for MaybeUser {
    type Rejection = PageError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let session = session_of(parts, state).await?;
        let actor = signed_in(state, &session).await?;
        Ok(MaybeUser { actor, session })
    }
}

/// A signed-in member of an admin group.
pub struct AdminUser(pub WebUser);

/// The signed-in user if they are an admin; anyone else is refused (403, `why`) before
/// the handler runs, so it learns nothing about the object it names.
async fn admin(
    parts: &mut Parts,
    state: &AppState,
    why: &'static str,
) -> Result<WebUser, Response> {
    let user = WebUser::from_request_parts(parts, state).await?;
    if !user.actor.is_admin {
        return Err(PageError(Error::forbidden(why)).into_response());
    }
    Ok(user)
}

impl FromRequestParts<AppState> for AdminUser {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        admin(parts, state, "this page is for admins")
            .await
            .map(AdminUser)
    }
}

/// An admin ending a live relay session: the check of [`AdminUser`], refused in the
/// words of that button ("only an admin may end a session"). The session's holder and
/// approvers may watch it, but not end it.
pub struct SessionAdmin(pub WebUser);

impl FromRequestParts<AppState> for SessionAdmin {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        admin(parts, state, "only an admin may end a session")
            .await
            .map(SessionAdmin)
    }
}

/// A caller of `/api/v1` with a valid `Authorization: Bearer` token, whatever its
/// scopes. The API takes no cookies, so it needs no CSRF defence.
pub struct ApiToken(pub auth::TokenUser);

impl FromRequestParts<AppState> for ApiToken {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(ApiError(Error::Unauthenticated))?;
        Ok(ApiToken(
            auth::authenticate_token(state, token.trim()).await?,
        ))
    }
}

impl ApiToken {
    /// Refuses (403) a token without `scope`, naming what it lacks.
    pub fn require(&self, scope: Scope) -> Result<&Actor, ApiError> {
        if self.0.scopes.contains(scope) {
            Ok(&self.0.actor)
        } else {
            Err(ApiError(Error::forbidden(format!(
                "this token lacks the {:?} scope (it has: {}); make one with it: twokey login{} or twokey token create --scope {}",
                scope.as_str(),
                self.0.scopes,
                if scope == Scope::Approve {
                    " --approve"
                } else {
                    ""
                },
                scope.as_str(),
            ))))
        }
    }
}

/// A caller whose token has the `requests` scope: their own requests and credentials.
pub struct ApiUser(pub Actor);

impl FromRequestParts<AppState> for ApiUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = ApiToken::from_request_parts(parts, state).await?;
        token.require(Scope::Requests)?;
        Ok(ApiUser(token.0.actor))
    }
}
