//! Access requests, approvals and grants: the state machine and its transactions.
//!
//! Every transition is one conditional UPDATE plus its audit event in one write
//! transaction; a transition that loses a race changes nothing and reports a conflict.
//! The rules themselves live in `policy`; this module applies them to stored state,
//! re-reading the actor's groups inside the transaction so a membership change takes
//! effect at once.
//!
//! This file reads requests (one, a list, an approver's queue); [`decide`] files and
//! decides them (approve, deny, cancel); [`grants`] ends grants (revoke, sweep,
//! force-out) and answers which are live; [`ssh`] signs a grant's certificate.

mod decide;
mod grants;
pub mod held;
pub mod ssh;

pub use decide::*;
pub use grants::*;

use chrono::Duration;
use serde::Serialize;
use serde_json::json;

use crate::audit::{self, NewEvent};
use crate::config::RoleConfig;
use crate::error::{Error, Result};
use crate::notify;
use crate::policy::{self, Actor, GrantStatus, RequestInput, RequestStatus};
use crate::state::{AppState, Metrics};
use crate::store::{self, ApprovalRow, Conn, GrantRow, RequestRow};

/// How a decision reached twokey.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Web,
    Api,
    Email,
    Slack,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Web => "web",
            Channel::Api => "api",
            Channel::Email => "email",
            Channel::Slack => "slack",
        }
    }
}

/// A request with everything needed to show or decide on it.
#[derive(Debug, Clone, Serialize)]
pub struct RequestView {
    #[serde(flatten)]
    pub request: RequestRow,
    pub required_approvals: u32,
    pub all_groups: bool,
    pub approver_groups: Vec<String>,
    pub approvals: Vec<ApprovalRow>,
    pub grant: Option<GrantRow>,
}

impl RequestView {
    /// Approvers who approved, counted once each, as the rule counts them.
    pub fn approval_count(&self) -> usize {
        approval_count(&self.approvals, &self.approver_groups)
    }

    pub fn decided_by(&self, user_id: &str) -> bool {
        decided_by(&self.approvals, user_id)
    }
}

/// Distinct people among these decisions who approved (of a request or a held action),
/// from a group the role names as an approver group now, as [`policy::rule_met`] counts
/// them.
fn approval_count(decisions: &[ApprovalRow], approver_groups: &[String]) -> usize {
    decisions
        .iter()
        .filter(|a| a.decision == Decision::Approve)
        // (A role no longer in the policy names none: every approval is shown.)
        .filter(|a| {
            approver_groups.is_empty() || a.groups().iter().any(|g| approver_groups.contains(g))
        })
        .map(|a| a.approver_id.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

/// Whether these decisions (of a request or a held action) meet `rule`, given their
/// approvals, each with the approver groups recorded with it.
fn approvals_meet(
    decisions: &[ApprovalRow],
    rule: impl Fn(&[policy::CountedApproval<'_>]) -> bool,
) -> bool {
    let groups: Vec<Vec<String>> = decisions.iter().map(ApprovalRow::groups).collect();
    let counted: Vec<policy::CountedApproval<'_>> = decisions
        .iter()
        .zip(&groups)
        .filter(|(a, _)| a.decision == Decision::Approve)
        .map(|(a, g)| policy::CountedApproval {
            approver_id: &a.approver_id,
            groups: g,
        })
        .collect();
    rule(&counted)
}

/// Whether this person has decided, either way.
fn decided_by(decisions: &[ApprovalRow], user_id: &str) -> bool {
    decisions.iter().any(|a| a.approver_id == user_id)
}

/// Re-reads the actor inside the transaction: groups may have changed since the HTTP
/// request was authenticated, and decisions use membership as of now.
async fn current_actor(state: &AppState, conn: &mut Conn, user_id: &str) -> Result<Actor> {
    let actor = store::load_actor(conn, user_id, &state.config().auth.admin_groups)
        .await?
        .ok_or(Error::Unauthenticated)?;
    // Groups from an identity provider are only as fresh as the last sign-in. Past
    // their max age they are not trusted to act (an API token would otherwise keep a
    // removed approver's rights). Demo users' groups come from config at start.
    if actor.issuer != "dev"
        && let Some(synced) = actor.groups_synced_at
        && state.now_ms() - synced > state.config().groups_max_age().as_millis() as i64
    {
        Metrics::inc(&state.metrics.refusals);
        return Err(Error::forbidden(
            "your group membership was last confirmed too long ago: sign in to twokey again in the browser",
        ));
    }
    Ok(actor)
}

/// The first step of every transition on a request: reads it in `conn` and the actor
/// with their current groups ([`current_actor`]), and refuses (counted) a request the
/// actor may not see, before anything else is said about it.
async fn visible_request(
    state: &AppState,
    conn: &mut Conn,
    actor: &Actor,
    id: &str,
) -> Result<(RequestRow, Actor)> {
    let req = store::get_request(conn, id)
        .await?
        .ok_or(Error::NotFound("request"))?;
    let actor = current_actor(state, conn, &actor.user_id).await?;
    if !policy::may_view(&actor, &req.requester_id, role_of(state, &req).as_ref()) {
        return refuse(state, Error::forbidden("you may not see this request"));
    }
    Ok((req, actor))
}

fn role_of(state: &AppState, req: &RequestRow) -> Option<RoleConfig> {
    state
        .config()
        .role(&req.resource, &req.role)
        .map(|(_, r)| r.clone())
}

async fn load_view(state: &AppState, conn: &mut Conn, req: RequestRow) -> Result<RequestView> {
    let approvals = store::approvals_for(conn, &req.id).await?;
    let grant = store::grant_for_request(conn, &req.id).await?;
    let role = role_of(state, &req);
    let role = role.as_ref();
    let mut view = RequestView {
        required_approvals: role.map_or(0, |r| r.min_approvals),
        all_groups: role.is_some_and(|r| r.all_groups),
        approver_groups: role.map(|r| r.approver_groups.clone()).unwrap_or_default(),
        request: req,
        approvals,
        grant,
    };
    // Show what holds now even if the sweeper has not caught up yet.
    let now = state.now_ms();
    if view.request.status == RequestStatus::Pending && view.request.expires_at <= now {
        view.request.status = RequestStatus::Expired;
    }
    if let Some(g) = view.grant.as_mut()
        && g.status == GrantStatus::Active
        && g.ends_at <= now
    {
        g.status = GrantStatus::Ended;
        g.ended_at = Some(g.ends_at);
    }
    Ok(view)
}

fn refuse<T>(state: &AppState, err: Error) -> Result<T> {
    Metrics::inc(&state.metrics.refusals);
    Err(err)
}

/// Files a new request.
pub async fn create_request(
    state: &AppState,
    actor: &Actor,
    input: &RequestInput,
    channel: Channel,
) -> Result<RequestView> {
    let config = state.config();
    let Some(resource) = config.resource(&input.resource) else {
        return Err(Error::invalid(
            "resource",
            format!("no resource named {:?}", input.resource),
        ));
    };
    let Some(role) = resource.roles.iter().find(|r| r.name == input.role) else {
        return Err(Error::invalid(
            "role",
            format!("{:?} has no role named {:?}", resource.name, input.role),
        ));
    };
    let valid = policy::check_request(input, role).map_err(Error::Invalid)?;
    let now = state.now_ms();
    let mut tx = store::begin_write(&state.db).await?;
    let actor = current_actor(state, &mut tx, &actor.user_id).await?;
    if !policy::may_request(&actor, role) {
        return refuse(
            state,
            Error::forbidden(format!(
                "you may not request {} on {}: it is open to {}",
                role.name,
                resource.name,
                role.requester_groups.join(", ")
            )),
        );
    }
    let ttl = Duration::from_std(state.config().pending_ttl(role))
        .map_err(|e| Error::Internal(format!("pending_ttl of {}: {e}", role.name)))?;
    let id = store::insert_request(
        &mut tx,
        &store::NewRequest {
            requester_id: &actor.user_id,
            resource: &resource.name,
            role: &role.name,
            duration_secs: valid.duration.as_secs() as i64,
            reason: &valid.reason,
            ticket: valid.ticket.as_deref(),
            created_at: now,
            expires_at: now + ttl.num_milliseconds(),
        },
    )
    .await?;
    audit::append(
        &mut tx,
        now,
        &NewEvent {
            actor: &actor.email,
            action: "request.created",
            subject: &id,
            details: json!({
                "requester_id": actor.user_id,
                "by": actor.identity(),
                "resource": resource.name,
                "role": role.name,
                "duration_secs": valid.duration.as_secs(),
                "reason": valid.reason,
                "ticket": valid.ticket,
                "channel": channel.as_str(),
            }),
        },
    )
    .await?;
    let req = store::get_request(&mut tx, &id)
        .await?
        .ok_or(Error::NotFound("request"))?;
    notify::enqueue_for(state, &mut tx, &req, "approval_needed", now).await?;
    let view = load_view(state, &mut tx, req).await?;
    tx.commit().await?;
    Metrics::inc(&state.metrics.requests_created);
    tracing::info!(request = %id, requester = %actor.email, resource = %resource.name, role = %role.name, "request filed");
    Ok(view)
}

/// A request the actor may see.
pub async fn view(state: &AppState, actor: &Actor, id: &str) -> Result<RequestView> {
    let mut conn = state.db.acquire().await?;
    let req = store::get_request(&mut conn, id)
        .await?
        .ok_or(Error::NotFound("request"))?;
    if !policy::may_view(actor, &req.requester_id, role_of(state, &req).as_ref()) {
        return refuse(state, Error::forbidden("you may not see this request"));
    }
    load_view(state, &mut conn, req).await
}

/// Which of the visible requests to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything the actor may see.
    Visible,
    /// Only the actor's own requests.
    Mine,
}

/// The `resource/role` keys this actor approves.
fn approvable_keys(state: &AppState, actor: &Actor) -> Vec<String> {
    let mut keys = Vec::new();
    for r in &state.config().resources {
        for role in &r.roles {
            if policy::may_view(actor, "", Some(role)) {
                keys.push(format!("{}/{}", r.name, role.name));
            }
        }
    }
    keys
}

/// Requests the actor may see, newest first (at most 500), optionally by their status
/// as it holds now.
pub async fn list(
    state: &AppState,
    actor: &Actor,
    scope: Scope,
    status: Option<&str>,
) -> Result<Vec<RequestView>> {
    let status = status
        .map(str::parse::<RequestStatus>)
        .transpose()
        .map_err(|_| {
            Error::invalid(
                "status",
                "must be one of pending, approved, denied, cancelled, expired",
            )
        })?;
    let keys = if actor.is_admin {
        Vec::new()
    } else {
        approvable_keys(state, actor)
    };
    let filter = store::ListFilter {
        status,
        requester: (scope == Scope::Mine).then_some(actor.user_id.as_str()),
        visible_to: (!actor.is_admin).then_some((actor.user_id.as_str(), keys.as_slice())),
        now: state.now_ms(),
        limit: 500,
    };
    let rows = store::list_requests(&state.db, &filter).await?;
    let mut conn = state.db.acquire().await?;
    let mut out = Vec::with_capacity(rows.len());
    for req in rows {
        // The SQL filter and the policy must agree; the policy has the last word.
        if policy::may_view(actor, &req.requester_id, role_of(state, &req).as_ref()) {
            out.push(load_view(state, &mut conn, req).await?);
        }
    }
    Ok(out)
}

/// Pending requests this actor may decide on and has not yet.
pub async fn queue(state: &AppState, actor: &Actor) -> Result<Vec<RequestView>> {
    Ok(list(
        state,
        actor,
        Scope::Visible,
        Some(RequestStatus::Pending.as_str()),
    )
    .await?
    .into_iter()
    .filter(|v| !v.decided_by(&actor.user_id))
    .filter(|v| {
        role_of(state, &v.request)
            .as_ref()
            .is_some_and(|r| policy::may_decide(actor, &v.request.requester_id, r).is_ok())
    })
    .collect())
}
