//! The durable outbox and what its deliveries need: single-use action tokens (by
//! hash), the dev mailbox, and the Slack message each request was posted as.
//!
//! Never sends anything itself: `notify` claims rows with a lease and delivers them.

use super::{Conn, Db, new_id};
use crate::error::Result;
use crate::policy::OutboxStatus;

/// Queues a message; a duplicate (same request, kind, channel and recipient) is a no-op.
pub async fn enqueue(
    conn: &mut Conn,
    request_id: &str,
    kind: &str,
    channel: &str,
    recipient_id: Option<&str>,
    recipient: &str,
    now: i64,
) -> Result<()> {
    enqueue_about(
        conn,
        request_id,
        "",
        kind,
        channel,
        recipient_id,
        recipient,
        now,
    )
    .await
}

/// Queues a message about a held action (`held_id`) of the request's grant, or about
/// the request itself (`held_id` empty); a duplicate is a no-op.
#[allow(clippy::too_many_arguments)]
pub async fn enqueue_about(
    conn: &mut Conn,
    request_id: &str,
    held_id: &str,
    kind: &str,
    channel: &str,
    recipient_id: Option<&str>,
    recipient: &str,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO outbox (id, request_id, held_id, kind, channel, recipient_id, recipient, next_attempt_at, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (request_id, held_id, kind, channel, recipient) DO NOTHING",
    )
    .bind(new_id())
    .bind(request_id)
    .bind(held_id)
    .bind(kind)
    .bind(channel)
    .bind(recipient_id)
    .bind(recipient)
    .bind(now)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct OutboxRow {
    pub id: String,
    pub request_id: String,
    /// The held action the message is about; empty for the request itself.
    pub held_id: String,
    pub kind: String,
    pub channel: String,
    pub recipient_id: Option<String>,
    pub recipient: String,
    pub status: OutboxStatus,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub sent_at: Option<i64>,
}

const OUTBOX_COLUMNS: &str =
    "id, request_id, held_id, kind, channel, recipient_id, recipient, status, attempts,
     next_attempt_at, last_error, sent_at FROM outbox";

pub async fn due_outbox(db: &Db, now: i64, limit: i64) -> Result<Vec<OutboxRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {OUTBOX_COLUMNS} WHERE status = 'pending' AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?"
    ))
    .bind(now)
    .bind(limit)
    .fetch_all(db)
    .await?)
}

/// Takes a due message for `lease_ms`, so a second worker (or replica) skips it.
pub async fn claim_outbox(db: &Db, id: &str, now: i64, lease_ms: i64) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE outbox SET next_attempt_at = ? WHERE id = ? AND status = 'pending' AND next_attempt_at <= ?",
    )
    .bind(now + lease_ms)
    .bind(id)
    .bind(now)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Marks a message delivered (`sent`) or no longer needed (`skipped`).
pub async fn finish_outbox(
    conn: &mut Conn,
    id: &str,
    status: OutboxStatus,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE outbox SET status = ?, sent_at = ?, attempts = attempts + 1, last_error = NULL
         WHERE id = ? AND status = 'pending'",
    )
    .bind(status)
    .bind(now)
    .bind(id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub async fn retry_outbox(db: &Db, id: &str, next_at: i64, error: &str) -> Result<()> {
    sqlx::query(
        "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?
         WHERE id = ? AND status = 'pending'",
    )
    .bind(next_at)
    .bind(error)
    .bind(id)
    .execute(db)
    .await?;
    Ok(())
}

pub async fn outbox_for_request(db: &Db, request_id: &str) -> Result<Vec<OutboxRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {OUTBOX_COLUMNS} WHERE request_id = ? ORDER BY created_at, recipient"
    ))
    .bind(request_id)
    .fetch_all(db)
    .await?)
}

pub async fn insert_action_token(
    conn: &mut Conn,
    token_hash: &str,
    request_id: &str,
    approver_id: &str,
    action: &str,
    now: i64,
    expires_at: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO action_tokens (token_hash, request_id, approver_id, action, created_at, expires_at)
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(token_hash)
    .bind(request_id)
    .bind(approver_id)
    .bind(action)
    .bind(now)
    .bind(expires_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ActionTokenRow {
    pub token_hash: String,
    pub request_id: String,
    pub approver_id: String,
    pub action: String,
    pub expires_at: i64,
    pub used_at: Option<i64>,
}

pub async fn action_token(db: &Db, token_hash: &str) -> Result<Option<ActionTokenRow>> {
    Ok(sqlx::query_as(
        "SELECT token_hash, request_id, approver_id, action, expires_at, used_at
         FROM action_tokens WHERE token_hash = ?",
    )
    .bind(token_hash)
    .fetch_optional(db)
    .await?)
}

/// Uses a token: once, before it expires, by its approver, for its request and action.
pub async fn consume_action_token(
    conn: &mut Conn,
    token_hash: &str,
    request_id: &str,
    approver_id: &str,
    action: &str,
    now: i64,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE action_tokens SET used_at = ?
         WHERE token_hash = ? AND request_id = ? AND approver_id = ? AND action = ?
           AND used_at IS NULL AND expires_at > ?",
    )
    .bind(now)
    .bind(token_hash)
    .bind(request_id)
    .bind(approver_id)
    .bind(action)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn dev_mail(
    conn: &mut Conn,
    outbox_id: &str,
    recipient: &str,
    subject: &str,
    text: &str,
    html: &str,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO dev_mailbox (outbox_id, recipient, subject, body_text, body_html, created_at)
         VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (outbox_id) DO NOTHING",
    )
    .bind(outbox_id)
    .bind(recipient)
    .bind(subject)
    .bind(text)
    .bind(html)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DevMail {
    pub id: i64,
    pub recipient: String,
    pub subject: String,
    pub body_text: String,
    pub body_html: String,
    pub created_at: i64,
}

pub async fn dev_mailbox(db: &Db, limit: i64) -> Result<Vec<DevMail>> {
    Ok(sqlx::query_as(
        "SELECT id, recipient, subject, body_text, body_html, created_at FROM dev_mailbox ORDER BY id DESC LIMIT ?",
    )
    .bind(limit)
    .fetch_all(db)
    .await?)
}

pub async fn save_slack_message(
    conn: &mut Conn,
    request_id: &str,
    channel: &str,
    ts: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO slack_messages (request_id, channel, ts) VALUES (?, ?, ?)
         ON CONFLICT (request_id) DO UPDATE SET channel = excluded.channel, ts = excluded.ts",
    )
    .bind(request_id)
    .bind(channel)
    .bind(ts)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The (channel, ts) of a request's Slack message.
pub async fn slack_message(db: &Db, request_id: &str) -> Result<Option<(String, String)>> {
    Ok(
        sqlx::query_as("SELECT channel, ts FROM slack_messages WHERE request_id = ?")
            .bind(request_id)
            .fetch_optional(db)
            .await?,
    )
}
