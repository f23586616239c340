//! The PostgreSQL relay: psql, pgbench and any driver connect here (`host=RELAY
//! port=6432 dbname=RESOURCE user=EMAIL`) with the relay password of a live grant; the
//! relay logs in to the target as the grant's own role with a password no person sees,
//! relays the protocol message by message, writes the session's transcript, and cuts
//! the session when its grant ends.
//!
//! A tour of the room:
//! - [`tls`]: the relay's own certificate (made at first start or configured), the
//!   client side of TLS to the target, and the stream that is either.
//! - [`scram`]: SCRAM-SHA-256, as the server to clients (against the stored verifier)
//!   and as the client to the target.
//! - [`wire`]: the protocol's packets and messages, framed with a size bound.
//! - [`tracker`]: follows both directions and writes the transcript; [`judge`]: what
//!   it asks of each statement (PostgreSQL's parse, the role's rules).
//! - [`startup`]: TLS, the StartupMessage and the relay password (SCRAM), before
//!   admission; [`upstream`]: the login to the target as the grant's role;
//!   `session`: one connection from admission to close, relayed both ways, where a
//!   statement held for review waits (`access::held`) and then runs once or is
//!   refused; [`cancel`]: the relay's own cancel keys (a cancel also withdraws a held
//!   statement).
//!
//! This file holds the accept loop and what the connections share ([`PgRelay`]).
//!
//! It must never let a message reach the target before the grant is admitted, never
//! hand the engineer the target's credential, and never pass a message it cannot
//! frame: it fails closed.

pub mod cancel;
pub mod judge;
pub mod mask;
pub mod scram;
mod session;
pub(crate) use session::must_reconnect;
pub mod startup;
pub mod tls;
pub mod tracker;
pub mod upstream;
pub mod wire;

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::{RelayConfig, RelayPostgresConfig};
use crate::relay::limits::PerAddress;
use crate::state::AppState;

/// The running PostgreSQL relay's shared parts.
pub struct PgRelay {
    pub(crate) state: AppState,
    pub(crate) pg: RelayPostgresConfig,
    pub(crate) limits: RelayConfig,
    pub(crate) keys: Arc<cancel::CancelKeys>,
    pub(crate) upstreams: upstream::Upstreams,
    pub(crate) refusals: crate::relay::limits::RefusalLog,
    /// Statements parsed, by text, for every session's judge.
    pub(crate) shapes: Arc<judge::Shapes>,
    /// The key of the `hash` mask method, when some role masks; `None` if it could
    /// not be read, and then those roles' sessions are refused.
    pub(crate) mask_key: Option<[u8; 32]>,
}

/// Accepts connections within the limits (total, per address) before any TLS, and
/// serves each in its own task.
pub(crate) async fn accept(state: AppState, listener: TcpListener) {
    let Some(pg) = state.config().relay_postgres().cloned() else {
        return;
    };
    let limits = state.config().relay.clone().unwrap_or_default();
    // Loaded whether or not a role masks now: a reload may add the first mask.
    let mask_key = mask::load_or_create_key(&state.config().server.data_dir)
        .map_err(|e| tracing::error!(error = %e, "postgres relay: no mask key; sessions of roles that mask are refused"))
        .ok();
    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let per_address = Arc::new(PerAddress::default());
    let max_per_ip = limits.max_connections_per_ip;
    let relay = Arc::new(PgRelay {
        state,
        pg,
        limits,
        keys: Arc::default(),
        upstreams: upstream::Upstreams::default(),
        refusals: Default::default(),
        shapes: Arc::default(),
        mask_key,
    });
    #[cfg(feature = "bench-unjudged")]
    tracing::warn!(
        "built with the bench-unjudged feature: for benchmarks only, never deploy this build"
    );
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                tracing::warn!(error = %e, "postgres relay: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tracing::warn!(peer = %peer.ip(), "postgres relay: connection limit reached; closed");
            tokio::spawn(startup::turn_away(
                socket,
                "the relay has too many connections",
            ));
            continue;
        };
        let Some(slot) = PerAddress::enter(&per_address, peer.ip(), max_per_ip) else {
            tracing::warn!(peer = %peer.ip(), "postgres relay: too many connections from this address; closed");
            tokio::spawn(startup::turn_away(
                socket,
                "too many connections from your address",
            ));
            continue;
        };
        let _ = socket.set_nodelay(true);
        let relay = relay.clone();
        tokio::spawn(async move {
            let _held = (permit, slot);
            session::serve(relay, socket, peer).await;
        });
    }
}
