//! Filing decisions on requests: approve or deny (from any channel) and cancel. The
//! approval that meets the role's rule makes the grant in the same transaction.

use serde_json::json;

use super::{Channel, RequestView, load_view, refuse, role_of, visible_request};
use crate::audit::{self, NewEvent};
use crate::error::{Error, Result};
use crate::notify;
use crate::policy::{self, Actor, RequestStatus};
use crate::state::{AppState, Metrics};
use crate::store;

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
    let (req, actor) = visible_request(state, &mut tx, actor, id).await?;
    let role = role_of(state, &req);
    let role = role.as_ref();
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
            if super::approvals_meet(&approvals, |c| policy::rule_met(role, c)) {
                // The policy and the requester's groups may have changed since filing:
                // grant only what could be requested now.
                let requester = store::load_actor(
                    &mut tx,
                    &req.requester_id,
                    &state.config().auth.admin_groups,
                )
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
