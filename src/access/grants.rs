//! Ending grants and asking which are live: revoke, the sweeper's pass (expired
//! requests, ended grants), forcing a user out, and the live-grant questions the
//! relay and the pages ask. Every end is one conditional UPDATE with its audit event.

use serde_json::json;

use super::{RequestView, load_view, refuse, role_of, visible_request};
use crate::audit::{self, NewEvent};
use crate::config::{ResourceConfig, RoleConfig};
use crate::error::{Error, Result};
use crate::notify;
use crate::policy::{self, Actor, GrantStatus, RequestStatus};
use crate::state::{AppState, Metrics};
use crate::store::{self, Conn, GrantRow, RequestRow};

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
    let (req, actor) = visible_request(state, &mut tx, actor, id).await?;
    let role = role_of(state, &req);
    let role = role.as_ref();
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
    let Some(holder) = store::load_actor(conn, user_id, &state.config().auth.admin_groups).await?
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
        let config = state.config();
        let role = config.role(&g.resource, &g.role).map(|(_, r)| r);
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
            let config = state.config();
            let role = config.role(&h.resource, &h.role).map(|(_, r)| r);
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
pub async fn holders_live_grant(
    state: &AppState,
    conn: &mut Conn,
    actor: &Actor,
    request_id: &str,
    now: i64,
) -> Result<HeldGrant> {
    let (req, actor) = visible_request(state, conn, actor, request_id).await?;
    let found = state
        .config()
        .role(&req.resource, &req.role)
        .map(|(res, role)| (res.clone(), role.clone()));
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
    if !policy::may_request(&actor, &role) {
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
pub struct HeldGrant {
    pub actor: Actor,
    pub grant: GrantRow,
    pub resource: ResourceConfig,
    pub role: RoleConfig,
}

/// Live grants the actor may see (their own; all for approvers of the role and admins).
pub async fn live_grants(state: &AppState, actor: &Actor) -> Result<Vec<GrantRow>> {
    Ok(store::live_grants(&state.db, state.now_ms())
        .await?
        .into_iter()
        .filter(|g| {
            let config = state.config();
            let role = config.role(&g.resource, &g.role).map(|(_, r)| r);
            policy::may_view(actor, &g.user_id, role)
        })
        .collect())
}
