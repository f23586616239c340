//! Relay passwords for the PostgreSQL relay: one per grant, kept only as a SCRAM
//! verifier.
//!
//! Never holds a password, and never answers for a grant that is not live: the lookup
//! joins the live-grant condition, and the relay's admission checks the grant again.

use super::grants::LIVE_GRANT;
use super::{Conn, Db};
use crate::error::Result;

/// Sets (or replaces) the relay password of a grant, as its SCRAM verifier.
pub async fn set_relay_db_login(
    conn: &mut Conn,
    grant_id: &str,
    verifier: &str,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO relay_db_logins (grant_id, verifier, issued_at) VALUES (?, ?, ?)
         ON CONFLICT (grant_id) DO UPDATE SET verifier = excluded.verifier, issued_at = excluded.issued_at",
    )
    .bind(grant_id)
    .bind(verifier)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The relay password a user last got for a live grant on `resource`: (grant id, SCRAM
/// verifier). The user is matched by their email, case-insensitively.
pub async fn relay_db_login_for(
    db: &Db,
    user_email: &str,
    resource: &str,
    now: i64,
) -> Result<Option<(String, String)>> {
    let sql = format!(
        "SELECT g.id, l.verifier FROM relay_db_logins l JOIN grants g ON g.id = l.grant_id
         JOIN users u ON u.id = g.user_id
         WHERE lower(u.email) = lower(?) AND g.resource = ? AND {LIVE_GRANT}
         ORDER BY l.issued_at DESC LIMIT 1"
    );
    Ok(sqlx::query_as(&sql)
        .bind(user_email)
        .bind(resource)
        .bind(now)
        .fetch_optional(db)
        .await?)
}

/// The relay password to check a login against: the newest one the user got for a
/// live grant on `resource`, else their newest on it at all (so that a right password
/// for an ended or revoked grant is told why, rather than that it is wrong). (grant
/// id, SCRAM verifier).
pub async fn relay_db_login_latest(
    db: &Db,
    user_email: &str,
    resource: &str,
    now: i64,
) -> Result<Option<(String, String)>> {
    if let Some(live) = relay_db_login_for(db, user_email, resource, now).await? {
        return Ok(Some(live));
    }
    Ok(sqlx::query_as(
        "SELECT g.id, l.verifier FROM relay_db_logins l JOIN grants g ON g.id = l.grant_id
         JOIN users u ON u.id = g.user_id
         WHERE lower(u.email) = lower(?) AND g.resource = ?
         ORDER BY l.issued_at DESC LIMIT 1",
    )
    .bind(user_email)
    .bind(resource)
    .fetch_optional(db)
    .await?)
}
