//! `/dev/mailbox`: the demo's mailbox, what twokey would have emailed. It answers only
//! when demo sign-in and the dev mailbox are both configured; otherwise 404. What this
//! module must never do: exist in a production setup (it shows action links).

use askama::Template;
use askama_web::WebTemplate;
use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;

use super::error::PageError;
use super::extract::WebUser;
use super::views::{Chrome, when};
use crate::error::Error;
use crate::state::AppState;
use crate::store;

/// `/dev/mailbox`.
pub(crate) fn router() -> Router<AppState> {
    Router::new().route("/dev/mailbox", get(dev_mailbox))
}

pub struct MailVm {
    pub to: String,
    pub subject: String,
    pub when: String,
    pub html: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "mailbox.html")]
struct MailboxPage {
    chrome: Chrome,
    mails: Vec<MailVm>,
}

/// The demo's mailbox: what twokey would have emailed. Exists only with demo sign-in.
pub async fn dev_mailbox(
    State(state): State<AppState>,
    user: WebUser,
) -> Result<impl IntoResponse, PageError> {
    if !(state.config().auth.dev_login
        && state.config().email.as_ref().is_some_and(|e| e.dev_mailbox))
    {
        return Err(Error::NotFound("page").into());
    }
    let mails = store::dev_mailbox(&state.db, 100)
        .await?
        .into_iter()
        .map(|m| MailVm {
            to: m.recipient,
            subject: m.subject,
            when: when(m.created_at),
            html: m.body_html,
        })
        .collect();
    Ok(MailboxPage {
        chrome: Chrome::of(&state, &user).await?,
        mails,
    })
}
