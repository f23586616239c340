//! `/policy`: every resource and role as configured, who may request and approve it,
//! and whether the viewer may request it. Read-only; what this module must never do
//! is decide anything (the page shows `policy`'s answers).

use askama::Template;
use askama_web::WebTemplate;
use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;

use super::error::PageError;
use super::extract::WebUser;
use super::views::Chrome;
use crate::config::{Config, DbAccess, ResourceConfig, ResourceKind, RoleConfig};
use crate::policy::{self, format_duration};
use crate::state::AppState;

/// `/policy`.
pub(crate) fn router() -> Router<AppState> {
    Router::new().route("/policy", get(policy))
}

pub struct PolicyRowVm {
    pub resource: String,
    pub kind: String,
    pub role: String,
    pub requesters: String,
    pub approvers: String,
    pub approvals: String,
    pub max: String,
    pub ticket: bool,
    pub pending_ttl: String,
    pub you_may_request: bool,
    /// What a grant of it reaches and what holds on the way, in plain words.
    pub grants: Vec<String>,
}

#[derive(Template, WebTemplate)]
#[template(path = "policy.html")]
struct PolicyPage {
    chrome: Chrome,
    rows: Vec<PolicyRowVm>,
}

pub async fn policy(
    State(state): State<AppState>,
    user: WebUser,
) -> Result<impl IntoResponse, PageError> {
    let mut rows = Vec::new();
    for r in &state.config().resources {
        for role in &r.roles {
            rows.push(PolicyRowVm {
                resource: r.name.clone(),
                kind: r.kind.to_string(),
                role: role.name.clone(),
                requesters: role.requester_groups.join(", "),
                approvers: role.approver_groups.join(", "),
                approvals: if role.all_groups {
                    format!("{} (every group)", role.min_approvals)
                } else {
                    role.min_approvals.to_string()
                },
                max: format_duration(role.max_duration()),
                ticket: role.require_ticket,
                pending_ttl: format_duration(state.config().pending_ttl(role)),
                you_may_request: policy::may_request(&user.actor, role),
                grants: grants_in_words(&state.config(), r, role),
            });
        }
    }
    Ok(PolicyPage {
        chrome: Chrome::of(&state, &user).await?,
        rows,
    })
}

/// What a role grants, and on a relayed database what its statements are held to.
fn grants_in_words(config: &Config, r: &ResourceConfig, role: &RoleConfig) -> Vec<String> {
    let mut words = grants_by_kind(config, r, role);
    let holds = !role.sql.review.is_empty()
        || !role.sql.review_tables.is_empty()
        || !role.review_commands.is_empty();
    if holds {
        words.push(format!(
            "a held {} waits up to {} for {} of {} (never its sender)",
            if r.kind == ResourceKind::Ssh {
                "command"
            } else {
                "statement"
            },
            policy::format_duration(role.review.wait),
            policy::review_approvals(role),
            role.approver_groups
                .join(if role.all_groups { " and " } else { " or " })
        ));
    }
    words
}

fn grants_by_kind(config: &Config, r: &ResourceConfig, role: &RoleConfig) -> Vec<String> {
    match r.kind {
        ResourceKind::Ssh => {
            let mut words = vec![format!("SSH as {}", role.principals.join(", "))];
            if !role.blocked_commands.is_empty() {
                words.push(format!(
                    "exec commands refused: {}",
                    role.blocked_commands.join(", ")
                ));
            }
            if !role.review_commands.is_empty() {
                words.push(format!(
                    "exec commands held for review (run once approved): {}",
                    role.review_commands.join(", ")
                ));
            }
            words
        }
        ResourceKind::Postgres => {
            let mut words = vec![format!("database roles: {}", role.db_roles.join(", "))];
            if config.db_access(r) == DbAccess::Relay {
                words.push("only through the relay; every statement judged and recorded".into());
                words.extend(policy::sql::in_words(&role.sql));
            } else {
                words.push(
                    "direct: a password is handed out; statements are neither judged nor recorded"
                        .into(),
                );
            }
            words
        }
    }
}
