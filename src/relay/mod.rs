//! The relay: the only way in to the targets. An engineer connects with the credential
//! twokey minted (today an SSH certificate: `ssh -p PORT RESOURCE@relay`); the relay
//! admits only a live grant for that resource, logs in to the target with a credential
//! the engineer never sees, records the session, and cuts it when the grant ends or is
//! revoked.
//!
//! A tour of the room. The protocol-neutral core, on which each protocol stands so the
//! two cannot drift:
//! - [`admission`]: `Presented` → [`admit`](admission::admit) → `Admitted` or `Refusal`,
//!   fail closed; [`authorize`](admission::authorize) shared by every protocol.
//! - [`live`]: the live-session registry; [`watcher`]: the one cut watcher.
//! - [`limits`]: connections per address, login grace, the refusal log.
//! - [`lifecycle`]: a session's open (its row and `session.started`) and close (the
//!   recording's hash, the row, `session.ended`), sessions a crash left open.
//! - [`instance`]: the relay instance and the claim a running process holds on it.
//! - [`error`]: [`RelayError`], one variant per way a session fails.
//!
//! The protocols: [`ssh`] (russh server, upstream client, bridge, host keys) and
//! [`postgres`] (TLS, SCRAM, the message relay and its transcript). This file
//! holds the running [`Relay`]: start and stop. Recordings are written by
//! [`crate::recording`].
//!
//! It must never decide from anything but the verified credential and a live grant row,
//! and must fail closed when the store cannot answer (DESIGN.md invariant 5).

pub mod admission;
pub mod error;
pub mod instance;
pub mod lifecycle;
pub mod limits;
pub mod live;
pub mod postgres;
pub mod ssh;
pub mod watcher;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::state::AppState;
use crate::tasks::Tasks;

pub use error::RelayError;
pub use instance::{Instance, InstanceClaim};
pub use lifecycle::{INTERRUPTED, close_interrupted};
pub use live::LiveSessions;
pub use ssh::{RelayKeys, host_keys};

/// Why a session whose role a reload removed was cut.
pub(crate) const ROLE_REMOVED: &str = "its role is no longer in the policy";
/// Why a session that must start again to run under its role's new rules was cut.
pub(crate) const ROLE_CHANGED: &str = "its role's rules changed: connect again to work under them";

/// After a reload from `old` to `new`: ends the live sessions whose role is gone, and
/// those whose session must start again to run under the new rules
/// ([`postgres::must_reconnect`], [`ssh::must_reconnect`]); the rest go on, and are judged by the new rules from
/// their next statement or command. Returns how many were ended. When the store cannot
/// say which grant a session runs on and some role needs it, every session is ended
/// (fail closed).
pub async fn end_sessions_for_reload(
    state: &AppState,
    old: &crate::config::Config,
    new: &crate::config::Config,
) -> usize {
    let mut doomed: Vec<(&str, &str, &str)> = Vec::new();
    for res in &old.resources {
        for was in &res.roles {
            match new.role(&res.name, &was.name) {
                None => doomed.push((&res.name, &was.name, ROLE_REMOVED)),
                Some((_, now))
                    if match res.kind {
                        crate::config::ResourceKind::Postgres => postgres::must_reconnect(was, now),
                        crate::config::ResourceKind::Ssh => ssh::must_reconnect(was, now),
                    } =>
                {
                    doomed.push((&res.name, &was.name, ROLE_CHANGED))
                }
                Some(_) => {}
            }
        }
    }
    let ids = state.live_sessions.grant_ids();
    if doomed.is_empty() || ids.is_empty() {
        return 0;
    }
    let holdings = match crate::store::grant_holdings_among(&state.db, &ids, state.now_ms()).await {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "reload: cannot tell which live sessions the new rules end; ending them all");
            return state
                .live_sessions
                .cut_where(|_| false, "twokey's policy was reloaded: connect again");
        }
    };
    let mut ended = 0;
    for (resource, role, reason) in doomed {
        let on: Vec<&str> = holdings
            .iter()
            .filter(|h| h.resource == resource && h.role == role)
            .map(|h| h.grant_id.as_str())
            .collect();
        if !on.is_empty() {
            ended += state.live_sessions.cut_where(|g| !on.contains(&g), reason);
        }
    }
    ended
}

/// A running relay.
pub struct Relay {
    pub addr: SocketAddr,
    /// The PostgreSQL relay's address, when it is on.
    pub pg_addr: Option<SocketAddr>,
    task: JoinHandle<()>,
    pg_task: Option<JoinHandle<()>>,
    watcher: Tasks,
    state: AppState,
    /// Held while this process runs the instance: another process on the same data dir
    /// must not close this one's live sessions as interrupted.
    _instance_lock: Option<std::fs::File>,
}

impl Relay {
    /// Stops accepting, ends every live session with a message to its engineer, and
    /// waits (at most 5 s) for their recordings to be finalised and audited.
    pub async fn stop(self) {
        self.task.abort();
        if let Some(t) = &self.pg_task {
            t.abort();
        }
        self.watcher.drain().await;
        let sessions = &self.state.live_sessions;
        sessions.cut_all("twokey is shutting down");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !sessions.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Claims this data dir's relay instance and closes the sessions it left open when it
/// last stopped uncleanly ([`lifecycle::claim_instance`]); no claim when the relay is
/// off.
pub async fn claim_instance(state: &AppState) -> Result<InstanceClaim> {
    let Some(keys) = state.relay.clone() else {
        return Ok(InstanceClaim::none());
    };
    lifecycle::claim_instance(state, &keys.instance).await
}

/// Starts the relay on `listener` (SSH) and `pg_listener` (PostgreSQL, when on),
/// holding `claim` while it runs.
pub async fn start(
    state: AppState,
    listener: TcpListener,
    pg_listener: Option<TcpListener>,
    claim: InstanceClaim,
) -> Result<Relay> {
    let keys = state
        .relay
        .clone()
        .ok_or_else(|| Error::Internal("relay keys missing".into()))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Internal(format!("relay listener: {e}")))?;
    let limits = state.config().relay.clone().unwrap_or_default();
    let grace = limits.login_grace_time;
    let config = ssh::server_config(&keys, &limits);
    let task = tokio::spawn(ssh::server::accept(
        state.clone(),
        config,
        listener,
        limits,
        grace,
    ));
    let pg_addr = pg_listener.as_ref().and_then(|l| l.local_addr().ok());
    let pg_task = pg_listener.map(|l| tokio::spawn(postgres::accept(state.clone(), l)));
    let mut watcher = Tasks::new();
    let st = state.clone();
    watcher.every("relay cut watcher", watcher::CUT_CHECK, None, move || {
        let state = st.clone();
        async move { watcher::pass(&state).await }
    });
    Ok(Relay {
        addr,
        pg_addr,
        task,
        pg_task,
        watcher,
        state,
        _instance_lock: claim.0,
    })
}
