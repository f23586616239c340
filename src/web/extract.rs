//! Extractors that *are* the permission checks: a handler that takes [`WebUser`],
//! [`AdminUser`] or [`ApiUser`] cannot run for anyone else.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use tower_sessions::Session;

use super::error::{ApiError, PageError};
use crate::auth::{self, SESSION_CSRF, SESSION_USER};
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

impl FromRequestParts<AppState> for WebUser {
    type Rejection = PageError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let session = session_of(parts, state).await?;
        let Some(user_id) = session.get::<String>(SESSION_USER).await? else {
            return Err(PageError(Error::Unauthenticated));
        };
        match auth::session_actor(state, &user_id).await? {
            Some(actor) => Ok(WebUser { actor, session }),
            None => {
                session.flush().await?;
                Err(PageError(Error::Unauthenticated))
            }
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
        let actor = match session.get::<String>(SESSION_USER).await? {
            Some(id) => auth::session_actor(state, &id).await?,
            None => None,
        };
        Ok(MaybeUser { actor, session })
    }
}

/// A signed-in member of an admin group.
pub struct AdminUser(pub WebUser);

impl FromRequestParts<AppState> for AdminUser {
    type Rejection = PageError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let user = WebUser::from_request_parts(parts, state).await?;
        if !user.actor.is_admin {
            return Err(PageError(Error::forbidden("this page is for admins")));
        }
        Ok(AdminUser(user))
    }
}

/// A caller of `/api/v1` with a valid `Authorization: Bearer` token. The API takes no
/// cookies, so it needs no CSRF defence.
pub struct ApiUser(pub Actor);

impl FromRequestParts<AppState> for ApiUser {
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
        Ok(ApiUser(
            auth::authenticate_token(state, token.trim()).await?,
        ))
    }
}
