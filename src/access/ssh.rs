//! SSH certificates for live grants: who may get one, what it says, and the KRL.
//!
//! Only the grant's holder, only while the grant is live, only for an ssh resource.
//! The certificate is valid from at most a minute ago to exactly the grant's end, for
//! the role's principals and extensions; each one minted is an audit event with its
//! serial and key fingerprint, in the same transaction as its record.

use serde_json::json;
use ssh_key::HashAlg;

use super::refuse;
use crate::audit::{self, NewEvent};
use crate::ca::{self, BACKDATE_SECS, CertSpec, krl};
use crate::config::ResourceKind;
use crate::error::{Error, Result};
use crate::policy::Actor;
use crate::state::AppState;
use crate::store;

/// How long after its expiry a revoked certificate stays in the KRL, for targets whose
/// clock runs behind.
pub const KRL_GRACE_SECS: i64 = 24 * 3600;

/// A certificate just minted.
#[derive(Debug, serde::Serialize)]
pub struct Minted {
    /// The certificate, one OpenSSH line (`ssh-ed25519-cert-v01@openssh.com AAAA…`).
    pub certificate: String,
    pub serial: u64,
    pub key_id: String,
    pub principals: Vec<String>,
    pub valid_after: u64,
    pub valid_before: u64,
    pub fingerprint: String,
}

/// Mints a certificate for `public_key` under the grant of request `request_id`.
pub async fn mint_certificate(
    state: &AppState,
    actor: &Actor,
    request_id: &str,
    public_key: &str,
) -> Result<Minted> {
    let key = ca::parse_user_key(public_key).map_err(|m| Error::invalid("public_key", m))?;
    let now_ms = state.now_ms();
    let now = u64::try_from(now_ms / 1000).unwrap_or(0);
    let mut tx = store::begin_write(&state.db).await?;
    let super::HeldGrant {
        actor,
        grant,
        resource,
        role,
    } = super::holders_live_grant(state, &mut tx, actor, request_id, now_ms).await?;
    if resource.kind != ResourceKind::Ssh {
        return refuse(
            state,
            Error::conflict(format!(
                "{} is a {} resource: SSH certificates are only for ssh resources",
                resource.name, resource.kind
            )),
        );
    }
    // Never outlive the grant: the end rounds down to the second.
    let valid_before = u64::try_from(grant.ends_at / 1000).unwrap_or(0);
    let grant_start = u64::try_from(grant.starts_at / 1000).unwrap_or(0);
    let valid_after = now
        .saturating_sub(BACKDATE_SECS)
        .max(grant_start.saturating_sub(BACKDATE_SECS));
    if valid_before <= valid_after {
        return refuse(state, Error::conflict("this grant has ended"));
    }
    let key_id = format!("twokey:{}:{}", grant.id, actor.email);
    let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
    let source = role.source_address.join(",");
    let principals = role.principals.clone();
    // Serials are random; a collision (never seen, but cheap to handle) draws again.
    let mut serial = ca::random_serial();
    let mut attempts = 0;
    while !store::insert_certificate(
        &mut tx,
        &store::NewCertificate {
            serial,
            grant_id: &grant.id,
            user_id: &actor.user_id,
            key_id: &key_id,
            fingerprint: &fingerprint,
            principals: &principals.join(","),
            valid_after,
            valid_before,
            created_at: now_ms,
        },
    )
    .await?
    {
        attempts += 1;
        if attempts >= 8 {
            return Err(Error::Internal("no free certificate serial".into()));
        }
        serial = ca::random_serial();
    }
    let cert = state.ca.sign(&CertSpec {
        public_key: &key,
        serial,
        key_id: &key_id,
        principals: &principals,
        valid_after,
        valid_before,
        extensions: &role.extensions,
        force_command: role.force_command.as_deref(),
        source_address: (!source.is_empty()).then_some(source.as_str()),
    })?;
    let certificate = cert
        .to_openssh()
        .map_err(|e| Error::Internal(format!("encoding the certificate: {e}")))?;
    audit::append(
        &mut tx,
        now_ms,
        &NewEvent {
            actor: &actor.email,
            action: "ssh_certificate.minted",
            subject: &grant.id,
            details: json!({
                "request_id": request_id,
                "serial": serial.to_string(),
                "key_id": key_id,
                "key_fingerprint": fingerprint,
                "principals": principals,
                "valid_after": valid_after,
                "valid_before": valid_before,
                "extensions": role.extensions,
                "force_command": role.force_command,
                "source_address": role.source_address,
                "by": actor.identity(),
            }),
        },
    )
    .await?;
    tx.commit().await?;
    tracing::info!(request = %request_id, grant = %grant.id, serial, fingerprint = %fingerprint, "ssh certificate minted");
    Ok(Minted {
        certificate,
        serial,
        key_id,
        principals,
        valid_after,
        valid_before,
        fingerprint,
    })
}

/// The current KRL: every certificate of a grant that is no longer active, until a day
/// after it expired anyway.
pub async fn current_krl(state: &AppState) -> Result<Vec<u8>> {
    let now = state.now_ms() / 1000;
    let rows = store::revoked_certificates(&state.db, now - KRL_GRACE_SECS).await?;
    let version = audit::head_seq(&state.db).await?;
    let revoked = krl::Revoked {
        serials: rows.iter().map(|(s, _)| *s as u64).collect(),
    };
    krl::encode(
        state.ca.public_key(),
        &revoked,
        u64::try_from(version).unwrap_or(0),
        u64::try_from(now).unwrap_or(0),
    )
}
