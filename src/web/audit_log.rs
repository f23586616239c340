//! `/audit`, for admins: the latest audit events, with the hash chain and its signed
//! checkpoints verified on every view. What this module must never do: write to the
//! audit log, or render anything of an event but its recorded fields.

use askama::Template;
use askama_web::WebTemplate;
use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;

use super::error::PageError;
use super::extract::AdminUser;
use super::views::{Chrome, when};
use crate::state::AppState;

/// `/audit`.
pub(crate) fn router() -> Router<AppState> {
    Router::new().route("/audit", get(audit_log))
}

pub struct AuditVm {
    pub seq: i64,
    pub when: String,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub details: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "audit.html")]
struct AuditPage {
    chrome: Chrome,
    chain: String,
    chain_ok: bool,
    events: Vec<AuditVm>,
}

pub async fn audit_log(
    State(state): State<AppState>,
    AdminUser(user): AdminUser,
) -> Result<impl IntoResponse, PageError> {
    // The signed checkpoints too: a rewrite that recomputed every hash passes the
    // chain check alone.
    let keys = [state.audit_key.public_key().clone()];
    let (chain, chain_ok) =
        match crate::audit::checkpoint::verify_db(&state.db, &keys, None).await? {
            Ok(ok) => (
                format!(
                    "chain verified: {} events, head {}; signed checkpoint at seq {}",
                    ok.chain.events,
                    &ok.chain.head[..16],
                    ok.checkpoint
                        .map_or("none yet".to_string(), |s| s.to_string())
                ),
                true,
            ),
            Err(f) => (format!("chain BROKEN: {f}"), false),
        };
    let events = crate::audit::recent(&state.db, None, 200)
        .await?
        .into_iter()
        .map(|e| AuditVm {
            seq: e.seq,
            when: when(e.ts),
            actor: e.actor,
            action: e.action,
            subject: e.subject,
            details: e.details,
        })
        .collect();
    Ok(AuditPage {
        chrome: Chrome::of(&state, &user).await?,
        chain,
        chain_ok,
        events,
    })
}
