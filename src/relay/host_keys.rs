//! Target host keys learned on first use, for resources whose config pins none.
//!
//! The relay never sends anything to a host whose key is not trusted. A key pinned in
//! config is trusted; otherwise only the key an admin confirmed under **Host keys** is.
//! Any other key the relay meets is recorded as pending (once, audited) and the session
//! is refused with its fingerprint, so an admin can compare it with the target's own
//! (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`) and confirm or reject it.

use russh::keys::ssh_key::{HashAlg, PublicKey};
use serde_json::json;

use crate::error::{Error, Result};
use crate::policy::Actor;
use crate::state::AppState;
use crate::store::{self, HostKeyRow};

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
    let recorded = async {
        let now = state.now_ms();
        let mut tx = store::begin_write(&state.db).await?;
        let (row, added) =
            store::record_host_key(&mut tx, resource, address, &line, &fingerprint, now).await?;
        if added {
            crate::access::audit_event(
                &mut tx,
                now,
                "system",
                "host_key.seen",
                resource,
                json!({
                    "resource": resource, "address": address, "fingerprint": fingerprint,
                    "replaces_confirmed": had_confirmed,
                }),
            )
            .await?;
        }
        tx.commit().await?;
        Ok::<_, Error>(row.status)
    }
    .await;
    match recorded.as_deref() {
        Ok("rejected") => format!(
            "{address} presented host key {fingerprint}, which an admin rejected for {resource}; nothing was sent to it"
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

/// An admin confirms (trusts from now on, replacing any key confirmed before) or rejects
/// a pending key: one conditional UPDATE with its audit event.
pub async fn decide(
    state: &AppState,
    admin: &Actor,
    id: &str,
    confirm: bool,
) -> Result<HostKeyRow> {
    if !admin.is_admin {
        return Err(Error::forbidden("only an admin may decide on a host key"));
    }
    let now = state.now_ms();
    let mut tx = store::begin_write(&state.db).await?;
    let key = store::host_key(&mut tx, id)
        .await?
        .ok_or(Error::NotFound("host key"))?;
    let status = if confirm { "confirmed" } else { "rejected" };
    if confirm {
        store::retire_confirmed_host_key(&mut tx, &key.resource, now).await?;
    }
    if !store::decide_host_key(&mut tx, id, status, &admin.email, now).await? {
        // Dropping the transaction undoes the retirement above.
        return Err(Error::conflict(format!(
            "this host key is already {}",
            key.status
        )));
    }
    crate::access::audit_event(
        &mut tx,
        now,
        &admin.email,
        &format!("host_key.{status}"),
        &key.resource,
        json!({
            "resource": key.resource, "address": key.address, "fingerprint": key.fingerprint,
            "by": admin.identity(),
        }),
    )
    .await?;
    tx.commit().await?;
    Ok(HostKeyRow {
        status: status.into(),
        decided_by: Some(admin.email.clone()),
        decided_at: Some(now),
        ..key
    })
}
