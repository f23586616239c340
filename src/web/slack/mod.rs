//! Slack's calls to twokey, and linking a Slack account.
//!
//! `POST /slack/interactions`: Slack's interactivity callback for the Approve/Deny
//! buttons. Unverified requests get 401 and are not read further ([`verify`]); verified
//! ones get 200 at once (Slack retries anything else), with refusals told to the
//! clicking user ([`interact`]).
//!
//! `/slack/link/{token}`: where an unlinked Slack user links their Slack account to
//! their twokey account, signed in, by a POST with CSRF; `/account/slack/unlink`
//! removes it. A GET never links ([`link`]). Posting and updating the request messages
//! is `notify::slack`'s, through the outbox.

pub mod interact;
pub mod link;
pub mod verify;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;

use self::link::LinkRefusal;
use super::error::PageError;
use super::extract::{MaybeUser, WebUser};
use super::limit::{self, Bucket};
use super::views::{Chrome, CsrfForm};
use crate::state::AppState;

/// `POST /slack/interactions`: served without a session (Slack has no cookie), under
/// Slack's per-address budget.
pub(crate) fn interactions_router(state: &AppState) -> Router<AppState> {
    Router::new().route(
        "/slack/interactions",
        limit::limited(state, Bucket::Slack, post(interactions)),
    )
}

/// The pages: `/slack/link/{token}` (under the links' budget) and
/// `/account/slack/unlink`.
pub(crate) fn router(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/account/slack/unlink", post(unlink))
        .route(
            "/slack/link/{token}",
            limit::limited(state, Bucket::Link, get(link_page).post(link_confirm)),
        )
}

/// `POST /slack/interactions`.
pub async fn interactions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let Some(slack) = state.slack.clone() else {
        return StatusCode::NOT_FOUND;
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Err(refusal) = verify::verify(
        &slack,
        &state,
        header("x-slack-request-timestamp"),
        header("x-slack-signature"),
        &body,
        state.clock.now(),
    )
    .await
    {
        tracing::warn!(reason = %refusal, "slack interaction refused");
        crate::state::Metrics::inc(&state.metrics.refusals);
        return StatusCode::UNAUTHORIZED;
    }
    let payload = form_urlencoded::parse(&body)
        .find(|(k, _)| k == "payload")
        .and_then(|(_, v)| serde_json::from_str::<serde_json::Value>(&v).ok());
    let Some(payload) = payload else {
        return StatusCode::BAD_REQUEST;
    };
    if payload["type"] != "block_actions" {
        return StatusCode::OK;
    }
    if let Err(e) = interact::interact(&slack, &state, &payload).await {
        tracing::error!(error = %e, "slack interaction failed");
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    StatusCode::OK
}

// ------------------------------------------------------------------ linking

#[derive(askama::Template, askama_web::WebTemplate)]
#[template(path = "slack_link.html")]
struct LinkPage {
    chrome: Chrome,
    /// Why the visitor cannot link (empty when they can).
    notice: String,
    sign_in: Option<String>,
    confirm: Option<LinkConfirm>,
}

struct LinkConfirm {
    slack_name: String,
    slack_user_id: String,
    team_id: String,
    email: String,
    post_url: String,
}

fn notice(chrome: Chrome, status: StatusCode, notice: String, sign_in: Option<String>) -> Response {
    let page = LinkPage {
        chrome,
        notice,
        sign_in,
        confirm: None,
    };
    (status, page).into_response()
}

/// GET `/slack/link/{token}`: a confirm page, never an action. The Slack account's
/// details are shown only to a signed-in user it may be linked to.
pub async fn link_page(
    State(state): State<AppState>,
    user: MaybeUser,
    Path(token): Path<String>,
) -> Result<Response, PageError> {
    let chrome = Chrome::new(&state, &user.session, user.actor.as_ref()).await?;
    let row = match link::check_link_token(&state, &token).await? {
        Ok(row) => row,
        Err(refusal) => {
            let status = match refusal {
                LinkRefusal::Unknown => StatusCode::NOT_FOUND,
                LinkRefusal::Used | LinkRefusal::Expired => StatusCode::GONE,
            };
            return Ok(notice(chrome, status, refusal.message().into(), None));
        }
    };
    let Some(actor) = user.actor else {
        return Ok(notice(
            chrome,
            StatusCode::OK,
            "Sign in to twokey to link your Slack account.".into(),
            Some(format!("/login?next=/slack/link/{token}")),
        ));
    };
    if let Some(why) = link::link_mismatch(&row, &actor) {
        return Ok(notice(chrome, StatusCode::FORBIDDEN, why, None));
    }
    Ok(LinkPage {
        chrome,
        notice: String::new(),
        sign_in: None,
        confirm: Some(LinkConfirm {
            slack_name: row.slack_name,
            slack_user_id: row.slack_user_id,
            team_id: row.team_id,
            email: actor.email,
            post_url: format!("/slack/link/{token}"),
        }),
    }
    .into_response())
}

/// POST `/slack/link/{token}`: the signed-in user confirms; the token is used up in the
/// same transaction that makes the link.
pub async fn link_confirm(
    State(state): State<AppState>,
    user: WebUser,
    Path(token): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Redirect, PageError> {
    user.check_csrf(&form.csrf).await?;
    link::link(&state, &user.actor, &token).await?;
    Ok(Redirect::to("/account"))
}

#[derive(Deserialize)]
pub struct UnlinkForm {
    csrf: String,
    team_id: String,
    slack_user_id: String,
}

/// POST `/account/slack/unlink`: the user removes their own link.
pub async fn unlink(
    State(state): State<AppState>,
    user: WebUser,
    Form(form): Form<UnlinkForm>,
) -> Result<Redirect, PageError> {
    user.check_csrf(&form.csrf).await?;
    link::unlink(&state, &user.actor, &form.team_id, &form.slack_user_id).await?;
    Ok(Redirect::to("/account"))
}
