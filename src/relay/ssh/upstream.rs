//! The upstream side: the relay as an SSH client of the target. It logs in with a
//! short certificate from the upstream CA that the engineer never sees, and talks only
//! to the trusted host key (pinned in config, or confirmed by an admin, see
//! [`super::host_keys`]).
//!
//! This must never send anything to a host whose key is not the trusted one.

use std::sync::Arc;
use std::time::Duration;

use russh::Channel;
use russh::keys::ssh_key::PublicKey;

use super::{host_keys, upstream_algorithms};
use crate::relay::admission::{Admitted, grant_is_live};
use crate::relay::error::RelayError;
use crate::relay::live::Cut;
use crate::state::AppState;

/// The upstream side: an SSH client that only talks to the trusted host key (pinned in
/// config, or confirmed by an admin), and notes any other key it is shown.
pub(super) struct Upstream {
    trusted: Option<PublicKey>,
    presented: Arc<std::sync::Mutex<Option<PublicKey>>>,
}

impl russh::client::Handler for Upstream {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> std::result::Result<bool, Self::Error> {
        Ok(match key {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => {
                let trusted = self
                    .trusted
                    .as_ref()
                    .is_some_and(|t| t.key_data() == key.key_data());
                if !trusted && let Ok(mut p) = self.presented.lock() {
                    *p = Some(key.clone());
                }
                trusted
            }
            russh::keys::PublicKeyOrCertificate::Certificate(_) => false,
        })
    }
}

/// Logs in to the grant's target as the role's first principal, with a throwaway key
/// and a certificate from the upstream CA valid only for this session's grant.
pub(super) async fn connect_upstream(
    state: &AppState,
    admitted: &Admitted,
    session_id: &str,
) -> std::result::Result<russh::client::Handle<Upstream>, RelayError> {
    let keys = state.relay.clone().ok_or(RelayError::KeysMissing)?;
    let g = &admitted.grant;
    let config = state.config();
    let (resource, role) = config
        .role(&g.resource, &g.role)
        .ok_or(RelayError::RoleGone)?;
    let address = resource
        .address
        .clone()
        .ok_or_else(|| RelayError::NoAddress(resource.name.clone()))?;
    // Pinned in config, or else learned: the key an admin confirmed, if any.
    let pinned = match &resource.host_key {
        Some(k) => Some(
            PublicKey::from_openssh(k.trim())
                .map_err(|_| RelayError::PinnedKeyInvalid(resource.name.clone()))?,
        ),
        None => None,
    };
    let trusted = match &pinned {
        Some(k) => Some(k.clone()),
        None => host_keys::confirmed(state, &resource.name)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "relay: cannot read the confirmed host key");
                RelayError::HostKeyUnchecked
            })?,
    };
    let had_confirmed = pinned.is_none() && trusted.is_some();
    let presented = Arc::new(std::sync::Mutex::new(None));
    let principal = role
        .principals
        .first()
        .cloned()
        .ok_or(RelayError::NoPrincipal)?;
    // A throwaway key and a certificate for it, from the upstream CA, valid only for
    // this session's grant.
    let key = russh::keys::ssh_key::PrivateKey::random(
        &mut russh::keys::ssh_key::rand_core::UnwrapErr(russh::keys::ssh_key::getrandom::SysRng),
        russh::keys::ssh_key::Algorithm::Ed25519,
    )
    .map_err(|e| RelayError::SessionKey(e.to_string()))?;
    let now = u64::try_from(state.now_ms() / 1000).unwrap_or(0);
    let principals = vec![principal.clone()];
    let extensions = role.extensions.clone();
    let cert = keys
        .upstream_ca
        .sign(&crate::ca::CertSpec {
            public_key: key.public_key(),
            serial: crate::ca::random_serial(),
            key_id: &format!("twokey-relay:{}:{}:{session_id}", g.id, g.user_email),
            principals: &principals,
            valid_after: now.saturating_sub(60),
            valid_before: u64::try_from(g.ends_at / 1000).unwrap_or(0),
            extensions: &extensions,
            force_command: role.force_command.as_deref(),
            source_address: None,
        })
        .map_err(RelayError::UpstreamCertificate)?;
    let config = Arc::new(russh::client::Config {
        inactivity_timeout: None,
        nodelay: true,
        preferred: upstream_algorithms(),
        ..Default::default()
    });
    let upstream = Upstream {
        trusted,
        presented: presented.clone(),
    };
    let connected = tokio::time::timeout(
        Duration::from_secs(10),
        russh::client::connect(config, address.as_str(), upstream),
    )
    .await
    .map_err(|_| RelayError::UpstreamTimeout(address.clone()))?;
    let mut handle = match connected {
        Ok(h) => h,
        Err(russh::Error::UnknownKey) if pinned.is_some() => {
            return Err(RelayError::HostKeyChanged {
                address,
                resource: resource.name.clone(),
            });
        }
        Err(russh::Error::UnknownKey) => {
            let shown = presented.lock().ok().and_then(|mut p| p.take());
            return Err(match shown {
                Some(key) => RelayError::HostKeyUnconfirmed(
                    host_keys::refuse(state, &resource.name, &address, &key, had_confirmed).await,
                ),
                None => RelayError::HostKeyRefused(address),
            });
        }
        Err(e) => {
            return Err(RelayError::UpstreamConnect {
                address,
                reason: e.to_string(),
            });
        }
    };
    let auth = handle
        .authenticate_openssh_cert(principal.clone(), Arc::new(key), cert)
        .await
        .map_err(|e| RelayError::UpstreamAuth(e.to_string()))?;
    if !auth.success() {
        return Err(RelayError::UpstreamRefused { address, principal });
    }
    Ok(handle)
}

/// A pty as the engineer asked for it, to ask the target for the same.
pub(super) type PtyRequest = (String, u32, u32, u32, u32, Vec<(russh::Pty, u32)>);

/// The upstream session channel for a relayed session (with its pty, if any): bounded
/// in time, abandoned if the session is cut meanwhile, and only while the grant is live.
pub(super) async fn open_upstream(
    state: &AppState,
    admitted: &Admitted,
    session_id: &str,
    pty: Option<PtyRequest>,
    kill: &Cut,
) -> std::result::Result<(russh::client::Handle<Upstream>, Channel<russh::client::Msg>), RelayError>
{
    // Bounded: a target that stalls mid-login must not hang the session forever. And a
    // session cut meanwhile (revoked, ended by an admin) never reaches the target.
    let handle = tokio::select! {
        up = tokio::time::timeout(Duration::from_secs(20), connect_upstream(state, admitted, session_id)) => up
            .map_err(|_| RelayError::UpstreamLoginTimeout)??,
        why = kill.wait() => return Err(RelayError::Cut(why)),
    };
    let ch = handle
        .channel_open_session()
        .await
        .map_err(|e| RelayError::UpstreamSession(e.to_string()))?;
    if let Some((term, c, r, pw, ph, modes)) = pty {
        ch.request_pty(false, &term, c, r, pw, ph, &modes)
            .await
            .map_err(|e| RelayError::UpstreamRequest(e.to_string()))?;
    }
    // Reaching the target took time: the grant must still be live now, just before the
    // command, shell or subsystem is sent.
    if !grant_is_live(state, &admitted.grant.id).await {
        return Err(RelayError::GrantEnded);
    }
    Ok((handle, ch))
}
