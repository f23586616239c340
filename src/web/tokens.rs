//! `/tokens`: a user's live API tokens (name, scopes, made, ends, last used) with a
//! Revoke button each; admins also see everyone else's. Only hashes are stored, so no
//! page can show a token again. Revoking is a POST with CSRF and one conditional UPDATE
//! with its audit event ([`crate::auth::revoke_token`]).

use askama::Template;
use askama_web::WebTemplate;
use axum::Form;
use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};

use super::error::PageError;
use super::extract::WebUser;
use super::views::{Chrome, CsrfForm, when};
use crate::state::AppState;
use crate::store::{self, TokenListRow};

/// `/tokens` and `/tokens/{id}/revoke`.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/tokens", get(list))
        .route("/tokens/{id}/revoke", post(revoke))
}

pub struct TokenVm {
    pub id: String,
    pub owner: String,
    pub label: String,
    pub scopes: String,
    pub created: String,
    pub expires: String,
    pub last_used: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "tokens.html")]
struct TokensPage {
    chrome: Chrome,
    mine: Vec<TokenVm>,
    /// Everyone else's, for admins only.
    others: Option<Vec<TokenVm>>,
}

fn vm(t: TokenListRow, cap_ms: i64) -> TokenVm {
    TokenVm {
        id: t.id,
        owner: t.owner_email,
        label: t.label,
        scopes: t.scopes,
        created: when(t.created_at),
        // What authentication enforces: the earlier of the token's end and the cap.
        expires: when(t.expires_at.min(t.created_at + cap_ms)),
        last_used: t.last_used_at.map(when).unwrap_or_else(|| "never".into()),
    }
}

/// GET `/tokens`.
pub async fn list(
    State(state): State<AppState>,
    user: WebUser,
) -> Result<impl IntoResponse, PageError> {
    let now = state.now_ms();
    let cap = state.config().token_ttl().as_millis() as i64;
    let live = |t: &TokenListRow| t.created_at + cap > now;
    let me = &user.actor.user_id;
    let (mine, others) = if user.actor.is_admin {
        let all = store::live_tokens(&state.db, None, now).await?;
        let (mine, others): (Vec<_>, Vec<_>) =
            all.into_iter().filter(live).partition(|t| &t.user_id == me);
        (mine, Some(others))
    } else {
        let mine = store::live_tokens(&state.db, Some(me), now).await?;
        (mine.into_iter().filter(live).collect(), None)
    };
    Ok(TokensPage {
        chrome: Chrome::of(&state, &user).await?,
        mine: mine.into_iter().map(|t| vm(t, cap)).collect(),
        others: others.map(|o| o.into_iter().map(|t| vm(t, cap)).collect()),
    })
}

/// POST `/tokens/{id}/revoke`: the owner, or an admin.
pub async fn revoke(
    State(state): State<AppState>,
    user: WebUser,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Redirect, PageError> {
    user.check_csrf(&form.csrf).await?;
    crate::auth::revoke_token(&state, &user.actor, &id).await?;
    Ok(Redirect::to("/tokens"))
}
