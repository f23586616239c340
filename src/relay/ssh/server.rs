//! The relay's SSH server: the accept loop within the limits, and the russh handler
//! (`Conn`) that authenticates by certificate only ([`super::certificate::authorize`]),
//! refuses and audits every kind of forwarding the role does not allow, serves a jump
//! (`ssh -J`) as a second admitted session inside the connection, and hands each
//! session channel to the bridge.
//!
//! This must never let a channel reach the target without a fresh check that its grant
//! is still live: admission at login is not enough for a connection that stays open.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::ssh_key::{Certificate, HashAlg};
use russh::server::{Auth, Msg, Session};
use russh::{Channel, ChannelId};
use serde_json::json;
use tokio::net::TcpListener;

use super::bridge::{bridge, explain, forward};
use super::certificate::authorize;
use crate::relay::admission::{Admitted, Refusal, grant_is_live};
use crate::relay::lifecycle::audit;
use crate::relay::limits::{LoginGrace, PerAddress, RefusalLog};
use crate::state::AppState;

/// Accepts connections within the limits (total, per address) before any cryptography,
/// and runs each as its own SSH session.
pub(crate) async fn accept(
    state: AppState,
    config: Arc<russh::server::Config>,
    listener: TcpListener,
    limits: crate::config::RelayConfig,
    grace: Duration,
) {
    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let per_address = Arc::new(PerAddress::default());
    let refusals = Arc::new(RefusalLog::default());
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                tracing::warn!(error = %e, "relay accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tracing::warn!(peer = %peer.ip(), "relay: connection limit reached; closed");
            continue;
        };
        let Some(slot) = PerAddress::enter(&per_address, peer.ip(), limits.max_connections_per_ip)
        else {
            tracing::warn!(peer = %peer.ip(), "relay: too many connections from this address; closed");
            continue;
        };
        let _ = socket.set_nodelay(true);
        let authenticated = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stream = LoginGrace::new(socket, authenticated.clone(), grace);
        let conn = Conn {
            state: state.clone(),
            peer: Some(peer),
            channels: Arc::default(),
            admission: None,
            authenticated,
            refusals: refusals.clone(),
            config: Some(config.clone()),
            grace,
        };
        let config = config.clone();
        tokio::spawn(async move {
            let _held = (permit, slot);
            match russh::server::run_stream(config, stream, conn).await {
                Ok(session) => {
                    if let Err(e) = session.await {
                        tracing::debug!(error = %e, "relay connection ended");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "relay connection failed before login"),
            }
        });
    }
}

/// Sessions one connection may have open at once (ControlMaster multiplexes); each
/// costs an upstream connection and a recording.
const MAX_CHANNELS_PER_CONNECTION: usize = 10;

struct Conn {
    state: AppState,
    peer: Option<SocketAddr>,
    /// Sessions open on this connection right now.
    channels: Arc<std::sync::atomic::AtomicUsize>,
    admission: Option<std::result::Result<Admitted, Refusal>>,
    /// Set once a certificate is accepted: ends the login grace time.
    authenticated: Arc<std::sync::atomic::AtomicBool>,
    refusals: Arc<RefusalLog>,
    /// The relay's SSH config, to serve a jump (`ssh -J`) inside this connection; None
    /// on such an inner connection, which cannot jump again.
    config: Option<Arc<russh::server::Config>>,
    /// The login grace time, for a jump's inner connection too.
    grace: Duration,
}

/// One of a connection's channels; gives its place back when dropped.
struct ChannelSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Conn {
    async fn audit_refusal(&self, resource: &str, reason: &str, cert: &Certificate) {
        if !self.refusals.first_in_a_while(cert.serial(), reason) {
            tracing::info!(
                resource,
                reason,
                "relay refusal repeated; audited once a minute"
            );
            return;
        }
        // Refused whether or not this can be audited (a failure is logged).
        let _ = audit(
            &self.state,
            "relay",
            "relay.refused",
            resource,
            json!({
                "reason": reason,
                "key_id": cert.key_id(),
                "serial": cert.serial().to_string(),
                "peer": self.peer.map(|p| p.ip().to_string()),
            }),
        )
        .await;
    }

    /// A slot for one more channel on this connection, or None when it has its fill.
    fn channel_slot(&self) -> Option<ChannelSlot> {
        use std::sync::atomic::Ordering;
        if self.channels.fetch_add(1, Ordering::SeqCst) >= MAX_CHANNELS_PER_CONNECTION {
            self.channels.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(ChannelSlot(self.channels.clone()))
    }

    /// Admission was decided at authentication; a connection can open channels long
    /// after (ControlMaster). Each channel re-checks that the grant is still live, and a
    /// connection whose grant is over admits nothing more.
    async fn recheck(&mut self) -> std::result::Result<Admitted, Refusal> {
        let admission = self
            .admission
            .clone()
            .unwrap_or_else(|| Err(Refusal::Grant("not logged in".into())));
        let a = admission?;
        if grant_is_live(&self.state, &a.grant.id).await {
            return Ok(a);
        }
        let why = Refusal::Grant(format!(
            "your grant on {} has ended or was revoked; run: twokey request {} --role {} --for 30m --reason \"…\"",
            a.grant.resource, a.grant.resource, a.grant.role
        ));
        self.admission = Some(Err(why.clone()));
        Err(why)
    }

    async fn refuse_forward(&self, what: &str) {
        if let Some(Ok(a)) = &self.admission
            && self.refusals.first_in_a_while(a.serial, what)
        {
            // Refused whether or not this can be audited (a failure is logged).
            let _ = audit(
                &self.state,
                &a.grant.user_email,
                "session.forward_refused",
                &a.grant.id,
                json!({ "forward": what }),
            )
            .await;
        }
    }
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _user: &str,
        _key: russh::server::VerifiedPublicKey<'_>,
    ) -> std::result::Result<Auth, Self::Error> {
        // Plain keys never get in: only certificates twokey minted.
        Ok(Auth::reject())
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        cert: &Certificate,
    ) -> std::result::Result<Auth, Self::Error> {
        use std::sync::atomic::Ordering;
        match authorize(&self.state, user, cert, self.peer).await {
            Ok(a) => {
                self.admission = Some(Ok(a));
                self.authenticated.store(true, Ordering::Release);
                Ok(Auth::Accept)
            }
            Err(r @ Refusal::Grant(_)) => {
                // The certificate proves who this is; tell them why, forward nothing.
                self.audit_refusal(user, r.text(), cert).await;
                self.admission = Some(Err(r));
                self.authenticated.store(true, Ordering::Release);
                Ok(Auth::Accept)
            }
            Err(r @ Refusal::Credential(_)) => {
                // Only certificates twokey's CA signed are worth an audit row: anyone can
                // present a self-signed one, and must not be able to grow the chain.
                let ours = cert.signature_key().fingerprint(HashAlg::Sha256)
                    == self.state.ca.public_key().fingerprint(HashAlg::Sha256);
                if ours {
                    self.audit_refusal(user, r.text(), cert).await;
                }
                tracing::info!(resource = %user, reason = r.text(), "relay refused a certificate");
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        session: &mut Session,
    ) -> std::result::Result<(), Self::Error> {
        if self.admission.is_none() {
            return Ok(());
        }
        let Some(slot) = self.channel_slot() else {
            reply
                .reject(russh::ChannelOpenFailure::ResourceShortage)
                .await;
            return Ok(());
        };
        let admission = self.recheck().await;
        reply.accept().await;
        let state = self.state.clone();
        match admission {
            Ok(admitted) => {
                let handle = session.handle();
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Err(e) = bridge(state, admitted, channel, handle).await {
                        tracing::error!(error = %e, "relay session ended with an error");
                    }
                });
            }
            Err(why) => {
                tokio::spawn(async move {
                    let _slot = slot;
                    explain(channel, why.text().to_string()).await;
                });
            }
        }
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> std::result::Result<(), Self::Error> {
        let destination = format!("{host_to_connect}:{port_to_connect}");
        // `ssh -J RESOURCE@relay RESOURCE`: the client asks for a tunnel to a resource by
        // name. The relay ends that tunnel itself, with a second SSH session inside it
        // that is admitted, relayed and recorded like any other.
        if self
            .state
            .config()
            .resources
            .iter()
            .any(|r| r.name == host_to_connect)
            && let Some(config) = self.config.clone()
            && matches!(&self.admission, Some(Ok(_)))
        {
            let Some(slot) = self.channel_slot() else {
                reply
                    .reject(russh::ChannelOpenFailure::ResourceShortage)
                    .await;
                return Ok(());
            };
            // The outer grant must still be live to open a tunnel at all.
            if self.recheck().await.is_err() {
                reply
                    .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                    .await;
                return Ok(());
            }
            reply.accept().await;
            let authenticated = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let stream = LoginGrace::new(channel.into_stream(), authenticated.clone(), self.grace);
            let inner = Conn {
                state: self.state.clone(),
                peer: self.peer,
                channels: Arc::default(),
                admission: None,
                authenticated,
                refusals: self.refusals.clone(),
                config: None,
                grace: self.grace,
            };
            tokio::spawn(async move {
                let _slot = slot;
                match russh::server::run_stream(config, stream, inner).await {
                    Ok(session) => {
                        if let Err(e) = session.await {
                            tracing::debug!(error = %e, "relay: jumped connection ended");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "relay: jumped connection failed"),
                }
            });
            return Ok(());
        }
        // Only when the grant's role allows it, as its certificates would.
        let allowed = matches!(&self.admission, Some(Ok(a)) if self
            .state
            .config()
            .role(&a.grant.resource, &a.grant.role)
            .is_some_and(|(_, r)| r.extensions.iter().any(|e| e == "permit-port-forwarding")));
        if !allowed {
            self.refuse_forward(&format!("direct-tcpip to {destination}"))
                .await;
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        let Some(slot) = self.channel_slot() else {
            reply
                .reject(russh::ChannelOpenFailure::ResourceShortage)
                .await;
            return Ok(());
        };
        let Ok(admitted) = self.recheck().await else {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let state = self.state.clone();
        let originator = (originator_address.to_string(), originator_port);
        let target = (host_to_connect.to_string(), port_to_connect);
        tokio::spawn(async move {
            let _slot = slot;
            forward(state, admitted, channel, reply, target, originator).await;
        });
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> std::result::Result<bool, Self::Error> {
        self.refuse_forward(&format!("remote forward of {address}:{port}"))
            .await;
        Ok(false)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> std::result::Result<(), Self::Error> {
        session.channel_success(channel)?;
        Ok(())
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> std::result::Result<(), Self::Error> {
        self.refuse_forward("X11 forwarding").await;
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> std::result::Result<bool, Self::Error> {
        self.refuse_forward("agent forwarding").await;
        session.channel_failure(channel)?;
        Ok(false)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        session: &mut Session,
    ) -> std::result::Result<(), Self::Error> {
        session.channel_success(channel)?;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> std::result::Result<(), Self::Error> {
        session.channel_success(channel)?;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> std::result::Result<(), Self::Error> {
        session.channel_success(channel)?;
        Ok(())
    }
}
