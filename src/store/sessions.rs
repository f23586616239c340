//! Relay sessions: opened with a row, closed once with their byte counts and their
//! recording's size and hash.
//!
//! Never reads or writes recordings themselves (that is the relay's recorder).

use super::{Conn, Db};
use crate::error::Result;

#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct SessionRow {
    pub id: String,
    pub grant_id: String,
    pub user_email: String,
    pub resource: String,
    pub peer: Option<String>,
    pub started_at: i64,
    pub ended_at: Option<i64>,
    pub end_reason: Option<String>,
    pub bytes_in: i64,
    pub bytes_out: i64,
    pub recording: String,
    pub recording_bytes: Option<i64>,
    pub recording_sha256: Option<String>,
    pub recording_truncated: bool,
    pub recording_failed: bool,
    /// Spans of input masked at a password prompt.
    pub masked_inputs: i64,
    /// Closed at a restart: twokey stopped without ending it.
    pub interrupted: bool,
    /// `ssh` (an asciicast recording) or `postgres` (a JSONL transcript).
    pub protocol: String,
    /// From the grant: its holder and role, for permission checks.
    pub holder_id: String,
    pub role: String,
}

const SESSION_COLUMNS: &str = "s.id, s.grant_id, s.user_email, s.resource, s.peer, s.started_at,
     s.ended_at, s.end_reason, s.bytes_in, s.bytes_out, s.recording, s.recording_bytes,
     s.recording_sha256, s.recording_truncated, s.recording_failed, s.masked_inputs, s.interrupted, s.protocol, g.user_id AS holder_id, g.role AS role
     FROM relay_sessions s JOIN grants g ON g.id = s.grant_id";

pub struct NewSession<'a> {
    pub id: &'a str,
    pub grant_id: &'a str,
    pub user_email: &'a str,
    pub resource: &'a str,
    pub peer: Option<&'a str>,
    pub started_at: i64,
    pub recording: &'a str,
    /// The relay instance running it (see [`open_sessions_of`]).
    pub relay_instance: &'a str,
    /// `ssh` or `postgres`.
    pub protocol: &'a str,
}

pub async fn insert_session(conn: &mut Conn, s: &NewSession<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO relay_sessions (id, grant_id, user_email, resource, peer, started_at, recording, relay_instance, protocol)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(s.id)
    .bind(s.grant_id)
    .bind(s.user_email)
    .bind(s.resource)
    .bind(s.peer)
    .bind(s.started_at)
    .bind(s.recording)
    .bind(s.relay_instance)
    .bind(s.protocol)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A session a relay instance left open (it stopped without ending it).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OpenSession {
    pub id: String,
    pub grant_id: String,
    pub user_email: String,
    pub recording: String,
    pub started_at: i64,
}

/// Sessions still open that `instance` ran, or that were started before sessions
/// named their instance.
pub async fn open_sessions_of(db: &Db, instance: &str) -> Result<Vec<OpenSession>> {
    Ok(sqlx::query_as(
        "SELECT id, grant_id, user_email, recording, started_at FROM relay_sessions
         WHERE ended_at IS NULL AND (relay_instance = ? OR relay_instance IS NULL)
         ORDER BY started_at",
    )
    .bind(instance)
    .fetch_all(db)
    .await?)
}

/// Closes a session its relay left open, as interrupted, with its recording's size and
/// hash as found on disk. False if it was closed meanwhile.
pub async fn end_interrupted_session(
    conn: &mut Conn,
    id: &str,
    ended_at: i64,
    reason: &str,
    recording_bytes: i64,
    recording_sha256: &str,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE relay_sessions SET ended_at = ?, end_reason = ?, recording_bytes = ?,
                recording_sha256 = ?, interrupted = 1
         WHERE id = ? AND ended_at IS NULL",
    )
    .bind(ended_at)
    .bind(reason)
    .bind(recording_bytes)
    .bind(recording_sha256)
    .bind(id)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// How a relay session ended.
pub struct EndedSession<'a> {
    pub id: &'a str,
    pub ended_at: i64,
    pub reason: &'a str,
    pub bytes_in: i64,
    pub bytes_out: i64,
    pub recording_bytes: i64,
    pub recording_sha256: &'a str,
    pub recording_truncated: bool,
    pub recording_failed: bool,
    pub masked_inputs: i64,
}

pub async fn end_session(conn: &mut Conn, e: &EndedSession<'_>) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE relay_sessions SET ended_at = ?, end_reason = ?, bytes_in = ?, bytes_out = ?,
                recording_bytes = ?, recording_sha256 = ?, recording_truncated = ?,
                recording_failed = ?, masked_inputs = ?
         WHERE id = ? AND ended_at IS NULL",
    )
    .bind(e.ended_at)
    .bind(e.reason)
    .bind(e.bytes_in)
    .bind(e.bytes_out)
    .bind(e.recording_bytes)
    .bind(e.recording_sha256)
    .bind(e.recording_truncated)
    .bind(e.recording_failed)
    .bind(e.masked_inputs)
    .bind(e.id)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn sessions(db: &Db, limit: i64) -> Result<Vec<SessionRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {SESSION_COLUMNS} ORDER BY s.started_at DESC LIMIT ?"
    ))
    .bind(limit)
    .fetch_all(db)
    .await?)
}

pub async fn session(db: &Db, id: &str) -> Result<Option<SessionRow>> {
    Ok(
        sqlx::query_as(&format!("SELECT {SESSION_COLUMNS} WHERE s.id = ?"))
            .bind(id)
            .fetch_optional(db)
            .await?,
    )
}
