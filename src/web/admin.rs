//! Admins: `/admin/users` (who exists, with which groups as of which sign-in) and
//! forcing a user to sign in again. Every handler takes [`AdminUser`]; the host-key
//! pages are in [`super::host_keys`].

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};
use axum::{Form, Router};

use super::error::PageError;
use super::extract::AdminUser;
use super::views::{Chrome, CsrfForm, when};
use crate::auth;
use crate::state::AppState;
use crate::store;

/// `/admin/users` and `/admin/users/{id}/reauth`.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/users", get(users))
        .route("/admin/users/{id}/reauth", post(force_reauth))
}

pub struct UserVm {
    pub id: String,
    pub email: String,
    pub identity: String,
    pub groups: String,
    pub synced: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "users.html")]
struct UsersPage {
    chrome: Chrome,
    users: Vec<UserVm>,
}

/// Admins: who exists, with which groups as of which sign-in.
pub async fn users(
    State(state): State<AppState>,
    AdminUser(user): AdminUser,
) -> Result<impl IntoResponse, PageError> {
    let users = store::list_users(&state.db)
        .await?
        .into_iter()
        .map(|u| UserVm {
            id: u.id,
            email: u.email,
            identity: format!("{} · {}", u.issuer, u.subject),
            groups: u.groups,
            synced: u.synced_at.map(when).unwrap_or_else(|| "never".into()),
        })
        .collect();
    Ok(UsersPage {
        chrome: Chrome::of(&state, &user).await?,
        users,
    })
}

/// Admins: end a user's browser sessions so their next request signs in again.
pub async fn force_reauth(
    State(state): State<AppState>,
    AdminUser(user): AdminUser,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Redirect, PageError> {
    user.check_csrf(&form.csrf).await?;
    auth::force_reauth(&state, &user.actor, &id).await?;
    Ok(Redirect::to("/admin/users"))
}
