//! One PostgreSQL connection through the relay, from its first byte to its last: begun
//! and authenticated ([`super::startup`]), admitted like any relay session, opened
//! (row and `session.started`), logged in upstream ([`super::upstream`]), relayed both
//! ways message by message while the [`Tracker`] writes the transcript, and closed
//! (transcript hash, row, `session.ended`) however it ends: the client leaving, the
//! target going away, the grant ending, an administrator, an idle timeout.
//!
//! Messages are framed and passed on whole, in batches, never re-encoded; a message
//! that cannot be framed or is over the bound ends the session with an error. The only
//! messages changed are a refused statement and the server's answer to what took its
//! place ([`super::judge`]); each refusal is audited. A cut
//! reaches the client as a FATAL ErrorResponse between two messages, and the backend
//! is cancelled and disconnected.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};

use super::PgRelay;
use super::cancel::{CancelKeys, Upstream};
use super::judge::Judge;
use super::judge::{Hint, Refused};
use super::scram::Verifier;
use super::startup::{self, Begun, fatal};
use super::tls::PgStream;
use super::tracker::{Hold, Refusal, Tracker};
use super::upstream;
use super::wire::{self, WireError};
use crate::config::DbAccess;
use crate::policy::{Decision, HeldStatus};
use crate::recording::transcript::{self, Header, Transcript};
use crate::relay::admission::{self, Presented};
use crate::relay::lifecycle::{self, audit};
use crate::relay::live::{Cut, Registered};
use crate::store;

/// A held statement refused: its rule is `review`, and the hint says it did not run.
fn held_refusal(message: impl Into<Box<str>>, hint: Hint) -> Refused {
    Refused {
        hint,
        ..Refused::plain("review", message)
    }
}

/// What the engineer is told when a password does not verify, whatever the reason (no
/// such user, no relay password, a wrong one): nothing here tells a stranger who has a
/// grant.
const BAD_PASSWORD_HINT: &str = "get a relay password for your live grant: twokey db-login RESOURCE (or on the request page), or connect with: twokey psql RESOURCE";

/// Whether a live session of a role must connect again to run under `new`: what its
/// start set up changed ([`super::judge::set_up_differently`]), or the transcript's row
/// cap. The other rules apply at the session's next statement.
pub(crate) fn must_reconnect(
    old: &crate::config::RoleConfig,
    new: &crate::config::RoleConfig,
) -> bool {
    super::judge::set_up_differently(&old.sql, &new.sql)
        || old.transcript_rows != new.transcript_rows
}

/// Ends a held action (withdrawn, expired) to its end, whatever becomes of the task
/// that asked ([`lifecycle::to_the_end`]).
async fn end_held(
    state: &crate::state::AppState,
    id: &str,
    to: HeldStatus,
    why: String,
) -> crate::Result<bool> {
    let (state, id) = (state.clone(), id.to_string());
    lifecycle::to_the_end(async move { crate::access::held::end(&state, &id, to, &why).await })
        .await
}

/// Claims an approved held action to run, to its end ([`lifecycle::to_the_end`]).
async fn claim_held(state: &crate::state::AppState, id: &str) -> crate::Result<bool> {
    let (state, id) = (state.clone(), id.to_string());
    lifecycle::to_the_end(async move { crate::access::held::claim_run(&state, &id).await }).await
}

/// What the target is sent at startup: the client's parameters, with the role's rules
/// on top (a fixed search_path in the place of the client's, read-only transactions).
fn upstream_parameters(
    passed: Vec<(String, String)>,
    policy: &crate::config::SqlPolicy,
) -> Vec<(String, String)> {
    let mut params: Vec<(String, String)> = passed
        .into_iter()
        .filter(|(k, _)| !(k == "search_path" && policy.search_path.is_some()))
        .collect();
    if let Some(path) = &policy.search_path {
        params.push(("search_path".into(), path.clone()));
    }
    if policy.read_only {
        params.push(("default_transaction_read_only".into(), "on".into()));
    }
    params
}

/// Serves one connection.
pub async fn serve(relay: Arc<PgRelay>, socket: tokio::net::TcpStream, peer: std::net::SocketAddr) {
    let state = relay.state.clone();
    let grace = relay.limits.login_grace_time;
    let allow_plaintext = relay.pg.allow_plaintext;
    let begun = tokio::time::timeout(grace, async {
        let begun = startup::begin(&state, socket, allow_plaintext).await?;
        match begun {
            Begun::Startup(s) => admit(&relay, *s, peer).await.map(Some),
            Begun::Cancel(pid, secret) => {
                cancel(&relay, pid, &secret, peer).await;
                Ok(None)
            }
            Begun::Refused(why) => {
                refused(&relay, "", "", &why, peer).await;
                Ok(None)
            }
        }
    })
    .await;
    let admitted = match begun {
        Ok(Ok(Some(Some(a)))) => a,
        Ok(Ok(_)) => return,
        Ok(Err(e)) => {
            tracing::info!(peer = %peer.ip(), error = %e, "postgres relay: a connection failed before its session");
            return;
        }
        Err(_) => {
            tracing::info!(peer = %peer.ip(), "postgres relay: a connection took too long to log in; closed");
            return;
        }
    };
    run(&relay, admitted, peer).await;
}

/// A client that proved its relay password and whose grant is live.
struct Admitted {
    stream: PgStream,
    buf: BytesMut,
    admitted: admission::Admitted,
    startup: Vec<(String, String)>,
}

/// Checks the relay password and admits the grant; a refusal is told and audited.
async fn admit(
    relay: &PgRelay,
    s: startup::Startup,
    peer: std::net::SocketAddr,
) -> Result<Option<Admitted>, WireError> {
    let state = &relay.state;
    let startup::Startup {
        mut stream,
        user,
        resource,
        passed,
    } = s;
    let found = store::relay_db_login_latest(&state.db, &user, &resource, state.now_ms()).await;
    let (grant_id, verifier) = match found {
        Ok(Some((g, v))) => (Some(g), Verifier::parse(&v).ok()),
        Ok(None) => (None, None),
        Err(e) => {
            tracing::error!(error = %e, "postgres relay: the store cannot be read; refusing");
            fatal(
                &mut stream,
                "08000",
                "twokey cannot check grants right now",
                None,
            )
            .await;
            return Ok(None);
        }
    };
    let mut buf = BytesMut::with_capacity(1024);
    let proved = startup::authenticate(&mut stream, &mut buf, verifier.as_ref()).await?;
    let (true, Some(grant_id)) = (proved, grant_id) else {
        let text = format!("password authentication failed for user {user:?} on {resource:?}");
        fatal(
            &mut stream,
            "28P01",
            &text,
            Some(&BAD_PASSWORD_HINT.replace("RESOURCE", &resource)),
        )
        .await;
        refused(
            relay,
            &user,
            &resource,
            "password authentication failed",
            peer,
        )
        .await;
        return Ok(None);
    };
    let is_relay_resource = state
        .config()
        .resource(&resource)
        .is_some_and(|r| state.config().db_access(r) == DbAccess::Relay);
    if !is_relay_resource {
        let text = format!("{resource} is not reached through twokey's relay");
        fatal(&mut stream, "3D000", &text, None).await;
        refused(relay, &user, &resource, &text, peer).await;
        return Ok(None);
    }
    let presented = Presented {
        grant_id: grant_id.clone(),
        serial: 0,
        key_id: format!("relay-password:{user}"),
        peer: Some(peer),
    };
    let admitted = match admission::authorize(state, &resource, presented).await {
        Ok((a, _)) => a,
        Err(r) => {
            fatal(&mut stream, "28000", r.text(), None).await;
            refused(relay, &user, &resource, r.text(), peer).await;
            return Ok(None);
        }
    };
    // Rightfully held too: the holder was not forced out and may still ask for it.
    if !admission::grant_is_live(state, &grant_id).await {
        let text = format!("your grant on {resource} is no longer live");
        fatal(&mut stream, "28000", &text, None).await;
        refused(relay, &user, &resource, &text, peer).await;
        return Ok(None);
    }
    Ok(Some(Admitted {
        stream,
        buf,
        admitted,
        startup: passed,
    }))
}

/// A refusal, logged and audited; the same (user, resource, address, reason) at most once
/// a minute, so retrying a wrong password cannot flood the audit chain.
async fn refused(
    relay: &PgRelay,
    user: &str,
    resource: &str,
    reason: &str,
    peer: std::net::SocketAddr,
) {
    tracing::info!(user, resource, reason, peer = %peer.ip(), "postgres relay refused a connection");
    let key = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(format!("{user}\0{resource}\0{}", peer.ip()));
        u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
    };
    if !relay.refusals.first_in_a_while(key, reason) {
        return;
    }
    let state = &relay.state;
    // Refused whether or not this can be audited (a failure is logged there).
    let _ = audit(
        state,
        "relay",
        "relay.refused",
        resource,
        json!({ "protocol": "postgres", "user": user, "reason": reason, "peer": peer.ip().to_string() }),
    )
    .await;
}

/// A CancelRequest: forwarded to the backend of the session whose key it is, else
/// dropped (logged, never answered: a server does not answer cancels either).
async fn cancel(relay: &PgRelay, pid: i32, secret: &[u8], peer: std::net::SocketAddr) {
    match relay.keys.lookup(pid, secret) {
        Some(u) => {
            tracing::info!(session = %u.session, "postgres relay: forwarding a cancel");
            u.cancelled.notify_waiters();
            upstream::cancel(&u.host, u.port, u.pid, &u.secret).await;
        }
        None => {
            tracing::warn!(peer = %peer.ip(), "postgres relay: a cancel with a key it did not give out; ignored");
        }
    }
}

/// The session, from its opening to its close.
async fn run(relay: &Arc<PgRelay>, a: Admitted, peer: std::net::SocketAddr) {
    let state = &relay.state;
    let Admitted {
        mut stream,
        buf: client_buf,
        admitted,
        startup,
    } = a;
    let grant = admitted.grant.clone();
    // The role's rules as of `rules`' latest value: the judge follows its reloads.
    let mut rules = state.config_updates();
    let config = rules.borrow_and_update().clone();
    let Some((resource, role)) = config.role(&grant.resource, &grant.role) else {
        fatal(
            &mut stream,
            "28000",
            "the role of your grant is no longer in the policy",
            None,
        )
        .await;
        return;
    };
    let session_id = uuid::Uuid::new_v4().to_string();
    let instance = state
        .relay
        .as_ref()
        .map(|k| k.instance.id.clone())
        .unwrap_or_default();
    let limit = state
        .config()
        .relay
        .as_ref()
        .map_or(crate::config::DEFAULT_MAX_RECORDING_BYTES, |r| {
            r.max_recording_bytes
        });
    let header = Header {
        format: transcript::FORMAT.into(),
        version: 1,
        timestamp: state.clock.now().timestamp(),
        session: session_id.clone(),
        resource: grant.resource.clone(),
        user: grant.user_email.clone(),
        database: resource.database.clone().unwrap_or_default(),
        rows_cap: role.transcript_rows,
    };
    let dir = state.config().server.data_dir.join("recordings");
    let transcript = match Transcript::create(&dir, &header, limit) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "postgres relay: the transcript cannot be written; the session does not start");
            fatal(
                &mut stream,
                "58030",
                "twokey cannot record this session right now",
                None,
            )
            .await;
            return;
        }
    };
    let path = transcript.path().display().to_string();
    let opened = lifecycle::open(
        state,
        &lifecycle::Opening {
            id: &session_id,
            admitted: &admitted,
            recording: &path,
            instance: &instance,
            protocol: "postgres",
        },
    )
    .await;
    if let Err(e) = opened {
        tracing::error!(error = %e, session = %session_id, "postgres relay: the session's start could not be audited; it does not start");
        let _ = std::fs::remove_file(&path);
        fatal(
            &mut stream,
            "58030",
            "twokey cannot audit this session right now",
            None,
        )
        .await;
        return;
    }
    let cut = state.live_sessions.register(&session_id, &grant.id);
    let _registered = Registered(&state.live_sessions, &session_id);
    // A reload between reading the role and registering the session is one whose
    // ending of sessions may have missed it: it starts again under the new rules.
    let reloaded = rules.has_changed().unwrap_or(true);
    let judge = Judge::following(
        Arc::new(role.sql.clone()),
        rules,
        &grant.resource,
        &grant.role,
        relay.shapes.clone(),
    );
    let tracker = Arc::new(std::sync::Mutex::new(Tracker::new(
        transcript,
        role.transcript_rows,
        judge,
    )));
    let counters = Arc::new(Counters::default());
    let max = relay.pg.max_message_bytes as usize;
    let masking = !role.sql.mask.is_empty();
    let catalog = masking.then(|| super::mask::catalog_query(&role.sql.mask));
    let connected = if reloaded {
        Err(upstream::Failed {
            code: "57P01".into(),
            text: "twokey's policy was reloaded as this session started: connect again".into(),
        })
    } else {
        upstream::connect(
            state,
            &relay.upstreams,
            &grant,
            resource,
            role,
            &upstream_parameters(startup, &role.sql),
            max,
        )
        .await
    };
    let connected = match (connected, &catalog) {
        (Ok(mut up), Some(q)) => upstream::catalog_rows(&mut up, q, max).await.map(|rows| {
            up.catalog = rows;
            up
        }),
        (c, _) => c,
    };
    // Fail closed: a role that masks is relayed only with its masks in place.
    let connected = connected.and_then(|up| {
        if masking {
            let unmasked = || upstream::Failed {
                code: "58000".into(),
                text: "twokey cannot mask this role's columns right now".into(),
            };
            let key = relay.mask_key.ok_or_else(unmasked)?;
            let mut t = tracker.lock().map_err(|_| unmasked())?;
            t.set_masks(Arc::new(super::mask::Masks::resolve(
                &role.sql.mask,
                &up.catalog,
                key,
            )));
        }
        Ok(up)
    });
    let reason = match connected {
        Err(f) => {
            fatal(&mut stream, &f.code, &f.text, None).await;
            format!("failed: {}", f.text)
        }
        Ok(up) => {
            relay_session(
                relay,
                &session_id,
                stream,
                client_buf,
                up,
                &tracker,
                &counters,
                &cut,
                &grant,
            )
            .await
        }
    };
    // A statement still held (or approved, not yet run) when its session ended never
    // runs: withdrawn now, with the session's end as the reason.
    if let Err(e) = crate::access::held::withdraw_session(state, &session_id, &reason).await {
        tracing::warn!(error = %e, session = %session_id, "postgres relay: cannot withdraw the session's held statements; the sweeper will");
    }
    let finished = match tracker.lock() {
        Ok(mut t) => {
            if reason != "closed" {
                t.note(&format!("session ended: {reason}"));
            }
            t.transcript
                .finish()
                .map_err(crate::relay::RelayError::Recording)
        }
        Err(_) => Err(crate::relay::RelayError::Recording(std::io::Error::other(
            "the transcript's lock was poisoned",
        ))),
    };
    let closed = lifecycle::close(
        state,
        lifecycle::Closing {
            id: &session_id,
            grant: &grant,
            reason: &reason,
            bytes_in: counters.from_client.load(Ordering::Relaxed),
            bytes_out: counters.to_client.load(Ordering::Relaxed),
            recording: finished,
            recording_path: &path,
        },
    )
    .await;
    if let Err(e) = closed {
        tracing::error!(error = %e, session = %session_id, "postgres relay: the session's end could not be recorded");
    }
    tracing::info!(session = %session_id, peer = %peer.ip(), reason, "postgres relay session ended");
}

/// Refusals audited per session; past these only the transcript holds them.
const AUDITED_REFUSALS: u64 = 100;

#[derive(Default)]
struct Counters {
    refused: AtomicU64,
    from_client: AtomicU64,
    to_client: AtomicU64,
    /// Milliseconds since the session's start at the last message either way.
    last: AtomicU64,
}

/// How one direction of the relay stopped.
enum Stop {
    /// The client said Terminate or closed.
    Closed,
    /// Cut from outside, with the reason.
    Cut(String),
    /// The other side went away or broke the protocol.
    Failed(String),
}

/// Relays an admitted, logged-in session until it ends; returns why it ended.
#[allow(clippy::too_many_arguments)]
async fn relay_session(
    relay: &Arc<PgRelay>,
    session_id: &str,
    mut client: PgStream,
    client_buf: BytesMut,
    up: upstream::Connected,
    tracker: &Arc<std::sync::Mutex<Tracker>>,
    counters: &Arc<Counters>,
    cut: &Arc<Cut>,
    grant: &store::GrantRow,
) -> String {
    let cancelled = Arc::new(tokio::sync::Notify::new());
    let (pid, secret, _key) = CancelKeys::register(
        &relay.keys,
        Upstream {
            host: up.host.clone(),
            port: up.port,
            pid: up.pid,
            secret: up.secret.clone(),
            session: session_id.to_string(),
            cancelled: cancelled.clone(),
        },
    );
    let (backend_host, backend_port, backend_pid, backend_secret) =
        (up.host.clone(), up.port, up.pid, up.secret.clone());
    // The server's parameters, as the judge must know them (how it reads strings).
    if let Ok(mut t) = tracker.lock() {
        let _ = scan(&up.greeting, usize::MAX, false, |typ, _, body| {
            t.from_server(typ, body);
            true
        });
    }
    // AuthenticationOk, the server's parameters, the relay's own key, ReadyForQuery.
    let mut hello = wire::authentication(0, b"");
    hello.extend_from_slice(&up.greeting);
    hello.extend_from_slice(&wire::backend_key_data(pid, &secret));
    hello.extend_from_slice(&wire::message(b'Z', b"I"));
    if client.write_all(&hello).await.is_err() || client.flush().await.is_err() {
        return "closed".into();
    }
    let max = relay.pg.max_message_bytes as usize;
    let (client_r, client_w) = tokio::io::split(client);
    let (up_r, up_w) = tokio::io::split(up.stream);
    let started = Instant::now();
    // What the relay itself tells the client (where a held statement waits), written
    // by the direction that owns the client's writing half, between two messages.
    let (notices, notices_rx) = tokio::sync::mpsc::unbounded_channel();
    let answered = Arc::new(tokio::sync::Notify::new());
    let grant = Arc::new(grant.clone());
    let pump = |way, from, first: BytesMut, to| Pump {
        relay: relay.clone(),
        session: session_id.to_string(),
        way,
        from,
        to,
        buf: start_buffer(&first),
        filled: false,
        tracker: tracker.clone(),
        counters: counters.clone(),
        started,
        max,
        grant: grant.clone(),
        cut: cut.clone(),
        notices: notices.clone(),
        cancelled: cancelled.clone(),
        answered: answered.clone(),
    };
    let c2u = tokio::spawn(client_to_target(
        pump(Way::ToTarget, client_r, client_buf, up_w),
        cut.clone(),
    ));
    let u2c = tokio::spawn(target_to_client(
        pump(Way::ToClient, up_r, up.buf, client_w),
        cut.clone(),
        notices_rx,
    ));
    let idle = relay.limits.idle_timeout;
    let watch_idle = {
        let (counters, tracker, cut) = (counters.clone(), tracker.clone(), cut.clone());
        async move {
            // Also the transcript's write-out for a session that went quiet.
            let every = (idle / 4).clamp(Duration::from_millis(100), transcript::FLUSH_EVERY);
            loop {
                tokio::time::sleep(every).await;
                let last = Duration::from_millis(counters.last.load(Ordering::Relaxed));
                // Quiet since the last look: the transcript lets go of its buffer too.
                let quiet = started.elapsed().saturating_sub(last) >= every;
                let busy = tracker
                    .lock()
                    .map(|mut t| {
                        if quiet {
                            t.transcript.release();
                        } else {
                            t.transcript.flush();
                        }
                        t.busy()
                    })
                    .unwrap_or(false);
                if !busy && started.elapsed().saturating_sub(last) >= idle {
                    cut.cut(&format!("idle for {}s", idle.as_secs()));
                    return;
                }
            }
        }
    };
    let idle_task = tokio::spawn(watch_idle);
    let mut c2u = c2u;
    let mut u2c = u2c;
    let stop = tokio::select! {
        r = &mut c2u => {
            // The client is done: the target gets its Terminate (passed on) and the
            // connection closes; what the target still sends goes nowhere.
            u2c.abort();
            r.unwrap_or(Stop::Failed("the relay's task failed".into()))
        }
        r = &mut u2c => {
            c2u.abort();
            r.unwrap_or(Stop::Failed("the relay's task failed".into()))
        }
    };
    idle_task.abort();
    // Whatever the backend still runs stops now (it ends as its client is gone).
    let busy = tracker.lock().map(|t| t.busy()).unwrap_or(true);
    if busy || matches!(stop, Stop::Cut(_)) {
        upstream::cancel(&backend_host, backend_port, backend_pid, &backend_secret).await;
    }
    // A client that leaves as it is told of its cut was cut, not closed.
    let stop = match (stop, cut.reason()) {
        (Stop::Closed, Some(reason)) => Stop::Cut(reason),
        (stop, _) => stop,
    };
    match stop {
        Stop::Closed => "closed".into(),
        Stop::Cut(reason) => reason,
        Stop::Failed(why) => format!("failed: {why}"),
    }
}

/// Which way a [`Pump`] carries messages.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    ToTarget,
    ToClient,
}

/// One direction of a session: what one side sends, read into a buffer, framed, shown
/// to the tracker and written whole to the other side, a batch at a time.
struct Pump {
    relay: Arc<PgRelay>,
    session: String,
    way: Way,
    from: ReadHalf<PgStream>,
    to: WriteHalf<PgStream>,
    buf: Vec<u8>,
    /// Whether the last read filled the buffer (a stream: the buffer may grow).
    filled: bool,
    tracker: Arc<std::sync::Mutex<Tracker>>,
    counters: Arc<Counters>,
    started: Instant,
    max: usize,
    grant: Arc<store::GrantRow>,
    cut: Arc<Cut>,
    notices: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    /// The client's cancels (its CancelRequests with this session's key).
    cancelled: Arc<tokio::sync::Notify>,
    /// Told whenever the server's messages were passed on (so the client's direction,
    /// waiting for answers, looks again).
    answered: Arc<tokio::sync::Notify>,
}

/// Why a [`Pump::pass`] could not pass on what it read.
enum PassError {
    /// The sender broke the framing, or a message is over the bound.
    Bad(WireError),
    /// The receiving side is gone.
    Closed,
    /// The client left while its statement was held.
    Left,
}

/// How often a held statement's decision is looked for.
const HELD_CHECK: Duration = Duration::from_millis(200);

impl Pump {
    /// Passes on every complete message buffered, each shown to the tracker first;
    /// whether one was the client's Terminate (nothing after it goes on).
    async fn pass(&mut self) -> Result<bool, PassError> {
        loop {
            let (terminate, held) = self.pass_batch().await?;
            match held {
                None => return Ok(terminate),
                // What was before it has gone on; it and what follows wait for its
                // ruling, then are passed again.
                Some(hold) => self.review(hold).await?,
            }
        }
    }

    /// Passes on the complete messages buffered, up to a held statement if one is.
    async fn pass_batch(&mut self) -> Result<(bool, Option<Hold>), PassError> {
        let way = self.way;
        let mut replaced: Vec<(usize, usize, Vec<u8>)> = Vec::new();
        let mut held = None;
        let (ready, terminate, refusals) = {
            // One lock for the batch. A poisoned tracker can neither judge nor mask:
            // nothing more goes either way.
            let mut tracker = self.tracker.lock().ok();
            if tracker.is_none() {
                return Err(PassError::Closed);
            }
            if way == Way::ToTarget
                && let Some(t) = tracker.as_mut()
            {
                // The batch is judged by one version of the rules: the newest.
                t.refresh_rules();
            }
            let (ready, terminate) =
                scan(&self.buf, self.max, way == Way::ToTarget, |t, at, body| {
                    let Some(tr) = tracker.as_mut() else {
                        return false;
                    };
                    // Where statements are held, one Sync's worth at a time: the rest
                    // waits for the server's answers ([`Tracker::awaiting_answers`]).
                    if way == Way::ToTarget && t != b'X' && tr.awaiting_answers() {
                        return false;
                    }
                    let instead = match way {
                        Way::ToTarget => tr.from_client(t, body),
                        Way::ToClient => tr.from_server(t, body),
                    };
                    if way == Way::ToTarget
                        && let Some(h) = tr.take_hold()
                    {
                        held = Some(h);
                        return false;
                    }
                    if let Some(m) = instead {
                        replaced.push((at, at + 5 + body.len(), m));
                    }
                    true
                })
                .map_err(PassError::Bad)?;
            let refusals = tracker
                .as_mut()
                .map(|t| t.take_refusals())
                .unwrap_or_default();
            (ready, terminate, refusals)
        };
        // Audited before the refusal can reach the client: whoever is told of it can
        // find it in the audit.
        for r in refusals {
            self.audit_refusal(r).await;
        }
        if ready > 0 {
            let written = if replaced.is_empty() {
                self.to.write_all(&self.buf[..ready]).await
            } else {
                let mut out = Vec::with_capacity(ready);
                let mut from = 0;
                for (start, end, m) in &replaced {
                    out.extend_from_slice(&self.buf[from..*start]);
                    out.extend_from_slice(m);
                    from = *end;
                }
                out.extend_from_slice(&self.buf[from..ready]);
                self.to.write_all(&out).await
            };
            if written.is_err() || self.to.flush().await.is_err() {
                return Err(PassError::Closed);
            }
            let counter = match way {
                Way::ToTarget => &self.counters.from_client,
                Way::ToClient => &self.counters.to_client,
            };
            counter.fetch_add(ready as u64, Ordering::Relaxed);
            self.counters
                .last
                .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
            self.buf.drain(..ready);
        }
        Ok((terminate, held))
    }

    /// A held statement: filed for review, the client told where it waits, and waited
    /// on until it is decided, its wait runs out, the session is cut or the client
    /// leaves. The tracker is then told what becomes of it, and it is passed again:
    /// approved (and claimed, so it runs once), it goes on as it was; else it is
    /// refused, with who or why.
    async fn review(&mut self, hold: Hold) -> Result<(), PassError> {
        let state = self.relay.state.clone();
        let note = |t: &Arc<std::sync::Mutex<Tracker>>, text: &str| {
            if let Ok(mut t) = t.lock() {
                t.note(text);
            }
        };
        // Listening for the engineer's cancel from the moment it is held.
        let cancelled = self.cancelled.clone();
        let mut cancel = std::pin::pin!(cancelled.notified());
        cancel.as_mut().enable();
        let filed = {
            let (state, session, grant, h) = (
                state.clone(),
                self.session.clone(),
                self.grant.clone(),
                hold.clone(),
            );
            lifecycle::to_the_end(async move {
                crate::access::held::file(
                    &state,
                    &crate::access::held::Filing {
                        session_id: &session,
                        grant: &grant,
                        protocol: "postgres",
                        action: &h.sql,
                        params: &h.params,
                        action_sha256: &h.sha256,
                        parse: &store::HeldParse {
                            kinds: h.review.kinds.clone(),
                            tables: h.review.tables.clone(),
                        },
                        why: &h.review.why,
                    },
                )
                .await
            })
            .await
        };
        let held = match filed {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, session = %self.session, "postgres relay: a held statement could not be filed; it is refused");
                let r = held_refusal(
                    "twokey could not file it for review right now",
                    Hint::NotRun,
                );
                self.rule(&hold, Some(r));
                return Ok(());
            }
        };
        note(
            &self.tracker,
            &format!("held for review ({}): {}", held.id, hold.review.why),
        );
        // Its approvers read the session so far from the transcript.
        if let Ok(mut t) = self.tracker.lock() {
            t.transcript.flush();
        }
        let url = format!("{}/held/{}", state.config().public_url(), held.id);
        let until = crate::clock::from_millis(held.expires_at).format("%H:%M:%S UTC");
        let approvers = state
            .config()
            .role(&held.resource, &held.role)
            .map(|(_, r)| r.approver_groups.join(", "))
            .unwrap_or_default();
        self.tell(&format!(
            "twokey holds this statement for review: {}. It runs once {} of {} approve it (not you); it waits until {until}: {url}",
            hold.review.why, held.required_approvals, approvers
        ));
        let mut tick = tokio::time::interval(HELD_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let room = self.buf.len() < self.max;
            tokio::select! {
                _ = tick.tick() => {}
                () = &mut cancel => {
                    // Cancelled: it never runs, whatever was decided meanwhile, and
                    // even if the store cannot record the withdrawal now (the relay
                    // never claims it; the sweeper ends it with the session).
                    let _ = end_held(&state, &held.id, HeldStatus::Withdrawn, "cancelled by the engineer".to_string()).await;
                    note(&self.tracker, &format!("held statement withdrawn: cancelled ({})", held.id));
                    self.rule(&hold, Some(held_refusal("cancelled by you while it waited", Hint::NotRun)));
                    return Ok(());
                }
                more = self.read(), if room => {
                    if more {
                        continue;
                    }
                    let _ = end_held(&state, &held.id, HeldStatus::Withdrawn, "the client left while it waited".to_string()).await;
                    return Err(PassError::Left);
                }
            }
            if let Some(reason) = self.cut.reason() {
                let _ = end_held(
                    &state,
                    &held.id,
                    HeldStatus::Withdrawn,
                    format!("its session ended: {reason}"),
                )
                .await;
                // The other direction tells the client of the cut and ends the session.
                std::future::pending::<()>().await;
            }
            let mut decisions = Vec::new();
            let status = match crate::access::held::standing(&state, &held.id).await {
                Ok((status, d)) => {
                    decisions = d;
                    status
                }
                // The wait ends at its time even when the store cannot answer (fail
                // closed: refused).
                Err(_) if state.now_ms() >= held.expires_at => HeldStatus::Expired,
                Err(e) => {
                    tracing::warn!(error = %e, held = %held.id, "postgres relay: cannot read a held statement's decision; will retry");
                    continue;
                }
            };
            let who = |d: Decision| crate::access::held::who_decided(&decisions, d);
            let refused = match status {
                HeldStatus::Pending => continue,
                // Approved as the session is cut: never claimed (the loop withdraws it).
                HeldStatus::Approved if self.cut.reason().is_some() => continue,
                // Approved, and a reload's rules refuse it now: they have the last
                // word, and it is withdrawn, never recorded as run.
                HeldStatus::Approved
                    if let Some(r) = self
                        .tracker
                        .lock()
                        .map(|mut t| t.refused_now(&hold))
                        .unwrap_or_else(|_| {
                            Some(Refused::plain("policy", "twokey cannot judge it now"))
                        }) =>
                {
                    let why = format!("the role's rules refuse it now ({})", r.rule);
                    let _ = end_held(&state, &held.id, HeldStatus::Withdrawn, why).await;
                    Some(r)
                }
                HeldStatus::Approved => match claim_held(&state, &held.id).await {
                    Ok(true) => {
                        let by = who(Decision::Approve);
                        note(
                            &self.tracker,
                            &format!("approved by {by}; run once ({})", held.id),
                        );
                        self.tell(&format!("approved by {by}: twokey runs it now, once"));
                        None
                    }
                    Ok(false) => Some(held_refusal(
                        "it was approved, but its grant is no longer live",
                        Hint::NotRun,
                    )),
                    Err(_) if state.now_ms() >= held.expires_at => Some(held_refusal(
                        "it was approved, but twokey could not record that it runs",
                        Hint::NotRun,
                    )),
                    Err(e) => {
                        tracing::warn!(error = %e, held = %held.id, "postgres relay: cannot claim an approved statement; will retry");
                        continue;
                    }
                },
                HeldStatus::Denied => Some(held_refusal(
                    format!("denied by {}", who(Decision::Deny)),
                    Hint::NotApproved,
                )),
                HeldStatus::Expired => {
                    let _ = end_held(
                        &state,
                        &held.id,
                        HeldStatus::Expired,
                        "not decided within the role's review wait".to_string(),
                    )
                    .await;
                    Some(held_refusal(
                        format!("not approved by {until}"),
                        Hint::NotApproved,
                    ))
                }
                HeldStatus::Withdrawn | HeldStatus::Ran => Some(held_refusal(
                    format!("it is {status} and cannot run again"),
                    Hint::NotRun,
                )),
            };
            if let Some(r) = &refused {
                note(
                    &self.tracker,
                    &format!("held statement refused ({}): {}", held.id, r.message),
                );
            }
            self.rule(&hold, refused);
            return Ok(());
        }
    }

    /// Whether a complete message waits for the server's answers to go on.
    fn waiting_for_answers(&self) -> bool {
        matches!(wire::frame(&self.buf, self.max), Ok(Some(_)))
            && self.tracker.lock().is_ok_and(|t| t.awaiting_answers())
    }

    /// Tells the tracker what becomes of the held statement.
    fn rule(&self, hold: &Hold, refused: Option<Refused>) {
        if let Ok(mut t) = self.tracker.lock() {
            t.rule(hold.sha256.clone(), refused);
        }
    }

    /// A NoticeResponse to the client, from the relay itself.
    fn tell(&self, text: &str) {
        let _ = self
            .notices
            .send(wire::notice_or_error(b'N', "NOTICE", "00000", text, None));
    }

    /// A refused statement, audited (the first [`AUDITED_REFUSALS`] of a session; the
    /// transcript holds them all).
    async fn audit_refusal(&mut self, r: Refusal) {
        let n = self.counters.refused.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(session = %self.session, rule = r.refused.rule, "postgres relay refused a statement");
        if n > AUDITED_REFUSALS {
            return;
        }
        let state = &self.relay.state;
        let _ = audit(
            state,
            "relay",
            "statement.refused",
            &self.session,
            json!({
                "protocol": r.protocol,
                "rule": r.refused.rule,
                "reason": r.refused.message,
                "kinds": r.refused.kinds,
                "tables": r.refused.tables,
                "functions": r.refused.functions,
                "sql_sha256": r.sha256,
                "last_audited": n == AUDITED_REFUSALS,
            }),
        )
        .await;
    }

    /// Reads what the sender has next; false once it has closed (or failed).
    async fn read(&mut self) -> bool {
        reserve(&mut self.buf, self.max, self.filled);
        match self.from.read_buf(&mut self.buf).await {
            Ok(0) | Err(_) => false,
            Ok(_) => {
                self.filled = self.buf.len() == self.buf.capacity();
                true
            }
        }
    }
}

/// Client → target.
async fn client_to_target(mut p: Pump, cut: Arc<Cut>) -> Stop {
    loop {
        match p.pass().await {
            Ok(false) => {}
            Ok(true) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), p.to.shutdown()).await;
                return Stop::Closed;
            }
            Err(PassError::Closed) => {
                return Stop::Failed("the target closed the connection".into());
            }
            Err(PassError::Left) => {
                let _ = p.to.write_all(&wire::message(b'X', b"")).await;
                let _ = tokio::time::timeout(Duration::from_secs(1), p.to.shutdown()).await;
                return Stop::Closed;
            }
            Err(PassError::Bad(e)) => {
                // Told to the client by the other direction, which owns its writing
                // half: as a cut, between two of the target's messages. The cut comes
                // first: the target, once shut down, closes, and the other direction
                // must already know why.
                cut.cut(&format!("the client sent {e}"));
                let _ = tokio::time::timeout(Duration::from_secs(1), p.to.shutdown()).await;
                std::future::pending::<()>().await;
                return Stop::Failed(format!("the client sent {e}"));
            }
        }
        if p.waiting_for_answers() {
            // Until the server has answered (or the client sends more, kept).
            let answered = p.answered.clone();
            let mut notified = std::pin::pin!(answered.notified());
            notified.as_mut().enable();
            if !p.waiting_for_answers() {
                continue;
            }
            let room = p.buf.len() < p.max;
            let more = tokio::select! {
                () = &mut notified => true,
                more = p.read(), if room => more,
            };
            if more {
                continue;
            }
        } else if p.read().await {
            continue;
        }
        let _ = p.to.write_all(&wire::message(b'X', b"")).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), p.to.shutdown()).await;
        return Stop::Closed;
    }
}

/// Target → client; a cut is told to the client between two messages.
async fn target_to_client(
    mut p: Pump,
    cut: Arc<Cut>,
    mut notices: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
) -> Stop {
    enum Next {
        Cut(String),
        Read(bool),
        Notice(Vec<u8>),
    }
    let cut_wait = cut.wait();
    tokio::pin!(cut_wait);
    loop {
        match p.pass().await {
            Ok(_) => p.answered.notify_waiters(),
            Err(PassError::Closed | PassError::Left) => return Stop::Closed,
            Err(PassError::Bad(e)) => {
                fatal(&mut p.to, "08P01", &format!("the target sent {e}"), None).await;
                return Stop::Failed(format!("the target sent {e}"));
            }
        }
        let next = tokio::select! {
            biased;
            reason = &mut cut_wait => Next::Cut(reason),
            Some(n) = notices.recv() => Next::Notice(n),
            more = p.read() => Next::Read(more),
        };
        match next {
            Next::Read(true) => {}
            // Between two of the server's messages: what was read is framed by pass.
            Next::Notice(n) => {
                if p.to.write_all(&n).await.is_err() || p.to.flush().await.is_err() {
                    return Stop::Closed;
                }
            }
            Next::Read(false) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), p.to.shutdown()).await;
                return Stop::Failed("the target closed the connection".into());
            }
            Next::Cut(reason) => {
                let text = format!("terminating connection: {reason}");
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    fatal(&mut p.to, "57P01", &text, None),
                )
                .await;
                let _ = tokio::time::timeout(Duration::from_secs(1), p.to.shutdown()).await;
                return Stop::Cut(reason);
            }
        }
    }
}

/// The complete messages at the front of `buf`, each shown to `see`: how many bytes
/// they take, and whether one was a Terminate (when `terminate` says the client's
/// Terminate counts: nothing after it is passed on).
fn scan(
    buf: &[u8],
    max: usize,
    terminate: bool,
    mut see: impl FnMut(u8, usize, &[u8]) -> bool,
) -> Result<(usize, bool), WireError> {
    let mut at = 0;
    while let Some((t, total)) = wire::frame(&buf[at..], max)? {
        // Told to stop: this message and what follows stay where they are.
        if !see(t, at, &buf[at + 5..at + total]) {
            return Ok((at, false));
        }
        at += total;
        if terminate && t == b'X' {
            return Ok((at, true));
        }
    }
    Ok((at, false))
}

/// A direction's buffer, holding what was read past the startup.
fn start_buffer(first: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(BUFFER.max(first.len()));
    b.extend_from_slice(first);
    b
}

/// A direction's buffer starts small (an idle session holds two of them): one plain
/// allocation that messages pass through, grown by a stream that fills it (to
/// [`STREAM_BUFFER`]) or by a large message, and let go of once that has passed.
const BUFFER: usize = 2 * 1024;
const STREAM_BUFFER: usize = 64 * 1024;

/// Room for the next read: the whole of a large message once its length is known;
/// twice the buffer (up to [`STREAM_BUFFER`]) when the last read filled it; else [`BUFFER`].
fn reserve(buf: &mut Vec<u8>, max: usize, filled: bool) {
    if buf.is_empty() && buf.capacity() > 4 * STREAM_BUFFER {
        *buf = Vec::with_capacity(BUFFER);
        return;
    }
    let need = match wire::frame(buf, max) {
        Ok(None) if buf.len() >= 5 => {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            (1 + len).saturating_sub(buf.len())
        }
        _ => 0,
    };
    let room = if filled {
        buf.capacity().clamp(BUFFER, STREAM_BUFFER)
    } else {
        BUFFER
    };
    buf.reserve(need.max(room));
}
