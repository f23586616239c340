//! The SSH relay: the only way in. An engineer connects with the certificate twokey
//! minted (`ssh -p PORT RESOURCE@relay`); [`authorize`] admits only a certificate from
//! twokey's own CA whose grant is live right now for that resource, and the relay then
//! logs in to the target with a short certificate from a separate upstream CA that
//! the engineer never sees, pins the target's host key, records the session as
//! asciicast v2, and cuts it when the grant ends or is revoked.
//!
//! It must never decide from anything but the verified certificate and a live grant row,
//! and must fail closed when the store cannot answer (DESIGN.md invariant 5).

pub mod commands;
pub mod host_keys;
pub mod recording;
pub mod sftp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::ssh_key::{Certificate, HashAlg, PublicKey};
use russh::server::{Auth, Msg, Session};
use russh::{Channel, ChannelId, ChannelMsg, MethodKind, MethodSet};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::ca::Ca;
use crate::error::{Error, Result};
use crate::state::AppState;
use crate::store::{self, GrantRow};

/// Critical options twokey's certificates may carry; any other is refused.
const KNOWN_CRITICAL: &[&str] = &["force-command", "source-address"];
/// How often a session checks that its grant is still live (the cut happens within
/// this, well under the 1 s promised).
const CUT_CHECK: Duration = Duration::from_millis(200);

/// The relay's keys: its own host key, and the upstream CA targets trust; and the id
/// of this relay instance (kept in the data dir), which each session row carries.
pub struct RelayKeys {
    pub host: Ca,
    pub upstream_ca: Ca,
    pub instance: String,
    instance_file: std::path::PathBuf,
}

impl RelayKeys {
    /// Loads (or makes) both keys. With `ca.passphrase_file` they are kept encrypted
    /// at rest with the CA key's passphrase: whoever reads the data dir must not get the
    /// key every target trusts.
    pub fn load(
        config: &crate::config::RelayConfig,
        ca: &crate::config::CaConfig,
        data_dir: &std::path::Path,
    ) -> Result<Self> {
        let at = |p: &Option<std::path::PathBuf>, name: &str| crate::config::CaConfig {
            key_file: Some(p.clone().unwrap_or_else(|| data_dir.join(name))),
            passphrase_file: ca.passphrase_file.clone(),
        };
        let instance_file = data_dir.join("relay_instance");
        let instance = match std::fs::read_to_string(&instance_file) {
            Ok(id) if !id.trim().is_empty() => id.trim().to_string(),
            _ => {
                let id = uuid::Uuid::new_v4().to_string();
                std::fs::write(&instance_file, format!("{id}\n")).map_err(|e| {
                    Error::Internal(format!("relay: writing {}: {e}", instance_file.display()))
                })?;
                id
            }
        };
        Ok(RelayKeys {
            instance,
            instance_file,
            host: Ca::load_or_create(&at(&config.host_key_file, "relay_host_key"), data_dir)?,
            upstream_ca: Ca::load_or_create(
                &at(&config.upstream_ca_key_file, "relay_upstream_ca"),
                data_dir,
            )?,
        })
    }
}

/// Why a live session is being ended from outside it, and the signal to end it.
#[derive(Default)]
pub struct Cut {
    notify: tokio::sync::Notify,
    reason: std::sync::Mutex<Option<String>>,
}

impl Cut {
    fn cut(&self, reason: &str) {
        if let Ok(mut r) = self.reason.lock() {
            r.get_or_insert_with(|| reason.to_string());
        }
        self.notify.notify_one();
    }

    async fn wait(&self) -> String {
        self.notify.notified().await;
        self.reason
            .lock()
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or_else(|| "ended".into())
    }
}

/// Live sessions, so an admin can end one and a stopping server can end them all.
#[derive(Default)]
pub struct LiveSessions {
    /// Session (or forward) id → its cut, and the grant it runs on.
    map: std::sync::Mutex<std::collections::HashMap<String, (Arc<Cut>, String)>>,
}

impl LiveSessions {
    fn register(&self, id: &str, grant_id: &str) -> Arc<Cut> {
        let c = Arc::new(Cut::default());
        if let Ok(mut m) = self.map.lock() {
            m.insert(id.to_string(), (c.clone(), grant_id.to_string()));
        }
        c
    }

    /// The grants live sessions run on.
    pub(crate) fn grant_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .map
            .lock()
            .map(|m| m.values().map(|(_, g)| g.clone()).collect())
            .unwrap_or_default();
        ids.sort();
        ids.dedup();
        ids
    }

    /// Ends, with `reason`, every session whose grant `keep` does not accept.
    pub(crate) fn cut_where(&self, keep: impl Fn(&str) -> bool, reason: &str) {
        let doomed: Vec<Arc<Cut>> = self
            .map
            .lock()
            .map(|m| {
                m.values()
                    .filter(|(_, g)| !keep(g))
                    .map(|(c, _)| c.clone())
                    .collect()
            })
            .unwrap_or_default();
        for c in doomed {
            c.cut(reason);
        }
    }

    fn remove(&self, id: &str) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(id);
        }
    }

    /// An administrator ends a live session; false if it is not live here.
    pub fn terminate(&self, id: &str) -> bool {
        match self
            .map
            .lock()
            .ok()
            .and_then(|m| m.get(id).map(|(c, _)| c.clone()))
        {
            Some(c) => {
                c.cut("terminated by an administrator");
                true
            }
            None => false,
        }
    }

    /// Ends every live session, each with `reason`.
    pub fn cut_all(&self, reason: &str) {
        self.cut_where(|_| false, reason);
    }

    pub fn is_live(&self, id: &str) -> bool {
        self.map.lock().is_ok_and(|m| m.contains_key(id))
    }

    pub fn is_empty(&self) -> bool {
        self.map.lock().map_or(true, |m| m.is_empty())
    }
}

/// Who a connection was admitted as.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub grant: GrantRow,
    pub serial: u64,
    pub key_id: String,
}

/// Why a connection was refused, in one line the engineer can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The certificate itself is not acceptable: authentication fails.
    Certificate(String),
    /// A valid twokey certificate, but no live grant for this resource: the engineer
    /// is told why on their terminal, and nothing reaches the target.
    Grant(String),
}

impl Refusal {
    fn text(&self) -> &str {
        match self {
            Refusal::Certificate(s) | Refusal::Grant(s) => s,
        }
    }
}

/// A credential that passed its own protocol's checks, and the grant it names.
#[derive(Debug, Clone)]
pub struct Presented {
    pub grant_id: String,
    pub serial: u64,
    pub key_id: String,
}

/// The SSH side of admission: the certificate is twokey's, a user certificate, within
/// validity, with no unknown critical option, from a permitted address.
pub fn check_certificate(
    state: &AppState,
    cert: &Certificate,
    peer: Option<SocketAddr>,
) -> std::result::Result<Presented, Refusal> {
    let bad = |m: &str| Err(Refusal::Certificate(m.to_string()));
    let now = u64::try_from(state.now_ms() / 1000).unwrap_or(0);
    // russh checked the signature against the key inside the certificate; that key
    // must be twokey's CA, checked here.
    let ca_fp = state.ca.public_key().fingerprint(HashAlg::Sha256);
    if cert.validate_at(now, [&ca_fp]).is_err() {
        return bad("certificate not signed by twokey's CA, or outside its validity");
    }
    if cert.cert_type() != russh::keys::ssh_key::certificate::CertType::User {
        return bad("not a user certificate");
    }
    if let Some(opt) = cert
        .critical_options()
        .keys()
        .find(|k| !KNOWN_CRITICAL.contains(&k.as_str()))
    {
        return bad(&format!("unknown critical option {opt}"));
    }
    if let Some(allowed) = cert.critical_options().get("source-address") {
        let Some(peer) = peer else {
            return bad("source address unknown");
        };
        if !allowed
            .split(',')
            .any(|cidr| cidr_contains(cidr.trim(), peer.ip()))
        {
            return bad(&format!(
                "not from a permitted source address ({})",
                peer.ip()
            ));
        }
    }
    // twokey:<grant id>:<email>
    let mut parts = cert.key_id().splitn(3, ':');
    let (Some("twokey"), Some(grant_id), Some(_)) = (parts.next(), parts.next(), parts.next())
    else {
        return bad("not a twokey certificate");
    };
    Ok(Presented {
        grant_id: grant_id.to_string(),
        serial: cert.serial(),
        key_id: cert.key_id().to_string(),
    })
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
        Ok(None) => return Err(Refusal::Certificate("unknown grant".into())),
        // Fail closed: no store, no session.
        Err(_) => {
            return Err(Refusal::Certificate(
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
        grant,
    })
}

/// SSH admission: [`check_certificate`], then [`admit`].
pub async fn authorize(
    state: &AppState,
    resource: &str,
    cert: &Certificate,
    peer: Option<SocketAddr>,
) -> std::result::Result<Admitted, Refusal> {
    let presented = check_certificate(state, cert, peer)?;
    let admitted = admit(state, resource, presented).await?;
    // The certificate must carry every principal the grant's role logs in as: one
    // minted for another role (or by hand with the CA key for other users) names its
    // own, and is not a pass to this role's logins.
    let Some((_, role)) = state
        .config
        .role(&admitted.grant.resource, &admitted.grant.role)
    else {
        return Err(Refusal::Grant(format!(
            "the role {} of your grant is no longer in the policy",
            admitted.grant.role
        )));
    };
    let held = cert.valid_principals();
    if role.principals.is_empty() || !role.principals.iter().all(|p| held.contains(p)) {
        return Err(Refusal::Certificate(
            "the certificate's principals are not the role's".into(),
        ));
    }
    Ok(admitted)
}

/// Whether `ip` is in `cidr` (`10.0.0.0/8`, `::1`, `127.0.0.1`).
pub fn cidr_contains(cidr: &str, ip: std::net::IpAddr) -> bool {
    let (addr, bits) = match cidr.split_once('/') {
        Some((a, b)) => (a, b.parse::<u32>().ok()),
        None => (cidr, None),
    };
    let Ok(net) = addr.parse::<std::net::IpAddr>() else {
        return false;
    };
    match (net, ip) {
        (std::net::IpAddr::V4(n), std::net::IpAddr::V4(i)) => {
            let bits = bits.unwrap_or(32).min(32);
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (std::net::IpAddr::V6(n), std::net::IpAddr::V6(i)) => {
            let bits = bits.unwrap_or(128).min(128);
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

/// `*` matches any run of characters, `?` one; everything else itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// A running relay.
pub struct Relay {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
    watcher: JoinHandle<()>,
    state: AppState,
    /// Held while this process runs the instance: another process on the same data dir
    /// must not close this one's live sessions as interrupted.
    _instance_lock: Option<std::fs::File>,
}

/// Why a session left open by a stopped twokey was closed at the next start.
pub const INTERRUPTED: &str = "interrupted: twokey stopped before the session ended";

/// At start-up, closes as interrupted every session this instance left open (a crash,
/// kill -9): its recording is hashed as found on disk, its end set, and
/// `session.ended` audited with `interrupted: true`, each in one transaction with one
/// conditional UPDATE. Returns how many were closed.
pub async fn close_interrupted(state: &AppState, instance: &str) -> Result<usize> {
    let mut closed = 0;
    for s in store::open_sessions_of(&state.db, instance).await? {
        if state.live_sessions.is_live(&s.id) {
            continue;
        }
        let path = std::path::PathBuf::from(&s.recording);
        let found = tokio::task::spawn_blocking(move || hash_file(&path))
            .await
            .map_err(|e| Error::Internal(format!("hashing a recording: {e}")))?;
        let (bytes, sha256, missing) = match found {
            Ok((bytes, sha)) => (bytes, sha, false),
            Err(e) => {
                tracing::error!(error = %e, session = %s.id, "relay: an interrupted session's recording cannot be read");
                (0, String::new(), true)
            }
        };
        let now = state.now_ms();
        let mut tx = store::begin_write(&state.db).await?;
        if !store::end_interrupted_session(
            &mut tx,
            &s.id,
            now,
            INTERRUPTED,
            i64::try_from(bytes).unwrap_or(i64::MAX),
            &sha256,
        )
        .await?
        {
            continue;
        }
        crate::audit::append(
            &mut tx,
            now,
            &crate::audit::NewEvent {
                actor: &s.user_email,
                action: "session.ended",
                subject: &s.grant_id,
                details: json!({
                    "session_id": s.id, "reason": INTERRUPTED, "interrupted": true,
                    "recording": s.recording, "bytes": bytes, "sha256": sha256,
                    "recording_missing": missing, "started_at": s.started_at,
                }),
            },
        )
        .await?;
        tx.commit().await?;
        tracing::warn!(session = %s.id, "relay: closed a session left open by a stop without shutdown");
        closed += 1;
    }
    Ok(closed)
}

/// A file's size and SHA-256, read in chunks.
fn hash_file(path: &std::path::Path) -> std::io::Result<(u64, String)> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((bytes, hex::encode(hasher.finalize())))
}

impl Relay {
    /// Stops accepting, ends every live session with a message to its engineer, and
    /// waits (at most 5 s) for their recordings to be finalised and audited.
    pub async fn stop(self) {
        self.task.abort();
        self.watcher.abort();
        let sessions = &self.state.live_sessions;
        sessions.cut_all("twokey is shutting down");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !sessions.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// How many connections each address has open; a guard gives its slot back.
#[derive(Default)]
struct PerAddress(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

struct AddressSlot {
    table: Arc<PerAddress>,
    ip: std::net::IpAddr,
}

impl PerAddress {
    fn enter(table: &Arc<PerAddress>, ip: std::net::IpAddr, limit: usize) -> Option<AddressSlot> {
        let mut m = table.0.lock().ok()?;
        let n = m.entry(ip).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            table: table.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.table.0.lock()
            && let Some(n) = m.get_mut(&self.ip)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// A connection's stream, which fails once the login grace time has passed without a
/// successful authentication: a peer that connects and stalls at any step before auth,
/// reading or not reading, is closed.
struct LoginGrace<S> {
    inner: S,
    authenticated: Arc<std::sync::atomic::AtomicBool>,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> LoginGrace<S> {
    fn new(inner: S, authenticated: Arc<std::sync::atomic::AtomicBool>, grace: Duration) -> Self {
        LoginGrace {
            inner,
            authenticated,
            deadline: Some(Box::pin(tokio::time::sleep(grace))),
        }
    }

    /// Ready(error) once the grace time is over and nobody has logged in.
    fn expired(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Error> {
        if let Some(deadline) = self.deadline.as_mut() {
            if self
                .authenticated
                .load(std::sync::atomic::Ordering::Acquire)
            {
                self.deadline = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "login grace time over",
                ));
            }
        }
        std::task::Poll::Pending
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for LoginGrace<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let std::task::Poll::Ready(e) = self.expired(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for LoginGrace<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let std::task::Poll::Ready(e) = self.expired(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let std::task::Poll::Ready(e) = self.expired(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// This process's claim on the relay instance of its data dir: a lock held while it
/// runs. None when the relay is off, or another process holds it.
pub struct InstanceClaim(Option<std::fs::File>);

/// Claims this data dir's relay instance and closes the sessions it left open when it
/// last stopped uncleanly ([`close_interrupted`]). Runs at start-up before anything is
/// served, so no page or session sees them open. A process that cannot claim the
/// instance (another twokey runs on the same data dir) leaves them alone.
pub async fn claim_instance(state: &AppState) -> Result<InstanceClaim> {
    let Some(keys) = state.relay.clone() else {
        return Ok(InstanceClaim(None));
    };
    let lock = std::fs::File::open(&keys.instance_file)
        .map_err(|e| Error::Internal(format!("relay: {}: {e}", keys.instance_file.display())))?;
    match lock.try_lock() {
        Ok(()) => {
            let n = close_interrupted(state, &keys.instance).await?;
            if n > 0 {
                tracing::warn!(
                    sessions = n,
                    "relay: closed sessions interrupted by the last stop"
                );
            }
            Ok(InstanceClaim(Some(lock)))
        }
        Err(e) => {
            tracing::warn!(error = %e, "relay: another twokey runs on this data dir; its open sessions are left alone");
            Ok(InstanceClaim(None))
        }
    }
}

/// Starts the relay on `listener`, holding `claim` while it runs.
pub async fn start(state: AppState, listener: TcpListener, claim: InstanceClaim) -> Result<Relay> {
    let keys = state
        .relay
        .clone()
        .ok_or_else(|| Error::Internal("relay keys missing".into()))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Internal(format!("relay listener: {e}")))?;
    let limits = state.config.relay.clone().unwrap_or_default();
    let grace = limits.login_grace_time;
    let mut methods = MethodSet::empty();
    methods.push(MethodKind::PublicKey);
    let config = Arc::new(russh::server::Config {
        methods,
        keys: vec![keys.host.private_key().clone()],
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::from_millis(0)),
        max_auth_attempts: 6,
        // An authenticated connection with nothing flowing; before authentication the
        // login grace time (LoginGrace) applies.
        inactivity_timeout: Some(limits.idle_timeout),
        nodelay: true,
        preferred: engineer_algorithms(),
        ..Default::default()
    });
    let task = tokio::spawn(accept(state.clone(), config, listener, limits, grace));
    let watcher = tokio::spawn(watch_grants(state.clone()));
    Ok(Relay {
        addr,
        task,
        watcher,
        state,
        _instance_lock: claim.0,
    })
}

/// Every [`CUT_CHECK`], one query asks which grants with live sessions are still live;
/// sessions on any other are cut. A store that cannot answer cuts them all (fail
/// closed). One query per tick, however many sessions are open.
async fn watch_grants(state: AppState) {
    let mut tick = tokio::time::interval(CUT_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ids = state.live_sessions.grant_ids();
        if ids.is_empty() {
            continue;
        }
        // Rightful, not merely active: the holder may have been forced out or lost the
        // group since (crate::access::rightful_grants_among).
        match crate::access::rightful_grants_among(&state, &ids).await {
            // A session registered during the query is on a grant it did not ask about:
            // left for the next tick.
            Ok(live) => state.live_sessions.cut_where(
                |g| live.contains(g) || ids.binary_search_by(|i| i.as_str().cmp(g)).is_err(),
                GRANT_ENDED,
            ),
            Err(e) => {
                tracing::error!(error = %e, "relay: cannot check grants; ending sessions");
                state.live_sessions.cut_where(
                    |g| ids.binary_search_by(|i| i.as_str().cmp(g)).is_err(),
                    "twokey cannot check the grant",
                );
            }
        }
    }
}

/// Why a session on a grant that ended or was revoked was cut.
const GRANT_ENDED: &str = "grant ended";
/// Why a session ends when its recording can no longer be written (a full disk, say).
const RECORDING_FAILED: &str = "its recording could not be written";

/// Accepts connections within the limits (total, per address) before any cryptography,
/// and runs each as its own SSH session.
async fn accept(
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
    admission: Option<std::result::Result<Admitted, String>>,
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

/// Holders of one of our certificates can retry a refused login as fast as they like;
/// the audit chain records each (certificate, reason) at most once a minute.
#[derive(Default)]
struct RefusalLog(std::sync::Mutex<std::collections::HashMap<(u64, String), std::time::Instant>>);

impl RefusalLog {
    const EVERY: Duration = Duration::from_secs(60);
    /// Entries kept at most; past it, ones older than a minute are dropped.
    const CAP: usize = 10_000;

    fn first_in_a_while(&self, serial: u64, reason: &str) -> bool {
        let Ok(mut m) = self.0.lock() else {
            return true;
        };
        let now = std::time::Instant::now();
        if m.len() >= Self::CAP {
            m.retain(|_, at| now.duration_since(*at) < Self::EVERY);
        }
        let key = (serial, reason.to_string());
        if m.get(&key)
            .is_some_and(|at| now.duration_since(*at) < Self::EVERY)
        {
            return false;
        }
        // Full of recent refusals: audit rather than forget.
        if m.len() < Self::CAP {
            m.insert(key, now);
        }
        true
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
        audit(
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
    async fn recheck(&mut self) -> std::result::Result<Admitted, String> {
        let admission = self
            .admission
            .clone()
            .unwrap_or_else(|| Err("not logged in".into()));
        let a = admission?;
        if grant_is_live(&self.state, &a.grant.id).await {
            return Ok(a);
        }
        let why = format!(
            "your grant on {} has ended or was revoked; run: twokey request {} --role {} --for 30m --reason \"…\"",
            a.grant.resource, a.grant.resource, a.grant.role
        );
        self.admission = Some(Err(why.clone()));
        Err(why)
    }

    async fn refuse_forward(&self, what: &str) {
        if let Some(Ok(a)) = &self.admission
            && self.refusals.first_in_a_while(a.serial, what)
        {
            audit(
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
            Err(Refusal::Grant(why)) => {
                // The certificate proves who this is; tell them why, forward nothing.
                self.audit_refusal(user, &why, cert).await;
                self.admission = Some(Err(why));
                self.authenticated.store(true, Ordering::Release);
                Ok(Auth::Accept)
            }
            Err(r @ Refusal::Certificate(_)) => {
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
                let peer = self.peer;
                let handle = session.handle();
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Err(e) = bridge(state, admitted, channel, peer, handle).await {
                        tracing::error!(error = %e, "relay session ended with an error");
                    }
                });
            }
            Err(why) => {
                tokio::spawn(async move {
                    let _slot = slot;
                    explain(channel, why).await;
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
            .config
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
            .config
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

/// Tells a refused engineer why, on stderr, and closes.
async fn explain(mut channel: Channel<Msg>, why: String) {
    // Wait for the shell or exec request so the client shows what follows.
    while let Some(msg) = channel.wait().await {
        if matches!(
            msg,
            ChannelMsg::Exec { .. } | ChannelMsg::RequestShell { .. }
        ) {
            break;
        }
    }
    let _ = channel
        .extended_data_bytes(1, format!("twokey: {why}\r\n").into_bytes())
        .await;
    let _ = channel.exit_status(1).await;
    let _ = channel.eof().await;
    let _ = channel.close().await;
}

/// The upstream side: an SSH client that only talks to the trusted host key (pinned in
/// config, or confirmed by an admin), and notes any other key it is shown.
struct Upstream {
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

async fn connect_upstream(
    state: &AppState,
    admitted: &Admitted,
    session_id: &str,
) -> std::result::Result<russh::client::Handle<Upstream>, String> {
    let keys = state.relay.clone().ok_or("relay keys missing")?;
    let g = &admitted.grant;
    let (resource, role) = state
        .config
        .role(&g.resource, &g.role)
        .ok_or("the grant's role is no longer in the policy")?;
    let address = resource
        .address
        .clone()
        .ok_or_else(|| format!("{} has no address", resource.name))?;
    // Pinned in config, or else learned: the key an admin confirmed, if any.
    let pinned = match &resource.host_key {
        Some(k) => Some(
            PublicKey::from_openssh(k.trim())
                .map_err(|_| format!("{}'s pinned host_key is not a key", resource.name))?,
        ),
        None => None,
    };
    let trusted = match &pinned {
        Some(k) => Some(k.clone()),
        None => host_keys::confirmed(state, &resource.name)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "relay: cannot read the confirmed host key");
                "the relay cannot check the target's host key right now".to_string()
            })?,
    };
    let had_confirmed = pinned.is_none() && trusted.is_some();
    let presented = Arc::new(std::sync::Mutex::new(None));
    let principal = role
        .principals
        .first()
        .cloned()
        .ok_or("the role has no principal")?;
    // A throwaway key and a certificate for it, from the upstream CA, valid only for
    // this session's grant.
    let key = russh::keys::ssh_key::PrivateKey::random(
        &mut russh::keys::ssh_key::rand_core::UnwrapErr(russh::keys::ssh_key::getrandom::SysRng),
        russh::keys::ssh_key::Algorithm::Ed25519,
    )
    .map_err(|e| format!("session key: {e}"))?;
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
        .map_err(|e| e.to_string())?;
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
    .map_err(|_| format!("{address} did not answer"))?;
    let mut handle = match connected {
        Ok(h) => h,
        Err(russh::Error::UnknownKey) if pinned.is_some() => {
            return Err(format!(
                "{address} presented a host key other than the one pinned for {}; nothing was sent to it",
                resource.name
            ));
        }
        Err(russh::Error::UnknownKey) => {
            let shown = presented.lock().ok().and_then(|mut p| p.take());
            return Err(match shown {
                Some(key) => {
                    host_keys::refuse(state, &resource.name, &address, &key, had_confirmed).await
                }
                None => format!("{address} presented a host key the relay does not accept"),
            });
        }
        Err(e) => return Err(format!("cannot connect to {address}: {e}")),
    };
    let auth = handle
        .authenticate_openssh_cert(principal.clone(), Arc::new(key), cert)
        .await
        .map_err(|e| format!("upstream login failed: {e}"))?;
    if !auth.success() {
        return Err(format!(
            "{address} refused the relay's login as {principal}"
        ));
    }
    Ok(handle)
}

/// What the relay offers engineers: AES only, GCM first. OpenSSH picks its own first
/// choice among these (aes128-ctr with hmac-sha2-256-etm; `twokey ssh --relay` asks for
/// AES-GCM), and on AES-NI machines both move data faster through the relay than
/// ChaCha20-Poly1305, which it does not offer. Every SSH client has AES-CTR.
fn engineer_algorithms() -> russh::Preferred {
    use russh::cipher;
    russh::Preferred {
        // No RFC 4253 `zlib`, which starts before authentication and exposes the
        // decompressor to anyone who connects; `zlib@openssh.com` starts only after a
        // login succeeds.
        compression: std::borrow::Cow::Borrowed(&[
            russh::compression::NONE,
            russh::compression::ZLIB_LEGACY,
        ]),
        ..ciphers(&[
            cipher::AES_256_GCM,
            cipher::AES_128_GCM,
            cipher::AES_256_CTR,
            cipher::AES_192_CTR,
            cipher::AES_128_CTR,
        ])
    }
}

/// AES-GCM first towards the target, where the relay is the client and so chooses:
/// with AES-NI it costs the relay less CPU than ChaCha20-Poly1305.
fn upstream_algorithms() -> russh::Preferred {
    use russh::cipher;
    ciphers(&[
        cipher::AES_256_GCM,
        cipher::AES_128_GCM,
        cipher::CHACHA20_POLY1305,
        cipher::AES_256_CTR,
        cipher::AES_128_CTR,
    ])
}

/// russh's defaults with these ciphers, in this order.
fn ciphers(names: &'static [russh::cipher::Name]) -> russh::Preferred {
    russh::Preferred {
        cipher: std::borrow::Cow::Borrowed(names),
        ..Default::default()
    }
}

/// Whether the grant is active, not past its end, and still rightfully held (the
/// holder was not forced out since and may still request its role) right now; a store
/// that cannot answer says no (fail closed).
async fn grant_is_live(state: &AppState, grant_id: &str) -> bool {
    crate::access::rightful_grants_among(state, &[grant_id.to_string()])
        .await
        .is_ok_and(|live| live.contains(grant_id))
}

/// One relayed session: client channel ⇄ upstream channel, recorded, cut at the end.
///
/// After the first request (exec, shell or subsystem) opens the upstream channel, each
/// direction runs in its own task: a direction blocked on flow control must never stop
/// the other from draining (that deadlocks bulk transfers).
async fn bridge(
    state: AppState,
    admitted: Admitted,
    mut client: Channel<Msg>,
    peer: Option<SocketAddr>,
    session: russh::server::Handle,
) -> std::result::Result<(), String> {
    let session_id = uuid::Uuid::new_v4().to_string();
    let g = admitted.grant.clone();
    let blocked = state
        .config
        .role(&g.resource, &g.role)
        .map(|(_, r)| r.blocked_commands.clone())
        .unwrap_or_default();
    let rec = Arc::new(std::sync::Mutex::new(
        recording::Recorder::create(&state, &session_id).map_err(|e| format!("recording: {e}"))?,
    ));
    let with_rec = |f: &dyn Fn(&mut recording::Recorder)| recording::with(&rec, f);
    let recording_path = rec
        .lock()
        .map(|r| r.path().display().to_string())
        .unwrap_or_default();
    let peer_ip = peer.map(|p| p.ip().to_string());
    let instance = state
        .relay
        .as_ref()
        .map(|k| k.instance.clone())
        .unwrap_or_default();
    // The session row and its audit event, together: a session that cannot be audited
    // as started does not start (fail closed), and the engineer is told.
    let started = async {
        let now = state.now_ms();
        let mut tx = store::begin_write(&state.db).await?;
        store::insert_session(
            &mut tx,
            &store::NewSession {
                id: &session_id,
                grant_id: &g.id,
                user_email: &g.user_email,
                resource: &g.resource,
                peer: peer_ip.as_deref(),
                started_at: now,
                recording: &recording_path,
                relay_instance: &instance,
            },
        )
        .await?;
        crate::audit::append(
            &mut tx,
            now,
            &crate::audit::NewEvent {
                actor: &g.user_email,
                action: "session.started",
                subject: &g.id,
                details: json!({
                    "session_id": session_id, "resource": g.resource, "serial": admitted.serial.to_string(),
                    "key_id": admitted.key_id, "peer": peer_ip,
                }),
            },
        )
        .await?;
        tx.commit().await?;
        Ok::<_, Error>(())
    }
    .await;
    if let Err(e) = started {
        tracing::error!(error = %e, session = %session_id, "relay: the session's start could not be audited; it does not start");
        let _ = std::fs::remove_file(&recording_path);
        explain(
            client,
            "this session cannot be audited right now, so it does not start".into(),
        )
        .await;
        return Err(format!("session start not audited: {e}"));
    }
    let kill = state.live_sessions.register(&session_id, &g.id);
    // Live until this function returns: after the end is audited, or on any error.
    let _live = Registered(&state.live_sessions, &session_id);

    let outcome: std::result::Result<(u64, u64, String), String> = async {
        // Setup: a pty perhaps, then the one request that starts the session.
        let mut pending_pty = None;
        let mut sftp = None;
        let mut end_reason = "closed".to_string();
        let start = loop {
            let msg = tokio::select! {
                m = client.wait() => m,
                why = kill.wait() => {
                    end_reason = why;
                    None
                }
            };
            let Some(msg) = msg else {
                break None;
            };
            match msg {
                ChannelMsg::RequestPty {
                    term,
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                    terminal_modes,
                    ..
                } => {
                    let _ = with_rec(&|r| {
                        r.resize(col_width, row_height);
                        r.terminal();
                    });
                    pending_pty = Some((
                        term,
                        col_width,
                        row_height,
                        pix_width,
                        pix_height,
                        terminal_modes,
                    ));
                }
                ChannelMsg::Exec { command, .. } => {
                    let cmd = String::from_utf8_lossy(&command).to_string();
                    if let Some(p) = commands::blocked_by(&blocked, &cmd) {
                        audit(
                            &state,
                            &g.user_email,
                            "session.command_blocked",
                            &g.id,
                            json!({
                                "session_id": session_id, "command": cmd, "pattern": p,
                            }),
                        )
                        .await;
                        let why = format!(
                            "twokey: the command is blocked for this role (matches {p:?})\r\n"
                        );
                        let _ = client.extended_data_bytes(1, why.into_bytes()).await;
                        let _ = client.exit_status(126).await;
                        end_reason = "blocked".into();
                        break None;
                    }
                    let _ = with_rec(&|r| r.input(&command));
                    break Some(Start::Exec(command));
                }
                ChannelMsg::RequestShell { .. } => break Some(Start::Shell),
                ChannelMsg::RequestSubsystem { name, .. } => {
                    let _ = with_rec(&|r| r.note(&format!("subsystem {name}")));
                    // sftp (and scp, which speaks sftp since OpenSSH 9) is read as it
                    // passes, so every file it touches is recorded. Any other subsystem
                    // is a byte stream the relay cannot record: refused.
                    if name != "sftp" {
                        let why = format!(
                            "twokey: the subsystem {name:?} is refused: only sftp can be recorded\r\n"
                        );
                        let _ = client.extended_data_bytes(1, why.into_bytes()).await;
                        let _ = client.exit_status(1).await;
                        end_reason = format!("subsystem {name:?} refused");
                        break None;
                    }
                    sftp = Some(Arc::new(std::sync::Mutex::new(sftp::Sftp::default())));
                    break Some(Start::Subsystem(name));
                }
                ChannelMsg::Close | ChannelMsg::Eof => break None,
                _ => {}
            }
        };

        // Nothing starts that cannot be recorded (a full disk, say).
        let start = match start {
            Some(_) if !with_rec(&|r| r.flush()) => {
                let why = format!("twokey: session ended: {RECORDING_FAILED}\r\n");
                let _ = client.extended_data_bytes(1, why.into_bytes()).await;
                let _ = client.exit_status(255).await;
                end_reason = RECORDING_FAILED.into();
                None
            }
            start => start,
        };

        // The one request that starts it, sent once the target is reached.
        let upstream = match start {
            None => None,
            Some(start) => {
                let up = open_upstream(&state, &admitted, &session_id, pending_pty.take(), &kill);
                let (h, ch) = match up.await {
                    Ok(up) => up,
                    Err(e) => return Err(tell_failure(&client, &g.resource, e).await),
                };
                match start {
                    Start::Exec(command) => ch.exec(true, command).await,
                    Start::Shell => ch.request_shell(true).await,
                    Start::Subsystem(name) => ch.request_subsystem(true, name).await,
                }
                .map_err(|e| e.to_string())?;
                Some((h, ch))
            }
        };

        let (mut bytes_in, mut bytes_out) = (0u64, 0u64);
        if let Some((_handle, up)) = upstream {
            let tap = match &sftp {
                Some(s) => Tap::Sftp(rec.clone(), s.clone()),
                None => Tap::Terminal(rec.clone()),
            };
            let pumped = pump(client, up, Some(tap), &kill, Some(session)).await;
            if let Some(s) = &sftp {
                let open = s.lock().map(|mut s| s.unclosed()).unwrap_or_default();
                let _ = with_rec(&|r| open.iter().for_each(|l| r.note(l)));
            }
            (bytes_in, bytes_out) = (pumped.bytes_in, pumped.bytes_out);
            if let Some(why) = pumped.cut {
                end_reason = why;
            }
        } else {
            let _ = client.eof().await;
            let _ = client.close().await;
        }
        Ok((bytes_in, bytes_out, end_reason))
    }
    .await;
    let (bytes_in, bytes_out, end_reason) = match outcome {
        Ok(o) => o,
        // Whatever failed (the target unreachable, its host key not the pinned one),
        // the engineer heard it (tell_failure) and the session is still closed and
        // accounted for.
        Err(e) => {
            tracing::warn!(error = %e, session = %session_id, "relay session failed");
            (0, 0, format!("failed: {e}"))
        }
    };
    // The session is ended and audited even when its recording cannot be closed; the
    // audit then says the recording failed.
    let done = match rec
        .lock()
        .map_err(|_| "recording lock poisoned".to_string())
    {
        Ok(mut r) => r.finish().map_err(|e| format!("recording: {e}")),
        Err(e) => Err(e),
    }
    .unwrap_or_else(|e| {
        tracing::error!(error = %e, session = %session_id, "relay: recording could not be closed");
        recording::Finished {
            path: recording_path.clone(),
            bytes: 0,
            sha256: String::new(),
            truncated: false,
            failed: true,
            masked_inputs: 0,
        }
    });
    let now = state.now_ms();
    let mut tx = store::begin_write(&state.db)
        .await
        .map_err(|e| e.to_string())?;
    store::end_session(
        &mut tx,
        &store::EndedSession {
            id: &session_id,
            ended_at: now,
            reason: &end_reason,
            bytes_in: bytes_in as i64,
            bytes_out: bytes_out as i64,
            recording_bytes: done.bytes as i64,
            recording_sha256: &done.sha256,
            recording_truncated: done.truncated,
            recording_failed: done.failed,
            masked_inputs: i64::from(done.masked_inputs),
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    crate::audit::append(
        &mut tx,
        now,
        &crate::audit::NewEvent {
            actor: &g.user_email,
            action: "session.ended",
            subject: &g.id,
            details: json!({
                "session_id": session_id, "reason": end_reason, "recording": done.path,
                "bytes": done.bytes, "sha256": done.sha256,
                "recording_truncated": done.truncated, "recording_failed": done.failed,
                "masked_inputs": done.masked_inputs,
                "bytes_from_client": bytes_in, "bytes_to_client": bytes_out,
            }),
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())?;
    Ok(())
}

/// Where a relayed channel's bytes are recorded.
#[derive(Clone)]
enum Tap {
    /// An exec or shell: what is typed and shown, into the asciicast.
    Terminal(Arc<std::sync::Mutex<recording::Recorder>>),
    /// sftp: each request with its paths into the asciicast; file contents counted.
    Sftp(
        Arc<std::sync::Mutex<recording::Recorder>>,
        Arc<std::sync::Mutex<sftp::Sftp>>,
    ),
}

impl Tap {
    fn recorder(&self) -> &std::sync::Mutex<recording::Recorder> {
        match self {
            Tap::Terminal(r) | Tap::Sftp(r, _) => r,
        }
    }

    /// Runs `f` on the recorder; Err (why the session must end) when it failed.
    fn with(&self, f: impl FnOnce(&mut recording::Recorder)) -> std::result::Result<(), String> {
        if recording::with(self.recorder(), f) {
            Ok(())
        } else {
            Err(RECORDING_FAILED.into())
        }
    }

    /// Records what the engineer sent, before it is passed on.
    fn client(&self, data: &[u8]) -> std::result::Result<(), String> {
        match self {
            Tap::Terminal(_) => self.with(|r| r.input(data)),
            Tap::Sftp(_, sftp) => {
                let lines = sftp
                    .lock()
                    .map_err(|_| SFTP_UNREADABLE.to_string())?
                    .requests(data)
                    .map_err(|e| {
                        tracing::warn!(error = %e, "relay: an sftp request stream does not parse");
                        SFTP_UNREADABLE.to_string()
                    })?;
                self.with(|r| lines.iter().for_each(|l| r.note(l)))
            }
        }
    }

    /// Records what the target sent back (for sftp, only the handles it hands out).
    fn target(&self, data: &[u8]) -> std::result::Result<(), String> {
        match self {
            Tap::Terminal(_) => self.with(|r| r.output(data)),
            Tap::Sftp(_, sftp) => sftp
                .lock()
                .map_err(|_| SFTP_UNREADABLE.to_string())?
                .replies(data)
                .map_err(|e| {
                    tracing::warn!(error = %e, "relay: an sftp reply stream does not parse");
                    SFTP_UNREADABLE.to_string()
                }),
        }
    }
}

/// Why an sftp session ends when its stream cannot be read (so cannot be recorded).
const SFTP_UNREADABLE: &str = "its sftp requests could not be read for the recording";

/// What one relayed channel moved, and why it was cut (None: it ended by itself).
struct Pumped {
    bytes_in: u64,
    bytes_out: u64,
    cut: Option<String>,
}

/// Moves one channel's traffic both ways until either side closes or `kill` fires
/// (an admin, shutdown, or [`watch_grants`] when the grant ends). Each direction runs in its own task: a direction blocked on flow control
/// must never stop the other from draining (that deadlocks bulk transfers).
///
/// `rec` records the bytes (terminal sessions); `session` is the engineer's SSH
/// session for exit signals and the messages a terminal shows when a session is cut
/// (None for a forwarded port, whose bytes are the application's own).
async fn pump(
    client: Channel<Msg>,
    up: Channel<russh::client::Msg>,
    tap: Option<Tap>,
    kill: &Arc<Cut>,
    session: Option<russh::server::Handle>,
) -> Pumped {
    let terminal = session.is_some();
    // Records, and says whether the bytes may pass: a recording that can no longer be
    // written (or an sftp stream that cannot be read) ends the session (fail closed),
    // rather than let it go on unrecorded.
    let recording_cut = kill.clone();
    let record = move |f: &dyn Fn(&Tap) -> std::result::Result<(), String>| match &tap {
        Some(tap) => match f(tap) {
            Ok(()) => true,
            Err(why) => {
                recording_cut.cut(&why);
                false
            }
        },
        None => true,
    };
    let (record_in, record_out) = (record.clone(), record);
    let client_id = client.id();
    let (mut client_rx, client_tx) = client.split();
    let (mut up_rx, up_tx) = up.split();
    let client_tx = Arc::new(client_tx);
    // Counted as they pass, so a cut session still accounts for what it moved.
    let (counted_in, counted_out) = (
        Arc::new(std::sync::atomic::AtomicU64::new(0)),
        Arc::new(std::sync::atomic::AtomicU64::new(0)),
    );
    let count = |c: &std::sync::atomic::AtomicU64, n: usize| {
        c.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    };
    // Client → target.
    let n = counted_in.clone();
    let mut inbound = tokio::spawn(async move {
        while let Some(msg) = client_rx.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    count(&n, data.len());
                    if !record_in(&|t| t.client(&data)) || up_tx.data_bytes(data).await.is_err() {
                        break;
                    }
                }
                ChannelMsg::WindowChange {
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                } => {
                    let _ = record_in(&|t| t.with(|r| r.resize(col_width, row_height)));
                    let _ = up_tx
                        .window_change(col_width, row_height, pix_width, pix_height)
                        .await;
                }
                ChannelMsg::Signal { signal } => {
                    let _ = up_tx.signal(signal).await;
                }
                ChannelMsg::Eof => {
                    let _ = up_tx.eof().await;
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        let _ = up_tx.close().await;
    });
    // Target → client.
    let to_client = client_tx.clone();
    let n = counted_out.clone();
    let mut outbound = tokio::spawn(async move {
        while let Some(msg) = up_rx.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    count(&n, data.len());
                    if !record_out(&|t| t.target(&data))
                        || to_client.data_bytes(data).await.is_err()
                    {
                        break;
                    }
                }
                ChannelMsg::ExtendedData { data, ext } => {
                    count(&n, data.len());
                    if !record_out(&|t| t.target(&data)) {
                        break;
                    }
                    let _ = to_client.extended_data_bytes(ext, data).await;
                }
                ChannelMsg::ExitStatus { exit_status } => {
                    let _ = to_client.exit_status(exit_status).await;
                }
                // Killed by a signal on the target: the engineer's ssh says so.
                ChannelMsg::ExitSignal {
                    signal_name,
                    core_dumped,
                    error_message,
                    lang_tag,
                } => {
                    let _ = record_out(&|t| {
                        t.with(|r| r.note(&format!("exit signal {signal_name:?}")))
                    });
                    if let Some(session) = &session {
                        let _ = session
                            .exit_signal_request(
                                client_id,
                                signal_name,
                                core_dumped,
                                error_message,
                                lang_tag,
                            )
                            .await;
                    }
                }
                ChannelMsg::Eof => {
                    let _ = to_client.eof().await;
                }
                // The target refused the shell, command or subsystem.
                ChannelMsg::Failure => {
                    let _ = to_client
                        .extended_data_bytes(
                            1,
                            b"twokey: the target refused this request\r\n".to_vec(),
                        )
                        .await;
                    let _ = to_client.exit_status(1).await;
                    break;
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
    });
    let cut = tokio::select! {
        // First, so a task that stopped because of a cut reports the cut.
        biased;
        why = kill.wait() => Some(why),
        _ = &mut outbound => {
            inbound.abort();
            None
        }
        _ = &mut inbound => {
            // The client is done; let the target's last words through, unless a cut
            // (the grant, an admin, the recording) comes first.
            tokio::select! {
                biased;
                why = kill.wait() => Some(why),
                _ = &mut outbound => None,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {
                    outbound.abort();
                    None
                }
            }
        }
    };
    if let Some(why) = &cut {
        inbound.abort();
        outbound.abort();
        if terminal {
            let text = if why == GRANT_ENDED {
                "the grant has ended or was revoked; closing".to_string()
            } else {
                format!("session ended: {why}")
            };
            let _ = client_tx
                .extended_data_bytes(1, format!("\r\ntwokey: {text}\r\n").into_bytes())
                .await;
            let _ = client_tx.exit_status(255).await;
        }
    }
    let _ = client_tx.eof().await;
    let _ = client_tx.close().await;
    use std::sync::atomic::Ordering;
    Pumped {
        bytes_in: counted_in.load(Ordering::Relaxed),
        bytes_out: counted_out.load(Ordering::Relaxed),
        cut,
    }
}

/// A forwarded port (`ssh -L`), when the role allows it: the target's sshd opens the
/// connection, over the relay's own upstream login. Its bytes are the application's,
/// so they are counted and audited, not recorded; it is cut like any session.
async fn forward(
    state: AppState,
    admitted: Admitted,
    client: Channel<Msg>,
    reply: russh::server::ChannelOpenHandle,
    (host, port): (String, u32),
    (from_host, from_port): (String, u32),
) {
    let id = uuid::Uuid::new_v4().to_string();
    let g = &admitted.grant;
    let destination = format!("{host}:{port}");
    let cut = state.live_sessions.register(&id, &g.id);
    let _live = Registered(&state.live_sessions, &id);
    let opened = async {
        let handle = tokio::time::timeout(
            Duration::from_secs(20),
            connect_upstream(&state, &admitted, &id),
        )
        .await
        .map_err(|_| "the target did not complete the login in time".to_string())??;
        let up = handle
            .channel_open_direct_tcpip(host.clone(), port, from_host, from_port)
            .await
            .map_err(|e| format!("the target could not open {destination}: {e}"))?;
        Ok::<_, String>((handle, up))
    }
    .await;
    let (_handle, up) = match opened {
        Ok(o) => o,
        Err(e) => {
            tracing::info!(error = %e, "relay: a forwarded port could not be opened");
            audit(
                &state,
                &g.user_email,
                "session.forward_failed",
                &g.id,
                json!({ "forward_id": id, "destination": destination, "error": e }),
            )
            .await;
            reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
            return;
        }
    };
    // Audited before any byte passes: a forward that cannot be audited is refused.
    if !audit(
        &state,
        &g.user_email,
        "session.forward_opened",
        &g.id,
        json!({ "forward_id": id, "destination": destination }),
    )
    .await
    {
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        return;
    }
    reply.accept().await;
    let pumped = pump(client, up, None, &cut, None).await;
    audit(
        &state,
        &g.user_email,
        "session.forward_closed",
        &g.id,
        json!({
            "forward_id": id, "destination": destination,
            "reason": pumped.cut.unwrap_or_else(|| "closed".into()),
            "bytes_from_client": pumped.bytes_in, "bytes_to_client": pumped.bytes_out,
        }),
    )
    .await;
}

/// Tells the engineer why their session could not start, closes the channel, and
/// hands the error back for the audit.
async fn tell_failure(client: &Channel<Msg>, resource: &str, e: String) -> String {
    let _ = client
        .extended_data_bytes(
            1,
            format!("twokey: cannot open a session on {resource}: {e}\r\n").into_bytes(),
        )
        .await;
    let _ = client.exit_status(255).await;
    let _ = client.eof().await;
    let _ = client.close().await;
    e
}

/// The request that starts a relayed session.
enum Start {
    Exec(Vec<u8>),
    Shell,
    Subsystem(String),
}

/// Takes a session off the live list when dropped.
struct Registered<'a>(&'a LiveSessions, &'a str);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.0.remove(self.1);
    }
}

type PtyRequest = (String, u32, u32, u32, u32, Vec<(russh::Pty, u32)>);

async fn open_upstream(
    state: &AppState,
    admitted: &Admitted,
    session_id: &str,
    pty: Option<PtyRequest>,
    kill: &Cut,
) -> std::result::Result<(russh::client::Handle<Upstream>, Channel<russh::client::Msg>), String> {
    // Bounded: a target that stalls mid-login must not hang the session forever. And a
    // session cut meanwhile (revoked, ended by an admin) never reaches the target.
    let handle = tokio::select! {
        up = tokio::time::timeout(Duration::from_secs(20), connect_upstream(state, admitted, session_id)) => up
            .map_err(|_| "the target did not complete the login in time".to_string())??,
        why = kill.wait() => return Err(format!("session ended: {why}")),
    };
    let ch = handle
        .channel_open_session()
        .await
        .map_err(|e| format!("upstream session: {e}"))?;
    if let Some((term, c, r, pw, ph, modes)) = pty {
        ch.request_pty(false, &term, c, r, pw, ph, &modes)
            .await
            .map_err(|e| e.to_string())?;
    }
    // Reaching the target took time: the grant must still be live now, just before the
    // command, shell or subsystem is sent.
    if !grant_is_live(state, &admitted.grant.id).await {
        return Err("the grant has ended or was revoked".into());
    }
    Ok((handle, ch))
}

/// Appends one audit event in its own transaction; false when it could not be written.
/// A failure is logged at error level, never dropped silently; callers for which the
/// event matters (a forward opening) refuse what it would have recorded.
async fn audit(
    state: &AppState,
    actor: &str,
    action: &str,
    subject: &str,
    details: serde_json::Value,
) -> bool {
    let written = async {
        let mut tx = store::begin_write(&state.db).await?;
        crate::audit::append(
            &mut tx,
            state.now_ms(),
            &crate::audit::NewEvent {
                actor,
                action,
                subject,
                details,
            },
        )
        .await?;
        tx.commit().await?;
        Ok::<_, Error>(())
    }
    .await;
    match written {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, action, subject, "relay: an audit event could not be written");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("rm -rf *", "rm -rf /"));
        assert!(glob_match("shutdown*", "shutdown -h now"));
        assert!(!glob_match("rm -rf *", "ls"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "abbc"));
    }

    #[test]
    fn cidrs() {
        let ip = |s: &str| s.parse().unwrap();
        assert!(cidr_contains("127.0.0.0/8", ip("127.0.0.1")));
        assert!(!cidr_contains("10.0.0.0/8", ip("127.0.0.1")));
        assert!(cidr_contains("127.0.0.1", ip("127.0.0.1")));
        assert!(cidr_contains("::1/128", ip("::1")));
        assert!(!cidr_contains("10.0.0.0/8", ip("::1")));
        assert!(cidr_contains("0.0.0.0/0", ip("8.8.8.8")));
    }
}
