//! Target host keys learned on first use, for resources whose config pins none.
//!
//! The relay never sends anything to a host whose key is not trusted. A key pinned in
//! config is trusted; otherwise only the key an admin confirmed under **Host keys** is.
//! Any other key the relay meets is recorded as pending (once, audited) and the session
//! is refused with its fingerprint, so an admin can compare it with the target's own
//! (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`) and confirm or reject it. An
//! admin can also withdraw trust from a confirmed key, which ends the live sessions on
//! that resource.

use russh::keys::ssh_key::{HashAlg, PublicKey};
use serde_json::json;

use crate::error::{Error, Result};
use crate::policy::{Actor, HostKeyStatus};
use crate::state::AppState;
use crate::store;

/// At most this many keys wait for an admin per resource; past it, new keys are refused
/// without being recorded (and logged).
pub const MAX_PENDING_PER_RESOURCE: i64 = 20;

/// Why sessions end when an admin withdraws trust from their target's host key.
pub const KEY_WITHDRAWN: &str = "the target's host key is no longer trusted";

/// The key confirmed for `resource`, if an admin confirmed one.
pub async fn confirmed(state: &AppState, resource: &str) -> Result<Option<PublicKey>> {
    Ok(store::confirmed_host_key(&state.db, resource)
        .await?
        .and_then(|row| PublicKey::from_openssh(&row.public_key).ok()))
}

/// Records a key `address` presented for `resource` that is not the trusted one, and
/// says why nothing was sent: a line the engineer can act on.
pub async fn refuse(
    state: &AppState,
    resource: &str,
    address: &str,
    presented: &PublicKey,
    had_confirmed: bool,
) -> String {
    let fingerprint = presented.fingerprint(HashAlg::Sha256).to_string();
    let line = presented.to_openssh().unwrap_or_default();
    // To its end even when the connection that asked is cut or times out meanwhile.
    let recorded = {
        let (state, resource, address, line, fingerprint) = (
            state.clone(),
            resource.to_string(),
            address.to_string(),
            line.clone(),
            fingerprint.clone(),
        );
        crate::relay::lifecycle::to_the_end(async move {
        let (resource, address) = (resource.as_str(), address.as_str());
        let now = state.now_ms();
        let mut tx = store::begin_write(&state.db).await?;
        let Some((row, added)) = store::record_host_key(
            &mut tx,
            resource,
            address,
            &line,
            &fingerprint,
            now,
            MAX_PENDING_PER_RESOURCE,
        )
        .await?
        else {
            tracing::warn!(resource, %fingerprint, "relay: too many host keys wait for an admin; not recording another");
            return Ok::<_, Error>(None);
        };
        if added {
            crate::audit::append(
                &mut tx,
                now,
                &crate::audit::NewEvent {
                    actor: "system",
                    action: "host_key.seen",
                    subject: resource,
                    details: json!({
                        "resource": resource, "address": address, "fingerprint": fingerprint,
                        "replaces_confirmed": had_confirmed,
                    }),
                },
            )
            .await?;
        }
        tx.commit().await?;
        Ok(Some(row.status))
        })
        .await
    };
    match recorded.as_ref().copied() {
        Ok(Some(HostKeyStatus::Rejected)) => format!(
            "{address} presented host key {fingerprint}, which an admin rejected for {resource}; nothing was sent to it"
        ),
        Ok(Some(HostKeyStatus::Replaced)) => format!(
            "{address} presented host key {fingerprint}, which an admin has since replaced for {resource}; nothing was sent to it"
        ),
        Ok(None) => format!(
            "{address} presented host key {fingerprint}, which is not trusted for {resource}, and too many keys already wait for an admin; nothing was sent to it"
        ),
        Ok(_) if had_confirmed => format!(
            "{address} presented host key {fingerprint}, not the one confirmed for {resource}; nothing was sent to it. An admin can review it under Host keys (/admin/host-keys)"
        ),
        Ok(_) => format!(
            "the host key of {resource} ({fingerprint}) is not confirmed yet: an admin must confirm it under Host keys (/admin/host-keys)"
        ),
        Err(e) => {
            tracing::error!(error = %e, resource, "relay: could not record a target's host key");
            format!(
                "{address} presented host key {fingerprint}, which is not trusted for {resource}; nothing was sent to it"
            )
        }
    }
}

/// What an admin does with a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A pending key is trusted from now on, replacing any key confirmed before.
    Confirm,
    /// A pending key is never trusted.
    Reject,
    /// A confirmed key is no longer trusted; live sessions on its resource end.
    Withdraw,
}

/// An admin decides on a key: one conditional UPDATE with its audit event (confirming
/// first retires the key it replaces, in the same transaction, named in the event).
pub async fn decide(state: &AppState, admin: &Actor, id: &str, decision: Decision) -> Result<()> {
    if !admin.is_admin {
        return Err(Error::forbidden("only an admin may decide on a host key"));
    }
    let now = state.now_ms();
    let mut tx = store::begin_write(&state.db).await?;
    let key = store::host_key(&mut tx, id)
        .await?
        .ok_or(Error::NotFound("host key"))?;
    let (from, to, action) = match decision {
        Decision::Confirm => (
            HostKeyStatus::Pending,
            HostKeyStatus::Confirmed,
            "host_key.confirmed",
        ),
        Decision::Reject => (
            HostKeyStatus::Pending,
            HostKeyStatus::Rejected,
            "host_key.rejected",
        ),
        Decision::Withdraw => (
            HostKeyStatus::Confirmed,
            HostKeyStatus::Rejected,
            "host_key.withdrawn",
        ),
    };
    let mut replaces = None;
    if decision == Decision::Confirm {
        replaces = store::confirmed_host_key(&mut *tx, &key.resource)
            .await?
            .map(|old| old.fingerprint);
        store::retire_confirmed_host_key(&mut tx, &key.resource).await?;
    }
    if !store::decide_host_key(&mut tx, id, (from, to), &admin.email, now).await? {
        // Dropping the transaction undoes the retirement above.
        return Err(Error::conflict(format!(
            "this host key is {}, not {from}",
            key.status
        )));
    }
    crate::audit::append(
        &mut tx,
        now,
        &crate::audit::NewEvent {
            actor: &admin.email,
            action,
            subject: &key.resource,
            details: json!({
                "resource": key.resource, "address": key.address, "fingerprint": key.fingerprint,
                "replaces": replaces, "by": admin.identity(),
            }),
        },
    )
    .await?;
    tx.commit().await?;
    if decision != Decision::Reject {
        // Sessions through a key no longer trusted end now (confirming a key replaces
        // the old one, so those go too).
        cut_resource(state, &key.resource).await;
    }
    Ok(())
}

/// Ends the live sessions and forwards on `resource` (they run on its grants).
async fn cut_resource(state: &AppState, resource: &str) {
    let mut on_resource = std::collections::HashSet::new();
    for grant_id in state.live_sessions.grant_ids() {
        match store::grant_by_id(&state.db, &grant_id).await {
            Ok(Some(g)) if g.resource != resource => {}
            // On the resource, or unknown (fail closed).
            _ => {
                on_resource.insert(grant_id);
            }
        }
    }
    state
        .live_sessions
        .cut_where(|g| !on_resource.contains(g), KEY_WITHDRAWN);
}
