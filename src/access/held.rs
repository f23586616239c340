//! Held actions: one statement or command a relay holds until other people approve
//! that exact action. Filed by the relay; decided in the web app (or by the API) by
//! the role's approvers, as requests are: never by the one who sent it, admins
//! included; by [`policy::review_approvals`] distinct people; each decision one
//! conditional UPDATE with its audit event. The relay then claims it (`approved →
//! ran`) just before it sends it on, so it runs at most once; a wait that runs out, a
//! denial or a session that ends first refuses it for good.

use serde::Serialize;
use serde_json::json;

use super::{Channel, current_actor, refuse};
use crate::audit::{self, NewEvent};
use crate::config::RoleConfig;
use crate::error::{Error, Result};
use crate::notify;
use crate::policy::{self, Actor, Decision, HeldStatus};
use crate::state::{AppState, Metrics};
use crate::store::{self, ApprovalRow, Conn, HeldParse, HeldRow};

/// A held action with everything needed to show or decide on it.
#[derive(Debug, Clone, Serialize)]
pub struct HeldView {
    #[serde(flatten)]
    pub held: HeldRow,
    pub decisions: Vec<ApprovalRow>,
    pub approver_groups: Vec<String>,
    pub all_groups: bool,
}

impl HeldView {
    /// Approvers who approved, counted once each.
    pub fn approval_count(&self) -> usize {
        super::approval_count(&self.decisions, &self.approver_groups)
    }

    pub fn decided_by(&self, user_id: &str) -> bool {
        super::decided_by(&self.decisions, user_id)
    }

    /// Who denied it, and why.
    pub fn denial(&self) -> Option<&ApprovalRow> {
        self.decisions.iter().find(|a| a.decision == Decision::Deny)
    }
}

/// What a relay holds: the session and grant it came in on, and the action.
pub struct Filing<'a> {
    pub session_id: &'a str,
    pub grant: &'a store::GrantRow,
    /// `"postgres"` or `"ssh"`.
    pub protocol: &'a str,
    /// The statement's text, or the command line.
    pub action: &'a str,
    pub params: &'a [Option<String>],
    /// SHA-256 (hex) of the exact bytes the relay will send on if it is approved.
    pub action_sha256: &'a str,
    pub parse: &'a HeldParse,
    /// Which rule held it, in words.
    pub why: &'a str,
}

fn role_of(state: &AppState, h: &HeldRow) -> Option<RoleConfig> {
    state
        .config()
        .role(&h.resource, &h.role)
        .map(|(_, r)| r.clone())
}

async fn load_view(state: &AppState, conn: &mut Conn, mut held: HeldRow) -> Result<HeldView> {
    let decisions = store::held_decisions_for(conn, &held.id).await?;
    let role = role_of(state, &held);
    let role = role.as_ref();
    // Show what holds now, even before its relay or the sweeper marks it.
    if held.status == HeldStatus::Pending && held.expires_at <= state.now_ms() {
        held.status = HeldStatus::Expired;
    }
    Ok(HeldView {
        approver_groups: role.map(|r| r.approver_groups.clone()).unwrap_or_default(),
        all_groups: role.is_some_and(|r| r.all_groups),
        held,
        decisions,
    })
}

/// Files a held action for the role's approvers, with its audit event and their
/// notifications, in one transaction. The text is not audited (it may hold what must
/// not be logged), only its hash, parse and why.
pub async fn file(state: &AppState, f: &Filing<'_>) -> Result<HeldRow> {
    let config = state.config();
    let Some((_, role)) = config.role(&f.grant.resource, &f.grant.role) else {
        return Err(Error::conflict("this role is no longer in the policy"));
    };
    let now = state.now_ms();
    let wait = role.review.wait.as_millis() as i64;
    let required = policy::review_approvals(role);
    let mut tx = store::begin_write(&state.db).await?;
    let id = store::insert_held(
        &mut tx,
        &store::NewHeld {
            session_id: f.session_id,
            grant_id: &f.grant.id,
            requester_id: &f.grant.user_id,
            resource: &f.grant.resource,
            role: &f.grant.role,
            protocol: f.protocol,
            action: f.action,
            params: f.params,
            action_sha256: f.action_sha256,
            parse: f.parse,
            why: f.why,
            required_approvals: required,
            created_at: now,
            expires_at: now + wait,
        },
    )
    .await?;
    audit::append(
        &mut tx,
        now,
        &NewEvent {
            actor: &f.grant.user_email,
            action: "held.filed",
            subject: &id,
            details: json!({
                "session_id": f.session_id,
                "grant_id": f.grant.id,
                "resource": f.grant.resource,
                "role": f.grant.role,
                "protocol": f.protocol,
                "why": f.why,
                "kinds": f.parse.kinds,
                "tables": f.parse.tables,
                "parameters": f.params.len(),
                "action_sha256": f.action_sha256,
                "required_approvals": required,
                "expires_at": now + wait,
            }),
        },
    )
    .await?;
    let held = store::get_held(&mut tx, &id)
        .await?
        .ok_or(Error::NotFound("held action"))?;
    notify::enqueue_held(state, &mut tx, &held, role, now).await?;
    tx.commit().await?;
    tracing::info!(held = %id, session = %f.session_id, user = %f.grant.user_email, "action held for review");
    Ok(held)
}

/// A held action the actor may see: its sender, the role's approvers, admins.
pub async fn view(state: &AppState, actor: &Actor, id: &str) -> Result<HeldView> {
    let mut conn = state.db.acquire().await?;
    let held = store::get_held(&mut conn, id)
        .await?
        .ok_or(Error::NotFound("held action"))?;
    if !policy::may_view(actor, &held.requester_id, role_of(state, &held).as_ref()) {
        return refuse(state, Error::forbidden("you may not see this held action"));
    }
    load_view(state, &mut conn, held).await
}

/// Held actions the actor may see, newest first (at most 200), optionally by status.
pub async fn list(
    state: &AppState,
    actor: &Actor,
    status: Option<HeldStatus>,
) -> Result<Vec<HeldView>> {
    let keys: Vec<String> = if actor.is_admin {
        Vec::new()
    } else {
        state
            .config()
            .resources
            .iter()
            .flat_map(|r| {
                r.roles
                    .iter()
                    .filter(|role| policy::may_view(actor, "", Some(role)))
                    .map(move |role| format!("{}/{}", r.name, role.name))
            })
            .collect()
    };
    let visible = (!actor.is_admin).then_some((actor.user_id.as_str(), keys.as_slice()));
    let rows = store::list_held(&state.db, status, visible, 200).await?;
    let mut conn = state.db.acquire().await?;
    let mut out = Vec::with_capacity(rows.len());
    for h in rows {
        // The SQL filter and the policy must agree; the policy has the last word.
        if policy::may_view(actor, &h.requester_id, role_of(state, &h).as_ref()) {
            out.push(load_view(state, &mut conn, h).await?);
        }
    }
    Ok(out)
}

/// Pending held actions this actor may decide and has not yet.
pub async fn queue(state: &AppState, actor: &Actor) -> Result<Vec<HeldView>> {
    Ok(list(state, actor, Some(HeldStatus::Pending))
        .await?
        .into_iter()
        .filter(|v| v.held.status == HeldStatus::Pending && !v.decided_by(&actor.user_id))
        .filter(|v| {
            role_of(state, &v.held)
                .as_ref()
                .is_some_and(|r| policy::may_decide(actor, &v.held.requester_id, r).is_ok())
        })
        .collect())
}

/// Records an approval or a denial of a held action. A denial refuses it at once; the
/// approval that meets the role's rule approves it, and its relay runs it next.
pub async fn decide(
    state: &AppState,
    actor: &Actor,
    id: &str,
    decision: Decision,
    comment: Option<&str>,
    channel: Channel,
) -> Result<HeldView> {
    let comment = policy::check_comment(comment).map_err(|e| Error::Invalid(vec![e]))?;
    let now = state.now_ms();
    let mut tx = store::begin_write(&state.db).await?;
    let held = store::get_held(&mut tx, id)
        .await?
        .ok_or(Error::NotFound("held action"))?;
    let actor = current_actor(state, &mut tx, &actor.user_id).await?;
    let role = role_of(state, &held);
    let role = role.as_ref();
    if !policy::may_view(&actor, &held.requester_id, role) {
        return refuse(state, Error::forbidden("you may not see this held action"));
    }
    let Some(role) = role else {
        return refuse(
            state,
            Error::conflict("this role is no longer in the policy"),
        );
    };
    // The same rule as for requests, checked first: the sender never decides their
    // own action, admins included.
    if let Err(why) = policy::may_decide(&actor, &held.requester_id, role) {
        return refuse(state, Error::forbidden(held_words(why.message())));
    }
    if held.status != HeldStatus::Pending {
        return refuse(
            state,
            Error::conflict(format!("this held action is already {}", held.status)),
        );
    }
    if held.expires_at <= now {
        return refuse(
            state,
            Error::conflict("this held action waited too long and was refused"),
        );
    }
    let groups = policy::counted_groups(&actor, role);
    let recorded = store::insert_held_decision(
        &mut tx,
        &store::NewHeldDecision {
            held_id: id,
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
            Error::conflict("you have already decided on this held action"),
        );
    }
    let details = json!({
        "approver_id": actor.user_id,
        "by": actor.identity(),
        "channel": channel.as_str(),
        "comment": comment,
        "groups": groups,
        "session_id": held.session_id,
    });
    let event = |action| NewEvent {
        actor: &actor.email,
        action,
        subject: id,
        details: details.clone(),
    };
    match decision {
        Decision::Deny => {
            if !store::move_held(&mut tx, id, HeldStatus::Pending, HeldStatus::Denied, now).await? {
                return refuse(
                    state,
                    Error::conflict("this held action is no longer pending"),
                );
            }
            audit::append(&mut tx, now, &event("held.denied")).await?;
            Metrics::inc(&state.metrics.denials);
        }
        Decision::Approve => {
            audit::append(&mut tx, now, &event("held.approval")).await?;
            Metrics::inc(&state.metrics.approvals);
            let decisions = store::held_decisions_for(&mut tx, id).await?;
            if super::approvals_meet(&decisions, |c| policy::held_rule_met(role, c)) {
                if !store::move_held(&mut tx, id, HeldStatus::Pending, HeldStatus::Approved, now)
                    .await?
                {
                    return refuse(
                        state,
                        Error::conflict("this held action is no longer pending"),
                    );
                }
                let approvers: Vec<&str> = decisions
                    .iter()
                    .filter(|a| a.decision == Decision::Approve)
                    .map(|a| a.approver_email.as_str())
                    .collect();
                audit::append(
                    &mut tx,
                    now,
                    &NewEvent {
                        actor: &actor.email,
                        action: "held.approved",
                        subject: id,
                        details: json!({
                            "approvers": approvers,
                            "session_id": held.session_id,
                            "action_sha256": held.action_sha256,
                        }),
                    },
                )
                .await?;
            }
        }
    }
    let held = store::get_held(&mut tx, id)
        .await?
        .ok_or(Error::NotFound("held action"))?;
    let view = load_view(state, &mut tx, held).await?;
    tx.commit().await?;
    tracing::info!(held = %id, approver = %actor.email, decision = decision.as_str(), status = %view.held.status, "held action decision recorded");
    Ok(view)
}

/// The request-worded refusal, said of a held action.
fn held_words(message: &str) -> String {
    message
        .replace("your own request", "your own held action")
        .replace("this request", "this held action")
}

/// Where a held action stands now, for the relay that waits on it: its status (a
/// pending one past its wait reads as expired) and its decisions.
pub async fn standing(state: &AppState, id: &str) -> Result<(HeldStatus, Vec<ApprovalRow>)> {
    let mut conn = state.db.acquire().await?;
    let held = store::get_held(&mut conn, id)
        .await?
        .ok_or(Error::NotFound("held action"))?;
    let decisions = store::held_decisions_for(&mut conn, id).await?;
    let status = if held.status == HeldStatus::Pending && held.expires_at <= state.now_ms() {
        HeldStatus::Expired
    } else {
        held.status
    };
    Ok((status, decisions))
}

/// Who decided `d`, for the engineer's client: each approver's email, with their
/// comment in brackets, in the order they decided.
pub fn who_decided(decisions: &[ApprovalRow], d: Decision) -> String {
    decisions
        .iter()
        .filter(|a| a.decision == d)
        .map(|a| match &a.comment {
            Some(c) => format!("{} ({c})", a.approver_email),
            None => a.approver_email.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The relay takes an approved action to run it: `approved → ran`, only while its
/// grant is live, with its audit event. False: it must not run.
pub async fn claim_run(state: &AppState, id: &str) -> Result<bool> {
    let now = state.now_ms();
    let mut tx = store::begin_write(&state.db).await?;
    if !store::claim_held_run(&mut tx, id, now).await? {
        return Ok(false);
    }
    let sha = store::get_held(&mut tx, id)
        .await?
        .map(|h| h.action_sha256)
        .unwrap_or_default();
    audit::append(
        &mut tx,
        now,
        &NewEvent {
            actor: "relay",
            action: "held.ran",
            subject: id,
            // Sent on to the target, once; its outcome is in the session's record.
            details: json!({ "action_sha256": sha }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Ends a held action that will not run: `expired` (its wait ran out) or `withdrawn`
/// (its session ended first), from `pending` or, for a withdrawal, `approved`. False
/// when it had already moved on (decided in the meantime).
pub async fn end(state: &AppState, id: &str, to: HeldStatus, why: &str) -> Result<bool> {
    let now = state.now_ms();
    let mut tx = store::begin_write(&state.db).await?;
    let mut moved = store::move_held(&mut tx, id, HeldStatus::Pending, to, now).await?;
    if !moved && to == HeldStatus::Withdrawn {
        moved = store::move_held(&mut tx, id, HeldStatus::Approved, to, now).await?;
    }
    if !moved {
        return Ok(false);
    }
    audit::append(
        &mut tx,
        now,
        &NewEvent {
            actor: "system",
            action: if to == HeldStatus::Expired {
                "held.expired"
            } else {
                "held.withdrawn"
            },
            subject: id,
            details: json!({ "why": why }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Withdraws what a session that ended still held: its pending or approved, unrun
/// held actions. How many.
pub async fn withdraw_session(state: &AppState, session_id: &str, reason: &str) -> Result<usize> {
    let ids = {
        let mut conn = state.db.acquire().await?;
        store::unrun_held_of_session(&mut conn, session_id).await?
    };
    let mut n = 0;
    for id in ids {
        if end(
            state,
            &id,
            HeldStatus::Withdrawn,
            &format!("its session ended: {reason}"),
        )
        .await?
        {
            n += 1;
        }
    }
    Ok(n)
}

/// The sweeper's pass: held actions whose relay is gone (crashed, restarted) or did
/// not get to mark them, ended as their wait or session did.
pub async fn sweep(state: &AppState) -> Result<usize> {
    let now = state.now_ms();
    let stale = {
        let mut conn = state.db.acquire().await?;
        store::stale_held(&mut conn, now).await?
    };
    let mut n = 0;
    for h in stale {
        let (to, why) = if h.status == HeldStatus::Pending && h.expires_at <= now {
            (
                HeldStatus::Expired,
                "not decided within the role's review wait",
            )
        } else {
            (HeldStatus::Withdrawn, "its session ended before it ran")
        };
        if end(state, &h.id, to, why).await? {
            n += 1;
        }
    }
    Ok(n)
}
