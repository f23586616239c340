//! Emailed action links: `/a/{token}`.
//!
//! Mail scanners fetch links, run scripts and even POST. So a GET (or HEAD) only
//! shows a confirm page and never changes anything; acting takes a POST with the
//! CSRF token of a signed-in session of the very approver the link was made for, and
//! uses the token up in the same transaction as the decision.

use askama::Template;
use askama_web::WebTemplate;
use axum::Form;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use serde::Deserialize;

use super::error::PageError;
use super::extract::MaybeUser;
use super::limit::{self, Bucket};
use super::views::Chrome;
use crate::access::{self, Decision};
use crate::auth;
use crate::error::Error;
use crate::policy::format_duration;
use crate::state::AppState;
use crate::store::{self, ActionTokenRow};

/// `/a/{token}`, GET and POST, under the links' per-address budget.
pub(crate) fn router(state: &AppState) -> Router<AppState> {
    Router::new().route(
        "/a/{token}",
        limit::limited(state, Bucket::Link, get(show).post(confirm)),
    )
}

#[derive(Template, WebTemplate)]
#[template(path = "link.html")]
struct LinkPage {
    chrome: Chrome,
    /// What to tell the visitor when they cannot act.
    notice: String,
    sign_in: Option<String>,
    request_url: Option<String>,
    confirm: Option<Confirm>,
}

struct Confirm {
    action: String,
    requester: String,
    resource: String,
    role: String,
    duration: String,
    reason: String,
    ticket: String,
    post_url: String,
}

/// Why a link cannot be used, in words for the page.
enum Refusal {
    Unknown,
    Used,
    Expired,
    NotYou,
    Decided(String),
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::Unknown => StatusCode::NOT_FOUND,
            Refusal::Used | Refusal::Expired | Refusal::Decided(_) => StatusCode::GONE,
            Refusal::NotYou => StatusCode::FORBIDDEN,
        }
    }

    fn message(&self) -> String {
        match self {
            Refusal::Unknown => "This link is not valid. Open twokey to see your approval queue.".into(),
            Refusal::Used => "This link has already been used. Each link works once.".into(),
            Refusal::Expired => {
                "This link has expired: links work for 10 minutes. You can still decide on the request page.".into()
            }
            Refusal::NotYou => {
                "This link was sent to someone else. Sign out and sign in as the person it was sent to.".into()
            }
            Refusal::Decided(status) => format!("This request has already been {status}."),
        }
    }
}

async fn lookup(state: &AppState, token: &str) -> Result<Option<ActionTokenRow>, PageError> {
    if !token.starts_with("ak_") || token.len() > 128 {
        return Ok(None);
    }
    let hash = auth::hash_token(token);
    let row = store::action_token(&state.db, &hash).await?;
    // Found by hash; compare in constant time anyway.
    Ok(row.filter(|r| auth::secrets_equal(&r.token_hash, &hash)))
}

/// Checks a link against the clock and the request. `Ok(row)` if it may be used now.
async fn check(
    state: &AppState,
    token: &str,
) -> Result<Result<ActionTokenRow, (Refusal, Option<String>)>, PageError> {
    let Some(row) = lookup(state, token).await? else {
        return Ok(Err((Refusal::Unknown, None)));
    };
    let url = Some(format!("/requests/{}", row.request_id));
    let mut conn = state.db.acquire().await?;
    let req = store::get_request(&mut conn, &row.request_id).await?;
    let now = state.now_ms();
    if let Some(req) = &req
        && (req.status != crate::policy::RequestStatus::Pending || req.expires_at <= now)
    {
        let status = if req.status == crate::policy::RequestStatus::Pending {
            "expired".to_string()
        } else {
            req.status.to_string()
        };
        return Ok(Err((Refusal::Decided(status), url)));
    }
    if row.used_at.is_some() {
        return Ok(Err((Refusal::Used, url)));
    }
    if row.expires_at <= now {
        return Ok(Err((Refusal::Expired, url)));
    }
    Ok(Ok(row))
}

fn refused(chrome: Chrome, refusal: Refusal, request_url: Option<String>) -> Response {
    let page = LinkPage {
        chrome,
        notice: refusal.message(),
        sign_in: None,
        request_url,
        confirm: None,
    };
    (refusal.status(), page).into_response()
}

/// GET/HEAD: a page, never an action.
pub async fn show(
    State(state): State<AppState>,
    user: MaybeUser,
    Path(token): Path<String>,
) -> Result<Response, PageError> {
    let chrome = Chrome::new(&state, &user.session, user.actor.as_ref()).await?;
    let row = match check(&state, &token).await? {
        Ok(row) => row,
        Err((refusal, url)) => return Ok(refused(chrome, refusal, url)),
    };
    let Some(actor) = user.actor else {
        // Details only after sign-in: whoever else holds the link learns nothing.
        let page = LinkPage {
            chrome,
            notice: "Sign in to twokey to confirm this decision.".into(),
            sign_in: Some(format!("/login?next=/a/{token}")),
            request_url: None,
            confirm: None,
        };
        return Ok(page.into_response());
    };
    if actor.user_id != row.approver_id {
        return Ok(refused(chrome, Refusal::NotYou, None));
    }
    let mut conn = state.db.acquire().await?;
    let req = store::get_request(&mut conn, &row.request_id)
        .await?
        .ok_or(Error::NotFound("request"))?;
    let page = LinkPage {
        chrome,
        notice: String::new(),
        sign_in: None,
        request_url: Some(format!("/requests/{}", req.id)),
        confirm: Some(Confirm {
            action: row.action.clone(),
            requester: req.requester_email,
            resource: req.resource,
            role: req.role,
            duration: format_duration(std::time::Duration::from_secs(req.duration_secs as u64)),
            reason: req.reason,
            ticket: req.ticket.unwrap_or_default(),
            post_url: format!("/a/{token}"),
        }),
    };
    Ok(page.into_response())
}

#[derive(Deserialize)]
pub struct ConfirmForm {
    csrf: String,
    #[serde(default)]
    comment: String,
}

/// POST: the signed-in approver confirms. The token is used up in the decision's
/// transaction, so it works once even under concurrent posts.
pub async fn confirm(
    State(state): State<AppState>,
    user: MaybeUser,
    Path(token): Path<String>,
    Form(form): Form<ConfirmForm>,
) -> Result<Response, PageError> {
    super::extract::check_csrf(&user.session, &form.csrf).await?;
    let chrome = Chrome::new(&state, &user.session, user.actor.as_ref()).await?;
    let row = match check(&state, &token).await? {
        Ok(row) => row,
        Err((refusal, url)) => return Ok(refused(chrome, refusal, url)),
    };
    let Some(actor) = user.actor else {
        return Err(Error::Unauthenticated.into());
    };
    if actor.user_id != row.approver_id {
        return Ok(refused(chrome, Refusal::NotYou, None));
    }
    let decision = if row.action == "approve" {
        Decision::Approve
    } else {
        Decision::Deny
    };
    access::decide_with_link(
        &state,
        &actor,
        &row.request_id,
        decision,
        Some(&form.comment),
        &row.token_hash,
    )
    .await?;
    Ok(Redirect::to(&format!("/requests/{}", row.request_id)).into_response())
}
