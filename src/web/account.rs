//! `/account`: what a signed-in user has given twokey access through — their linked
//! Slack account (with Unlink) — so they can see it and take it back. Every change is a
//! POST with CSRF; this page itself changes nothing.

use askama::Template;
use askama_web::WebTemplate;
use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;

use super::error::PageError;
use super::extract::WebUser;
use super::views::{Chrome, when};
use crate::state::AppState;
use crate::store;

/// `/account`.
pub(crate) fn router() -> Router<AppState> {
    Router::new().route("/account", get(show))
}

pub struct SlackLinkVm {
    pub team_id: String,
    pub slack_user_id: String,
    pub linked: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "account.html")]
struct AccountPage {
    chrome: Chrome,
    email: String,
    slack_enabled: bool,
    slack_links: Vec<SlackLinkVm>,
}

/// GET `/account`.
pub async fn show(
    State(state): State<AppState>,
    user: WebUser,
) -> Result<impl IntoResponse, PageError> {
    let slack_links = store::slack_links_of(&state.db, &user.actor.user_id)
        .await?
        .into_iter()
        .map(|l| SlackLinkVm {
            team_id: l.team_id,
            slack_user_id: l.slack_user_id,
            linked: when(l.created_at),
        })
        .collect();
    Ok(AccountPage {
        chrome: Chrome::of(&state, &user).await?,
        email: user.actor.email.clone(),
        slack_enabled: state.slack.is_some(),
        slack_links,
    })
}
