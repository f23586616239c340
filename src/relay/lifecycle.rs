//! The session lifecycle every protocol shares: [`open`] (the session row and its
//! `session.started` event) before anything reaches the target, and [`close`] (the
//! recording's hash and size, the row, `session.ended`) once it ends, each one
//! transaction. Also the sessions a crash left open ([`close_interrupted`], [`INTERRUPTED`]), and the
//! relay's one way to audit an event outside a session's own transaction ([`audit`]).
//!
//! This must never let a session start that was not audited as started, nor end one
//! without accounting for its recording (even a failed one).

use serde_json::json;

use super::admission::Admitted;
use super::error::RelayError;
use super::instance::{Instance, InstanceClaim};
use crate::error::{Error, Result};
use crate::recording::{self, hash_file};
use crate::state::AppState;
use crate::store::{self, GrantRow};

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

/// Claims this data dir's relay instance and closes the sessions it left open when it
/// last stopped uncleanly ([`close_interrupted`]). Runs at start-up before anything is
/// served, so no page or session sees them open. A process that cannot claim the
/// instance (another twokey runs on the same data dir) leaves them alone.
pub async fn claim_instance(state: &AppState, instance: &Instance) -> Result<InstanceClaim> {
    let lock = std::fs::File::open(&instance.file)
        .map_err(|e| Error::Internal(format!("relay: {}: {e}", instance.file.display())))?;
    match lock.try_lock() {
        Ok(()) => {
            let n = close_interrupted(state, &instance.id).await?;
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

/// A session about to start, as [`open`] records it.
pub struct Opening<'a> {
    /// The new session's id.
    pub id: &'a str,
    pub admitted: &'a Admitted,
    /// Where its recording (or transcript) is written.
    pub recording: &'a str,
    /// This relay instance's id ([`Instance`]).
    pub instance: &'a str,
    /// `ssh` or `postgres`.
    pub protocol: &'a str,
}

/// Opens a session: its row and its `session.started` audit event, in one transaction.
/// Every protocol calls this before anything reaches the target; an Err means the
/// session must not start (fail closed) and the engineer is to be told.
pub async fn open(state: &AppState, s: &Opening<'_>) -> Result<()> {
    let (session_id, admitted) = (s.id, s.admitted);
    let g = &admitted.grant;
    let peer_ip = admitted.peer.map(|p| p.ip().to_string());
    let now = state.now_ms();
    let mut tx = store::begin_write(&state.db).await?;
    store::insert_session(
        &mut tx,
        &store::NewSession {
            id: session_id,
            grant_id: &g.id,
            user_email: &g.user_email,
            resource: &g.resource,
            peer: peer_ip.as_deref(),
            started_at: now,
            recording: s.recording,
            relay_instance: s.instance,
            protocol: s.protocol,
        },
    )
    .await?;
    crate::audit::append(&mut tx, now, &crate::audit::NewEvent { actor: &g.user_email, action: "session.started", subject: &g.id, details: json!({
            "session_id": session_id, "protocol": s.protocol, "resource": g.resource, "serial": admitted.serial.to_string(),
            "key_id": admitted.key_id, "peer": peer_ip,
        }) })
    .await?;
    tx.commit().await?;
    Ok(())
}

/// A session that has ended, as [`close`] records it.
pub struct Closing<'a> {
    pub id: &'a str,
    pub grant: &'a GrantRow,
    /// Why it ended: "closed", a cut's reason, "failed: …".
    pub reason: &'a str,
    /// Bytes from the client, and to it.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The recording as finished, or why it could not be.
    pub recording: std::result::Result<recording::Finished, RelayError>,
    /// The recording's path, named in the audit even when it could not be finished.
    pub recording_path: &'a str,
}

/// Closes a session: its recording's hash and size, its row, and `session.ended`, in one
/// transaction. Every protocol calls this once its session ends, however it ended.
pub async fn close(state: &AppState, c: Closing<'_>) -> Result<()> {
    let (session_id, g) = (c.id, c.grant);
    // The session is ended and audited even when its recording cannot be closed; the
    // audit then says the recording failed.
    let done = c.recording.unwrap_or_else(|e| {
        tracing::error!(error = %e, session = %session_id, "relay: recording could not be closed");
        recording::Finished {
            path: c.recording_path.to_string(),
            bytes: 0,
            sha256: String::new(),
            truncated: false,
            failed: true,
            masked_inputs: 0,
        }
    });
    let now = state.now_ms();
    let mut tx = store::begin_write(&state.db).await?;
    store::end_session(
        &mut tx,
        &store::EndedSession {
            id: session_id,
            ended_at: now,
            reason: c.reason,
            bytes_in: c.bytes_in as i64,
            bytes_out: c.bytes_out as i64,
            recording_bytes: done.bytes as i64,
            recording_sha256: &done.sha256,
            recording_truncated: done.truncated,
            recording_failed: done.failed,
            masked_inputs: i64::from(done.masked_inputs),
        },
    )
    .await?;
    crate::audit::append(
        &mut tx,
        now,
        &crate::audit::NewEvent {
            actor: &g.user_email,
            action: "session.ended",
            subject: &g.id,
            details: json!({
                "session_id": session_id, "reason": c.reason, "recording": done.path,
                "bytes": done.bytes, "sha256": done.sha256,
                "recording_truncated": done.truncated, "recording_failed": done.failed,
                "masked_inputs": done.masked_inputs,
                "bytes_from_client": c.bytes_in, "bytes_to_client": c.bytes_out,
            }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// A new recording for `session_id` under the data dir, capped as configured.
pub(crate) fn recording_for(
    state: &AppState,
    session_id: &str,
) -> std::io::Result<recording::Recorder> {
    let limit = state
        .config()
        .relay
        .as_ref()
        .map_or(crate::config::DEFAULT_MAX_RECORDING_BYTES, |r| {
            r.max_recording_bytes
        });
    recording::Recorder::create(
        &state.config().server.data_dir.join("recordings"),
        session_id,
        limit,
        state.clock.now().timestamp(),
    )
}

/// Runs a change of the store to its end in a task of its own, even when the session's
/// task that asked is stopped meanwhile (a cut aborts the client's direction): a
/// transaction dropped half-way would hold the database's write lock past the
/// session's own close.
pub(crate) async fn to_the_end<T: Send + 'static>(
    change: impl std::future::Future<Output = crate::Result<T>> + Send + 'static,
) -> crate::Result<T> {
    tokio::spawn(change)
        .await
        .unwrap_or_else(|e| Err(Error::Internal(format!("a store task failed: {e}"))))
}

/// Appends one audit event in its own transaction, through the crate's one append
/// path (`access::audit_event`). A failure is logged at error level here and returned,
/// never dropped: the caller decides what it refuses. Where the event is the condition
/// for going on (a forward opening) it refuses on Err; where it records a refusal (a
/// blocked command, a refused forward or login) the refusal stands either way.
pub(crate) async fn audit(
    state: &AppState,
    actor: &str,
    action: &str,
    subject: &str,
    details: serde_json::Value,
) -> std::result::Result<(), RelayError> {
    let written = {
        let (state, actor, action, subject) = (
            state.clone(),
            actor.to_string(),
            action.to_string(),
            subject.to_string(),
        );
        to_the_end(async move {
            let mut tx = store::begin_write(&state.db).await?;
            crate::audit::append(
                &mut tx,
                state.now_ms(),
                &crate::audit::NewEvent {
                    actor: &actor,
                    action: &action,
                    subject: &subject,
                    details,
                },
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    };
    written.map_err(|e| {
        tracing::error!(error = %e, action, subject, "relay: an audit event could not be written");
        RelayError::AuditFailed {
            action: action.to_string(),
            source: e,
        }
    })
}
