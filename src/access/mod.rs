//! Access requests, approvals and grants: the state machine and its transactions.
//!
//! Every transition is one conditional UPDATE plus its audit event in one write
//! transaction; a transition that loses a race changes nothing and reports a conflict.
//! The rules themselves live in `policy`; this module applies them to stored state,
//! re-reading the actor's groups inside the transaction so a membership change takes
//! effect at once.

pub mod ssh;

use chrono::Duration;
use serde::Serialize;
use serde_json::json;

use crate::audit::{self, NewEvent};
use crate::config::{ResourceConfig, RoleConfig};
use crate::error::{Error, Result};
use crate::notify;
use crate::policy::{self, Actor, CountedApproval, GrantStatus, RequestInput, RequestStatus};
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
    /// Approvers who approved, counted once each.
    pub fn approval_count(&self) -> usize {
        self.approvals
            .iter()
            .filter(|a| a.decision == Decision::Approve)
            .map(|a| a.approver_id.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    }

    pub fn decided_by(&self, user_id: &str) -> bool {
        self.approvals.iter().any(|a| a.approver_id == user_id)
    }
}

/// Re-reads the actor inside the transaction: groups may have changed since the HTTP
/// request was authenticated, and decisions use membership as of now.
async fn current_actor(state: &AppState, conn: &mut Conn, user_id: &str) -> Result<Actor> {
    let actor = store::load_actor(conn, user_id, &state.config.auth.admin_groups)
        .await?
        .ok_or(Error::Unauthenticated)?;
    // Groups from an identity provider are only as fresh as the last sign-in. Past
    // their max age they are not trusted to act (an API token would otherwise keep a
    // removed approver's rights). Demo users' groups come from config at start.
    if actor.issuer != "dev"
        && let Some(synced) = actor.groups_synced_at
        && state.now_ms() - synced > state.config.groups_max_age().as_millis() as i64
    {
        Metrics::inc(&state.metrics.refusals);
        return Err(Error::forbidden(
            "your group membership was last confirmed too long ago: sign in to twokey again in the browser",
        ));
    }
    Ok(actor)
}

fn role_of<'a>(state: &'a AppState, req: &RequestRow) -> Option<&'a RoleConfig> {
    state.config.role(&req.resource, &req.role).map(|(_, r)| r)
}

async fn load_view(state: &AppState, conn: &mut Conn, req: RequestRow) -> Result<RequestView> {
    let approvals = store::approvals_for(conn, &req.id).await?;
    let grant = store::grant_for_request(conn, &req.id).await?;
    let role = role_of(state, &req);
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
    let Some(resource) = state.config.resource(&input.resource) else {
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
    let ttl = Duration::from_std(state.config.pending_ttl(role))
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
    if !policy::may_view(actor, &req.requester_id, role_of(state, &req)) {
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
    for r in &state.config.resources {
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
        if policy::may_view(actor, &req.requester_id, role_of(state, &req)) {
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
            .is_some_and(|r| policy::may_decide(actor, &v.request.requester_id, r).is_ok())
    })
    .collect())
}

pub use crate::policy::Decision;

/// Records an approval or a denial; on the approval that meets the role's rule, the
/// request becomes a grant in the same transaction.
pub async fn decide(
    state: &AppState,
    actor: &Actor,
    id: &str,
    decision: Decision,
    comment: Option<&str>,
    channel: Channel,
) -> Result<RequestView> {
    decide_inner(state, actor, id, decision, comment, channel, None).await
}

/// A decision confirmed from an emailed link: the link's token is used up in the same
/// transaction, so it works once and only for its approver, request and action.
pub async fn decide_with_link(
    state: &AppState,
    actor: &Actor,
    id: &str,
    decision: Decision,
    comment: Option<&str>,
    token_hash: &str,
) -> Result<RequestView> {
    decide_inner(
        state,
        actor,
        id,
        decision,
        comment,
        Channel::Email,
        Some(token_hash),
    )
    .await
}

async fn decide_inner(
    state: &AppState,
    actor: &Actor,
    id: &str,
    decision: Decision,
    comment: Option<&str>,
    channel: Channel,
    link: Option<&str>,
) -> Result<RequestView> {
    let comment = policy::check_comment(comment).map_err(|e| Error::Invalid(vec![e]))?;
    let now = state.now_ms();
    let mut tx = store::begin_write(&state.db).await?;
    let req = store::get_request(&mut tx, id)
        .await?
        .ok_or(Error::NotFound("request"))?;
    let actor = current_actor(state, &mut tx, &actor.user_id).await?;
    let role = role_of(state, &req);
    if !policy::may_view(&actor, &req.requester_id, role) {
        return refuse(state, Error::forbidden("you may not see this request"));
    }
    let Some(role) = role else {
        return refuse(
            state,
            Error::conflict("this role is no longer in the policy"),
        );
    };
    if let Err(why) = policy::may_decide(&actor, &req.requester_id, role) {
        return refuse(state, Error::forbidden(why.message()));
    }
    if req.status != RequestStatus::Pending {
        return refuse(
            state,
            Error::conflict(format!("this request is already {}", req.status)),
        );
    }
    if req.expires_at <= now {
        return refuse(state, Error::conflict("this request has expired"));
    }
    let groups = policy::counted_groups(&actor, role);
    let verb = decision.as_str();
    if let Some(hash) = link
        && !store::consume_action_token(&mut tx, hash, id, &actor.user_id, verb, now).await?
    {
        return refuse(
            state,
            Error::conflict("this link has already been used or has expired"),
        );
    }
    let recorded = store::insert_approval(
        &mut tx,
        &store::NewApproval {
            request_id: id,
            approver_id: &actor.user_id,
            decision,
            comment: comment.as_deref(),
            channel: channel.as_str(),
            approver_groups: &groups,
            now,
        },
    )
    .await?;
    if !recorded {
        return refuse(
            state,
            Error::conflict("you have already decided on this request"),
        );
    }
    let details = json!({
        "approver_id": actor.user_id,
        "by": actor.identity(),
        "channel": channel.as_str(),
        "comment": comment,
        "groups": groups,
    });
    match decision {
        Decision::Deny => {
            if !store::decide_request(&mut tx, id, RequestStatus::Denied, now).await? {
                return refuse(state, Error::conflict("this request is no longer pending"));
            }
            audit::append(
                &mut tx,
                now,
                &NewEvent {
                    actor: &actor.email,
                    action: "request.denied",
                    subject: id,
                    details,
                },
            )
            .await?;
            notify::enqueue_for(state, &mut tx, &req, "denied", now).await?;
            Metrics::inc(&state.metrics.denials);
        }
        Decision::Approve => {
            audit::append(
                &mut tx,
                now,
                &NewEvent {
                    actor: &actor.email,
                    action: "request.approval",
                    subject: id,
                    details,
                },
            )
            .await?;
            Metrics::inc(&state.metrics.approvals);
            let approvals = store::approvals_for(&mut tx, id).await?;
            let group_lists: Vec<Vec<String>> = approvals.iter().map(ApprovalRow::groups).collect();
            let counted: Vec<CountedApproval<'_>> = approvals
                .iter()
                .zip(&group_lists)
                .filter(|(a, _)| a.decision == Decision::Approve)
                .map(|(a, g)| CountedApproval {
                    approver_id: &a.approver_id,
                    groups: g,
                })
                .collect();
            if policy::rule_met(role, &counted) {
                // The policy and the requester's groups may have changed since filing:
                // grant only what could be requested now.
                let requester =
                    store::load_actor(&mut tx, &req.requester_id, &state.config.auth.admin_groups)
                        .await?;
                if !requester
                    .as_ref()
                    .is_some_and(|r| policy::may_request(r, role))
                {
                    return refuse(
                        state,
                        Error::conflict(
                            "the requester may no longer request this role; nothing was granted",
                        ),
                    );
                }
                if req.duration_secs as u64 > role.max_duration().as_secs() {
                    return refuse(
                        state,
                        Error::conflict(
                            "the requested duration is now longer than the role allows; nothing was granted",
                        ),
                    );
                }
                if !store::decide_request(&mut tx, id, RequestStatus::Approved, now).await? {
                    return refuse(state, Error::conflict("this request is no longer pending"));
                }
                let ends = now + req.duration_secs * 1000;
                let grant_id = store::insert_grant(&mut tx, &req, now, ends).await?;
                let approvers: Vec<&str> = approvals
                    .iter()
                    .filter(|a| a.decision == Decision::Approve)
                    .map(|a| a.approver_email.as_str())
                    .collect();
                audit::append(
                    &mut tx,
                    now,
                    &NewEvent {
                        actor: &actor.email,
                        action: "request.approved",
                        subject: id,
                        details: json!({ "approvers": approvers, "grant_id": grant_id }),
                    },
                )
                .await?;
                audit::append(
                    &mut tx,
                    now,
                    &NewEvent {
                        actor: "system",
                        action: "grant.started",
                        subject: &grant_id,
                        details: json!({
                            "request_id": id,
                            "user": req.requester_email,
                            "resource": req.resource,
                            "role": req.role,
                            "starts_at": now,
                            "ends_at": ends,
                        }),
                    },
                )
                .await?;
                notify::enqueue_for(state, &mut tx, &req, "approved", now).await?;
                Metrics::inc(&state.metrics.grants_started);
            }
        }
    }
    let req = store::get_request(&mut tx, id)
        .await?
        .ok_or(Error::NotFound("request"))?;
    let view = load_view(state, &mut tx, req).await?;
    tx.commit().await?;
    tracing::info!(request = %id, approver = %actor.email, decision = verb, status = %view.request.status, "decision recorded");
    Ok(view)
}

/// The requester withdraws a pending request.
pub async fn cancel(
    state: &AppState,
    actor: &Actor,
    id: &str,
    comment: Option<&str>,
) -> Result<RequestView> {
    let comment = policy::check_comment(comment).map_err(|e| Error::Invalid(vec![e]))?;
    let now = state.now_ms();
    let mut tx = store::begin_write(&state.db).await?;
    let req = store::get_request(&mut tx, id)
        .await?
        .ok_or(Error::NotFound("request"))?;
    if req.requester_id != actor.user_id {
        return refuse(
            state,
            Error::forbidden("only the requester may cancel a request"),
        );
    }
    if !store::decide_request(&mut tx, id, RequestStatus::Cancelled, now).await? {
        let status = if req.status == RequestStatus::Pending {
            RequestStatus::Expired
        } else {
            req.status
        };
        return refuse(
            state,
            Error::conflict(format!("this request is {status}, not pending")),
        );
    }
    audit::append(
        &mut tx,
        now,
        &NewEvent {
            actor: &actor.email,
            action: "request.cancelled",
            subject: id,
            details: json!({ "comment": comment, "by": actor.identity() }),
        },
    )
    .await?;
    notify::enqueue_for(state, &mut tx, &req, "cancelled", now).await?;
    let req = store::get_request(&mut tx, id)
        .await?
        .ok_or(Error::NotFound("request"))?;
    let view = load_view(state, &mut tx, req).await?;
    tx.commit().await?;
    Metrics::inc(&state.metrics.cancellations);
    Ok(view)
}

/// Ends a live grant early. Its approvers, admins, and the holder may.
pub async fn revoke(
    state: &AppState,
    actor: &Actor,
    id: &str,
    comment: Option<&str>,
) -> Result<RequestView> {
    let comment = policy::check_comment(comment).map_err(|e| Error::Invalid(vec![e]))?;
    let now = state.now_ms();
    let mut tx = store::begin_write(&state.db).await?;
    let req = store::get_request(&mut tx, id)
        .await?
        .ok_or(Error::NotFound("request"))?;
    let actor = current_actor(state, &mut tx, &actor.user_id).await?;
    let role = role_of(state, &req);
    if !policy::may_view(&actor, &req.requester_id, role) {
        return refuse(state, Error::forbidden("you may not see this request"));
    }
    if !policy::may_revoke(&actor, &req.requester_id, role) {
        return refuse(
            state,
            Error::forbidden("only an approver, an admin or the holder may revoke this grant"),
        );
    }
    let Some(grant) = store::grant_for_request(&mut tx, id).await? else {
        return refuse(
            state,
            Error::conflict(format!("this request is {} and has no grant", req.status)),
        );
    };
    let by = Revoker {
        user_id: Some(&actor.user_id),
        email: &actor.email,
        identity: actor.identity(),
        comment: comment.as_deref(),
        reason: None,
    };
    if !end_early(state, &mut tx, &req, &grant.id, &by, now).await? {
        return refuse(state, Error::conflict("this grant has already ended"));
    }
    let view = load_view(state, &mut tx, req).await?;
    tx.commit().await?;
    // Its database login goes now, not at the next periodic pass.
    state.reconcile_now.notify_one();
    Metrics::inc(&state.metrics.grants_revoked);
    tracing::info!(request = %id, grant = %grant.id, by = %actor.email, "grant revoked");
    Ok(view)
}

/// Who ends a grant early, and why.
struct Revoker<'a> {
    /// The person, if one did (`None`: twokey itself, e.g. at a sign-in).
    user_id: Option<&'a str>,
    /// The audit event's actor.
    email: &'a str,
    identity: serde_json::Value,
    comment: Option<&'a str>,
    /// Why twokey ended it on its own (recorded in the audit event).
    reason: Option<&'a str>,
}

/// The one revocation step, in the caller's transaction: the conditional UPDATE, its
/// audit event and the holder's notice. False if the grant was no longer live. The
/// caller wakes the reconciler after commit; the KRL and the relay read the grant row.
async fn end_early(
    state: &AppState,
    conn: &mut Conn,
    req: &RequestRow,
    grant_id: &str,
    by: &Revoker<'_>,
    now: i64,
) -> Result<bool> {
    let comment = by.comment.or(by.reason);
    if !store::end_grant(
        conn,
        grant_id,
        GrantStatus::Revoked,
        now,
        by.user_id,
        comment,
    )
    .await?
    {
        return Ok(false);
    }
    let mut details = json!({
        "request_id": req.id,
        "revoked_by_id": by.user_id,
        "by": by.identity,
        "comment": by.comment,
    });
    if let Some(reason) = by.reason {
        details["reason"] = json!(reason);
    }
    audit::append(
        conn,
        now,
        &NewEvent {
            actor: by.email,
            action: "grant.revoked",
            subject: grant_id,
            details,
        },
    )
    .await?;
    notify::enqueue_for(state, conn, req, "revoked", now).await?;
    Ok(true)
}

/// Why a forced re-sign-in revokes grants.
pub const FORCED_OUT: &str = "user forced to sign in again";
/// Why a sign-in whose groups no longer allow a role revokes its grants.
pub const NO_LONGER_ELIGIBLE: &str = "the user's groups no longer allow this role";

/// Revokes every live grant of `user_id` (an admin forced them to sign in again), each
/// with its own conditional UPDATE and audit event, in the caller's transaction. The
/// caller commits and then calls [`after_revocations`]. Returns how many were revoked.
pub async fn revoke_all_of_user(
    state: &AppState,
    conn: &mut Conn,
    admin: &Actor,
    user_id: &str,
    now: i64,
) -> Result<usize> {
    let by = Revoker {
        user_id: Some(&admin.user_id),
        email: &admin.email,
        identity: admin.identity(),
        comment: None,
        reason: Some(FORCED_OUT),
    };
    revoke_where(state, conn, user_id, &by, now, |_| true).await
}

/// Revokes the live grants of `user_id` whose role their groups (as just stored) no
/// longer let them request, in the caller's transaction. Returns how many.
pub async fn revoke_ineligible(
    state: &AppState,
    conn: &mut Conn,
    user_id: &str,
    now: i64,
) -> Result<usize> {
    let Some(holder) = store::load_actor(conn, user_id, &state.config.auth.admin_groups).await?
    else {
        return Ok(0);
    };
    let by = Revoker {
        user_id: None,
        email: "system",
        identity: json!({ "system": "sign-in", "user": holder.identity() }),
        comment: None,
        reason: Some(NO_LONGER_ELIGIBLE),
    };
    revoke_where(state, conn, user_id, &by, now, |g| {
        let role = state.config.role(&g.resource, &g.role).map(|(_, r)| r);
        !policy::may_hold(&holder.groups, role)
    })
    .await
}

async fn revoke_where(
    state: &AppState,
    conn: &mut Conn,
    user_id: &str,
    by: &Revoker<'_>,
    now: i64,
    revoke: impl Fn(&GrantRow) -> bool,
) -> Result<usize> {
    let mut n = 0;
    for grant in store::live_grants_of(conn, user_id, now).await? {
        if !revoke(&grant) {
            continue;
        }
        let req = store::get_request(conn, &grant.request_id)
            .await?
            .ok_or(Error::NotFound("request"))?;
        if end_early(state, conn, &req, &grant.id, by, now).await? {
            n += 1;
            tracing::info!(grant = %grant.id, user = %grant.user_email, reason = by.reason.unwrap_or_default(), "grant revoked");
        }
    }
    Ok(n)
}

/// After a transaction that revoked `n` grants committed: their database logins go now,
/// not at the next periodic pass.
pub fn after_revocations(state: &AppState, n: usize) {
    if n > 0 {
        state.reconcile_now.notify_one();
    }
    for _ in 0..n {
        Metrics::inc(&state.metrics.grants_revoked);
    }
}

/// Which of these grants are rightfully held right now: active, inside their window,
/// started after their holder was last forced to sign in again, and still allowed by
/// the policy to the holder's current groups. One query, however many ids. The relay
/// asks this rather than reading the grant row alone, so a holder who lost the right
/// loses the session even if the revocation write never happened.
pub async fn rightful_grants_among(
    state: &AppState,
    ids: &[String],
) -> Result<std::collections::HashSet<String>> {
    Ok(store::grant_holdings_among(&state.db, ids, state.now_ms())
        .await?
        .into_iter()
        .filter(|h| {
            let role = state.config.role(&h.resource, &h.role).map(|(_, r)| r);
            policy::may_hold(&h.groups, role)
        })
        .map(|h| h.grant_id)
        .collect())
}

/// What one sweep changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub expired_requests: usize,
    pub ended_grants: usize,
}

/// Expires pending requests past their TTL and ends grants past their end, each with
/// its audit event, in one transaction.
pub async fn sweep(state: &AppState) -> Result<Swept> {
    let now = state.now_ms();
    let mut swept = Swept::default();
    {
        // Cheap read first so an idle server does not take the write lock every tick.
        let mut conn = state.db.acquire().await?;
        if store::overdue_requests(&mut conn, now).await?.is_empty()
            && store::overdue_grants(&mut conn, now).await?.is_empty()
        {
            return Ok(swept);
        }
    }
    let mut tx = store::begin_write(&state.db).await?;
    for req in store::overdue_requests(&mut tx, now).await? {
        if store::decide_request(&mut tx, &req.id, RequestStatus::Expired, now).await? {
            audit::append(
                &mut tx,
                now,
                &NewEvent {
                    actor: "system",
                    action: "request.expired",
                    subject: &req.id,
                    details: json!({ "expires_at": req.expires_at }),
                },
            )
            .await?;
            notify::enqueue_for(state, &mut tx, &req, "expired", now).await?;
            swept.expired_requests += 1;
        }
    }
    for grant in store::overdue_grants(&mut tx, now).await? {
        if store::end_grant(&mut tx, &grant.id, GrantStatus::Ended, now, None, None).await? {
            audit::append(
                &mut tx,
                now,
                &NewEvent {
                    actor: "system",
                    action: "grant.ended",
                    subject: &grant.id,
                    details: json!({ "request_id": grant.request_id, "ends_at": grant.ends_at }),
                },
            )
            .await?;
            swept.ended_grants += 1;
        }
    }
    tx.commit().await?;
    if swept.ended_grants > 0 {
        state.reconcile_now.notify_one();
    }
    for _ in 0..swept.expired_requests {
        Metrics::inc(&state.metrics.expirations);
    }
    for _ in 0..swept.ended_grants {
        Metrics::inc(&state.metrics.grants_ended);
    }
    Ok(swept)
}

/// The checks every credential shares: the request exists and the actor may see it,
/// the actor is its holder (an approver or admin who can see it must still not log in
/// on someone else's grant), the role is still in the policy and still lets them ask
/// for it, and the grant is live at `now`. Refusals are counted.
pub async fn holders_live_grant<'a>(
    state: &'a AppState,
    conn: &mut Conn,
    actor: &Actor,
    request_id: &str,
    now: i64,
) -> Result<HeldGrant<'a>> {
    let req = store::get_request(conn, request_id)
        .await?
        .ok_or(Error::NotFound("request"))?;
    let actor = current_actor(state, conn, &actor.user_id).await?;
    let found = state.config.role(&req.resource, &req.role);
    if !policy::may_view(&actor, &req.requester_id, found.map(|(_, r)| r)) {
        return refuse(state, Error::forbidden("you may not see this request"));
    }
    if req.requester_id != actor.user_id {
        return refuse(
            state,
            Error::forbidden("only the grant's holder may get credentials for it"),
        );
    }
    let Some((resource, role)) = found else {
        return refuse(
            state,
            Error::conflict("this role is no longer in the policy"),
        );
    };
    if !policy::may_request(&actor, role) {
        return refuse(
            state,
            Error::forbidden("you may no longer request this role, so no new credentials"),
        );
    }
    let Some(grant) = store::grant_for_request(conn, request_id).await? else {
        let status = if req.status == RequestStatus::Pending && req.expires_at <= now {
            RequestStatus::Expired
        } else {
            req.status
        };
        return refuse(
            state,
            Error::conflict(match status {
                RequestStatus::Pending => {
                    "this request is still pending: it needs approval first".into()
                }
                s => format!("this request is {s} and has no grant"),
            }),
        );
    };
    if !grant.is_live(now) {
        return refuse(
            state,
            Error::conflict(format!(
                "this grant has {}",
                if grant.status == GrantStatus::Revoked {
                    "been revoked"
                } else {
                    "ended"
                }
            )),
        );
    }
    if grant.starts_at > now {
        return refuse(state, Error::conflict("this grant has not started yet"));
    }
    Ok(HeldGrant {
        actor,
        grant,
        resource,
        role,
    })
}

/// A live grant, checked for its holder: the holder as they are now (groups refreshed),
/// and the grant's resource and role from the policy.
pub struct HeldGrant<'a> {
    pub actor: Actor,
    pub grant: GrantRow,
    pub resource: &'a ResourceConfig,
    pub role: &'a RoleConfig,
}

/// Live grants the actor may see (their own; all for approvers of the role and admins).
pub async fn live_grants(state: &AppState, actor: &Actor) -> Result<Vec<GrantRow>> {
    Ok(store::live_grants(&state.db, state.now_ms())
        .await?
        .into_iter()
        .filter(|g| {
            let role = state.config.role(&g.resource, &g.role).map(|(_, r)| r);
            policy::may_view(actor, &g.user_id, role)
        })
        .collect())
}
