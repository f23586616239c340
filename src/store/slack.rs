//! Slack accounts linked to twokey users, their one-time link tokens (by hash), and
//! the replay guard for inbound interactions.
//!
//! A link never moves silently: linking is an insert that refuses an existing link.

use super::{Conn, Db};
use crate::error::Result;

/// Records an interaction's signature; false if it was seen before (a replay).
/// Entries older than `forget_before` are dropped first.
pub async fn first_sighting(
    db: &Db,
    signature_hash: &str,
    now: i64,
    forget_before: i64,
) -> Result<bool> {
    sqlx::query("DELETE FROM slack_replays WHERE seen_at < ?")
        .bind(forget_before)
        .execute(db)
        .await?;
    let done = sqlx::query(
        "INSERT INTO slack_replays (signature_hash, seen_at) VALUES (?, ?) ON CONFLICT (signature_hash) DO NOTHING",
    )
    .bind(signature_hash)
    .bind(now)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The twokey user a Slack user (in the pinned workspace) is linked to, if any.
pub async fn slack_link_user(
    conn: &mut Conn,
    team_id: &str,
    slack_user_id: &str,
) -> Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT user_id FROM slack_links WHERE team_id = ? AND slack_user_id = ?",
    )
    .bind(team_id)
    .bind(slack_user_id)
    .fetch_optional(&mut *conn)
    .await?)
}

/// A Slack account linked to a twokey user.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SlackLinkRow {
    pub team_id: String,
    pub slack_user_id: String,
    pub user_id: String,
    pub created_at: i64,
}

pub async fn slack_links_of(db: &Db, user_id: &str) -> Result<Vec<SlackLinkRow>> {
    Ok(sqlx::query_as(
        "SELECT team_id, slack_user_id, user_id, created_at FROM slack_links
         WHERE user_id = ? ORDER BY created_at",
    )
    .bind(user_id)
    .fetch_all(db)
    .await?)
}

/// A new one-time link token for a Slack user; expired tokens are dropped first.
pub struct NewSlackLinkToken<'a> {
    pub token_hash: &'a str,
    pub team_id: &'a str,
    pub slack_user_id: &'a str,
    pub slack_name: &'a str,
    pub slack_email: Option<&'a str>,
    pub now: i64,
    pub expires_at: i64,
}

pub async fn insert_slack_link_token(conn: &mut Conn, t: &NewSlackLinkToken<'_>) -> Result<()> {
    sqlx::query("DELETE FROM slack_link_tokens WHERE expires_at <= ?")
        .bind(t.now)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO slack_link_tokens
           (token_hash, team_id, slack_user_id, slack_name, slack_email, created_at, expires_at)
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(t.token_hash)
    .bind(t.team_id)
    .bind(t.slack_user_id)
    .bind(t.slack_name)
    .bind(t.slack_email)
    .bind(t.now)
    .bind(t.expires_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A stored link token.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SlackLinkTokenRow {
    pub token_hash: String,
    pub team_id: String,
    pub slack_user_id: String,
    pub slack_name: String,
    pub slack_email: Option<String>,
    pub expires_at: i64,
    pub used_at: Option<i64>,
}

pub async fn slack_link_token(
    conn: &mut Conn,
    token_hash: &str,
) -> Result<Option<SlackLinkTokenRow>> {
    Ok(sqlx::query_as(
        "SELECT token_hash, team_id, slack_user_id, slack_name, slack_email, expires_at, used_at
         FROM slack_link_tokens WHERE token_hash = ?",
    )
    .bind(token_hash)
    .fetch_optional(&mut *conn)
    .await?)
}

/// Uses a link token up: true if it was unused and unexpired. One conditional UPDATE,
/// so a token links once even when raced.
pub async fn consume_slack_link_token(conn: &mut Conn, token_hash: &str, now: i64) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE slack_link_tokens SET used_at = ?1
         WHERE token_hash = ?2 AND used_at IS NULL AND expires_at > ?1",
    )
    .bind(now)
    .bind(token_hash)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Links a Slack user to a twokey user; false if either already has a link in this
/// workspace (the old one must be unlinked first: a link never moves silently).
pub async fn insert_slack_link(
    conn: &mut Conn,
    team_id: &str,
    slack_user_id: &str,
    user_id: &str,
    now: i64,
) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO slack_links (team_id, slack_user_id, user_id, created_at)
         VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
    )
    .bind(team_id)
    .bind(slack_user_id)
    .bind(user_id)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Removes a user's own link; false if it was not theirs (or already gone).
pub async fn delete_slack_link(
    conn: &mut Conn,
    team_id: &str,
    slack_user_id: &str,
    user_id: &str,
) -> Result<bool> {
    let done = sqlx::query(
        "DELETE FROM slack_links WHERE team_id = ? AND slack_user_id = ? AND user_id = ?",
    )
    .bind(team_id)
    .bind(slack_user_id)
    .bind(user_id)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}
