//! Admission, protocol-neutral: a credential that passed its own protocol's checks is
//! [`Presented`], [`admit`] finds its grant live in the store for the resource asked
//! for, and the connection is [`Admitted`], or refused with a [`Refusal`] the engineer
//! can act on. [`authorize`] adds that the grant's role is still in the policy;
//! [`grant_is_live`] re-asks while a connection runs.
//!
//! What is specific to a protocol (an SSH certificate's CA, type, critical options and
//! principals) is checked in its own room (`ssh::certificate`) before it gets here.
//! This must never admit on anything but a live grant row, and never when the store
//! cannot answer (DESIGN.md invariant 5).

use std::net::SocketAddr;

use crate::config::RoleConfig;
use crate::state::AppState;
use crate::store::{self, GrantRow};

/// Who a connection was admitted as.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub grant: GrantRow,
    pub serial: u64,
    pub key_id: String,
    /// Where the connection came from, if known.
    pub peer: Option<SocketAddr>,
}

/// Why a connection was refused, in one line the engineer can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The credential itself (for SSH, the certificate) is not acceptable:
    /// authentication fails.
    Credential(String),
    /// A valid twokey certificate, but no live grant for this resource: the engineer
    /// is told why on their terminal, and nothing reaches the target.
    Grant(String),
}

impl Refusal {
    /// The line the engineer (or the log) is given.
    pub fn text(&self) -> &str {
        match self {
            Refusal::Credential(s) | Refusal::Grant(s) => s,
        }
    }
}

/// A credential that passed its own protocol's checks, and the grant it names: what
/// any protocol presents to [`admit`]. The user is the grant's holder, read from the
/// grant row, never taken from the credential's own text.
#[derive(Debug, Clone)]
pub struct Presented {
    /// The grant the credential was minted for.
    pub grant_id: String,
    /// The credential's serial (a certificate's), for the audit and the refusal log.
    pub serial: u64,
    /// The credential's identity as minted (a certificate's key id), for the audit.
    pub key_id: String,
    /// Where the connection comes from, if known.
    pub peer: Option<SocketAddr>,
}

/// The admission every relay protocol shares, once its credential is checked: the
/// grant it names is live in the store right now and is for `resource`. A store that
/// cannot answer admits nobody.
pub async fn admit(
    state: &AppState,
    resource: &str,
    presented: Presented,
) -> std::result::Result<Admitted, Refusal> {
    let grant = match store::grant_by_id(&state.db, &presented.grant_id).await {
        Ok(Some(g)) => g,
        Ok(None) => return Err(Refusal::Credential("unknown grant".into())),
        // Fail closed: no store, no session.
        Err(_) => {
            return Err(Refusal::Credential(
                "twokey cannot check grants right now".into(),
            ));
        }
    };
    if grant.status == crate::policy::GrantStatus::Revoked {
        return Err(Refusal::Grant(format!(
            "your grant on {} was revoked; run: twokey request {} --role {} --for 30m --reason \"…\"",
            grant.resource, grant.resource, grant.role
        )));
    }
    if grant.resource != resource {
        return Err(Refusal::Grant(format!(
            "no live grant for {resource} (this certificate is for {}); run: twokey request {resource} --role ROLE --for 30m --reason \"…\"",
            grant.resource
        )));
    }
    if !grant.is_live(state.now_ms()) {
        return Err(Refusal::Grant(format!(
            "your grant on {resource} has ended; run: twokey request {resource} --role {} --for 30m --reason \"…\"",
            grant.role
        )));
    }
    Ok(Admitted {
        serial: presented.serial,
        key_id: presented.key_id,
        peer: presented.peer,
        grant,
    })
}

/// The admission every relay protocol shares: [`admit`], then the grant's role is still
/// in the policy. The role is handed back so the protocol can check what its credential
/// carries against it (SSH: the certificate's principals).
pub async fn authorize(
    state: &AppState,
    resource: &str,
    presented: Presented,
) -> std::result::Result<(Admitted, RoleConfig), Refusal> {
    let admitted = admit(state, resource, presented).await?;
    let config = state.config();
    let Some((_, role)) = config.role(&admitted.grant.resource, &admitted.grant.role) else {
        return Err(Refusal::Grant(format!(
            "the role {} of your grant is no longer in the policy",
            admitted.grant.role
        )));
    };
    Ok((admitted, role.clone()))
}

/// Whether the grant is active, not past its end, and still rightfully held (the
/// holder was not forced out since and may still request its role) right now; a store
/// that cannot answer says no (fail closed).
pub(crate) async fn grant_is_live(state: &AppState, grant_id: &str) -> bool {
    crate::access::rightful_grants_among(state, &[grant_id.to_string()])
        .await
        .is_ok_and(|live| live.contains(grant_id))
}
