//! Held actions in the browser: the list (what waits for you, what you sent, what was
//! decided), one held action's page (the exact statement or command and its
//! parameters, what the relay parsed of it, why it is held, the session so far, the
//! decisions), and the approve / deny buttons.
//!
//! Every POST form carries the session's CSRF token and is checked before anything
//! else. Who may decide is `access::held`'s to refuse; `can_decide` only chooses
//! whether to show the buttons. The statement reaches the page only through askama's
//! escaping.

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};
use axum::{Form, Router};

use super::error::PageError;
use super::extract::WebUser;
use super::requests::ActionForm;
use super::views::{Chrome, when};
use crate::access::held::{self, HeldView};
use crate::access::{Channel, Decision};
use crate::error::Error;
use crate::policy::{self, HeldStatus};
use crate::recording::transcript::{self, Entry};
use crate::state::AppState;

/// `/held`, `/held/{id}` and its actions.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/held", get(list))
        .route("/held/{id}", get(show))
        .route("/held/{id}/{action}", post(act))
}

/// Statements of the session shown on a held action's page, the latest ones.
const SESSION_SHOWN: usize = 20;

pub struct HeldVm {
    pub id: String,
    pub who: String,
    pub resource: String,
    pub role: String,
    /// "statement" or "command".
    pub what: &'static str,
    pub action: String,
    pub params: Vec<String>,
    pub kinds: String,
    pub tables: String,
    pub why: String,
    pub status: String,
    pub have: usize,
    pub need: i64,
    pub filed: String,
    pub until: String,
    pub session_id: String,
    /// Who decided, in words: "approved by bob@… (ok)".
    pub decisions: Vec<String>,
}

fn vm(v: &HeldView) -> HeldVm {
    let h = &v.held;
    let parse = h.parse();
    HeldVm {
        id: h.id.clone(),
        who: h.requester_email.clone(),
        resource: h.resource.clone(),
        role: h.role.clone(),
        what: if h.protocol == "ssh" {
            "command"
        } else {
            "statement"
        },
        action: h.action.clone(),
        // A value quoted, as SQL writes it; NULL bare, so the two never look alike.
        params: h
            .params()
            .into_iter()
            .map(|p| match p {
                Some(v) => format!("'{}'", v.replace('\'', "''")),
                None => "NULL".into(),
            })
            .collect(),
        kinds: parse.kinds.join(", "),
        tables: parse.tables.join(", "),
        why: h.why.clone(),
        status: h.status.to_string(),
        have: v.approval_count(),
        need: h.required_approvals,
        filed: when(h.created_at),
        until: when(h.expires_at),
        session_id: h.session_id.clone(),
        decisions: v
            .decisions
            .iter()
            .map(|a| {
                let verb = if a.decision == Decision::Approve {
                    "approved"
                } else {
                    "denied"
                };
                let mut s = format!(
                    "{verb} by {} at {} ({})",
                    a.approver_email,
                    when(a.created_at),
                    a.channel
                );
                if let Some(c) = &a.comment {
                    s.push_str(&format!(": {c}"));
                }
                s
            })
            .collect(),
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "held_list.html")]
struct HeldListPage {
    chrome: Chrome,
    waiting: Vec<HeldVm>,
    others: Vec<HeldVm>,
}

pub async fn list(
    State(state): State<AppState>,
    user: WebUser,
) -> Result<impl IntoResponse, PageError> {
    let waiting: Vec<HeldVm> = held::queue(&state, &user.actor)
        .await?
        .iter()
        .map(vm)
        .collect();
    let others = held::list(&state, &user.actor, None)
        .await?
        .iter()
        .filter(|v| !waiting.iter().any(|w| w.id == v.held.id))
        .map(vm)
        .collect();
    Ok(HeldListPage {
        chrome: Chrome::of(&state, &user).await?,
        waiting,
        others,
    })
}

/// One statement of the session so far, as its approver sees it.
pub struct SoFarVm {
    pub at: String,
    pub sql: String,
    pub outcome: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "held_detail.html")]
struct HeldDetailPage {
    chrome: Chrome,
    h: HeldVm,
    can_decide: bool,
    own: bool,
    approver_groups: String,
    so_far: Vec<SoFarVm>,
    /// Entries of the session's record before those shown.
    earlier: usize,
    so_far_error: String,
}

pub async fn show(
    State(state): State<AppState>,
    user: WebUser,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, PageError> {
    let view = held::view(&state, &user.actor, &id).await?;
    let h = &view.held;
    let actor = &user.actor;
    let config = state.config();
    let role = config.role(&h.resource, &h.role).map(|(_, r)| r);
    let can_decide = h.status == HeldStatus::Pending
        && !view.decided_by(&actor.user_id)
        && role.is_some_and(|r| policy::may_decide(actor, &h.requester_id, r).is_ok());
    let (so_far, earlier, so_far_error) = session_so_far(&state, &h.session_id).await;
    Ok(HeldDetailPage {
        chrome: Chrome::of(&state, &user).await?,
        can_decide,
        own: h.requester_id == actor.user_id,
        approver_groups: view
            .approver_groups
            .join(if view.all_groups { " and " } else { " or " }),
        so_far,
        earlier,
        so_far_error,
        h: vm(&view),
    })
}

/// The latest statements of a PostgreSQL session and their outcomes (no rows: the
/// session's page shows those to whoever may see it).
async fn session_so_far(state: &AppState, session_id: &str) -> (Vec<SoFarVm>, usize, String) {
    let session = match crate::store::session(&state.db, session_id).await {
        Ok(Some(s)) if s.protocol == "postgres" => s,
        Ok(_) => return (Vec::new(), 0, String::new()),
        Err(e) => return (Vec::new(), 0, e.to_string()),
    };
    let path = std::path::PathBuf::from(&session.recording);
    let read =
        tokio::task::spawn_blocking(move || transcript::read_last(&path, SESSION_SHOWN)).await;
    let (entries, before) = match read {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return (Vec::new(), 0, format!("the transcript cannot be read: {e}")),
        Err(e) => return (Vec::new(), 0, e.to_string()),
    };
    let shown = entries
        .into_iter()
        .filter_map(|e| match e {
            Entry::Statement(s) => Some(SoFarVm {
                at: format!("+{:.1} s", s.t.max(0.0)),
                outcome: match (&s.error, &s.refused, &s.tag) {
                    (_, Some(rule), _) => format!("refused ({rule})"),
                    (Some(e), _, _) => format!("error {}: {}", e.code, e.message),
                    (_, _, Some(tag)) => tag.clone(),
                    _ => String::new(),
                },
                sql: s.sql,
            }),
            Entry::Note { t, text } => Some(SoFarVm {
                at: format!("+{:.1} s", t.max(0.0)),
                sql: String::new(),
                outcome: text,
            }),
            Entry::Notification { .. } => None,
        })
        .collect();
    (shown, before as usize, String::new())
}

pub async fn act(
    State(state): State<AppState>,
    user: WebUser,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<ActionForm>,
) -> Result<Redirect, PageError> {
    user.check_csrf(&form.csrf).await?;
    let decision = match action.as_str() {
        "approve" => Decision::Approve,
        "deny" => Decision::Deny,
        _ => return Err(Error::NotFound("action").into()),
    };
    let comment = Some(form.comment.as_str());
    held::decide(&state, &user.actor, &id, decision, comment, Channel::Web).await?;
    Ok(Redirect::to(&format!("/held/{id}")))
}
