//! API tokens and the CLI's one-time sign-in codes, stored only as hashes.
//!
//! Never stores or returns a token or code itself; using one is one conditional UPDATE,
//! so it works once even when raced.

use sqlx::Row;

use super::{Conn, Db, new_id};
use crate::error::Result;

/// A new API token, by hash.
pub struct NewToken<'a> {
    pub user_id: &'a str,
    pub token_hash: &'a str,
    pub label: &'a str,
    /// Space-separated scopes ([`crate::auth::scopes::Scopes::to_db`]).
    pub scopes: &'a str,
    pub now: i64,
    pub expires_at: i64,
}

pub async fn insert_token(conn: &mut Conn, t: &NewToken<'_>) -> Result<String> {
    let id = new_id();
    sqlx::query(
        "INSERT INTO api_tokens (id, user_id, token_hash, label, scopes, created_at, expires_at)
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&id)
    .bind(t.user_id)
    .bind(t.token_hash)
    .bind(t.label)
    .bind(t.scopes)
    .bind(t.now)
    .bind(t.expires_at)
    .execute(&mut *conn)
    .await?;
    Ok(id)
}

/// A stored, unrevoked token.
pub struct TokenRow {
    pub id: String,
    pub token_hash: String,
    pub user_id: String,
    pub scopes: String,
    pub created_at: i64,
    pub expires_at: i64,
}

/// The unrevoked token with this hash, if any.
pub async fn token_owner(db: &Db, token_hash: &str) -> Result<Option<TokenRow>> {
    let row = sqlx::query(
        "SELECT id, token_hash, user_id, scopes, created_at, expires_at FROM api_tokens
         WHERE token_hash = ? AND revoked_at IS NULL",
    )
    .bind(token_hash)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|r| TokenRow {
        id: r.get("id"),
        token_hash: r.get("token_hash"),
        user_id: r.get("user_id"),
        scopes: r.get("scopes"),
        created_at: r.get("created_at"),
        expires_at: r.get("expires_at"),
    }))
}

/// Records a token's use, at most once a minute (so API calls do not each write).
pub async fn touch_token(db: &Db, id: &str, now: i64) -> Result<()> {
    sqlx::query(
        "UPDATE api_tokens SET last_used_at = ?1
         WHERE id = ?2 AND (last_used_at IS NULL OR last_used_at <= ?1 - 60000)",
    )
    .bind(now)
    .bind(id)
    .execute(db)
    .await?;
    Ok(())
}

/// A token as the Tokens page lists it (never its hash).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TokenListRow {
    pub id: String,
    pub user_id: String,
    pub owner_email: String,
    pub label: String,
    pub scopes: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

const TOKEN_LIST_COLUMNS: &str = "t.id, t.user_id, u.email AS owner_email, t.label, t.scopes,
     t.created_at, t.expires_at, t.last_used_at, t.revoked_at
     FROM api_tokens t JOIN users u ON u.id = t.user_id";

/// Tokens still live at `now` (unrevoked, unexpired), of one user or of everyone;
/// newest first.
pub async fn live_tokens(db: &Db, user_id: Option<&str>, now: i64) -> Result<Vec<TokenListRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {TOKEN_LIST_COLUMNS}
         WHERE t.revoked_at IS NULL AND t.expires_at > ?1 AND (?2 IS NULL OR t.user_id = ?2)
         ORDER BY t.created_at DESC, t.id LIMIT 500"
    ))
    .bind(now)
    .bind(user_id)
    .fetch_all(db)
    .await?)
}

pub async fn token_by_id(conn: &mut Conn, id: &str) -> Result<Option<TokenListRow>> {
    Ok(
        sqlx::query_as(&format!("SELECT {TOKEN_LIST_COLUMNS} WHERE t.id = ?"))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

/// Revokes one token while it is unrevoked; true if this call did.
pub async fn revoke_token(conn: &mut Conn, id: &str, by: &str, now: i64) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE api_tokens SET revoked_at = ?, revoked_by = ? WHERE id = ? AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(by)
    .bind(id)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Revokes every live token of a user; returns how many.
pub async fn revoke_tokens(conn: &mut Conn, user_id: &str, now: i64) -> Result<u64> {
    let done = sqlx::query(
        "UPDATE api_tokens SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(user_id)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}

pub async fn insert_cli_code(
    conn: &mut Conn,
    code_hash: &str,
    user_id: &str,
    challenge: &str,
    scopes: &str,
    now: i64,
    expires_at: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO cli_login_codes (code_hash, user_id, challenge, scopes, created_at, expires_at)
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(code_hash)
    .bind(user_id)
    .bind(challenge)
    .bind(scopes)
    .bind(now)
    .bind(expires_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Uses a code up: `Some((user_id, challenge, scopes))` if it was unused and
/// unexpired. One conditional UPDATE, so a code works once even when raced.
pub async fn consume_cli_code(
    conn: &mut Conn,
    code_hash: &str,
    now: i64,
) -> Result<Option<(String, String, String)>> {
    Ok(sqlx::query_as(
        "UPDATE cli_login_codes SET used_at = ?1
         WHERE code_hash = ?2 AND used_at IS NULL AND expires_at > ?1
         RETURNING user_id, challenge, scopes",
    )
    .bind(now)
    .bind(code_hash)
    .fetch_optional(&mut *conn)
    .await?)
}
