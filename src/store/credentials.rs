//! What a grant minted: SSH certificates (serials for the KRL) and per-grant database
//! logins with their state.
//!
//! Never holds a private key or a password: only serials, key ids, fingerprints and role
//! names.

use super::grants::LIVE_GRANT;
use super::{Conn, Db};
use crate::error::Result;
use crate::policy::DbCredentialState;

pub struct NewCertificate<'a> {
    pub serial: u64,
    pub grant_id: &'a str,
    pub user_id: &'a str,
    pub key_id: &'a str,
    pub fingerprint: &'a str,
    pub principals: &'a str,
    pub valid_after: u64,
    pub valid_before: u64,
    pub created_at: i64,
}

/// Records a certificate; false if its serial is taken (the caller draws another).
pub async fn insert_certificate(conn: &mut Conn, c: &NewCertificate<'_>) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO ssh_certificates
           (serial, grant_id, user_id, key_id, fingerprint, principals, valid_after, valid_before, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (serial) DO NOTHING",
    )
    .bind(c.serial as i64)
    .bind(c.grant_id)
    .bind(c.user_id)
    .bind(c.key_id)
    .bind(c.fingerprint)
    .bind(c.principals)
    .bind(c.valid_after as i64)
    .bind(c.valid_before as i64)
    .bind(c.created_at)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// (serial, key id) of every certificate whose grant is no longer active and which
/// has not been expired for longer than the grace period (`valid_before >= since`,
/// seconds), for the KRL.
pub async fn revoked_certificates(db: &Db, since: i64) -> Result<Vec<(i64, String)>> {
    Ok(sqlx::query_as(
        "SELECT c.serial, c.key_id FROM ssh_certificates c JOIN grants g ON g.id = c.grant_id
         WHERE g.status <> 'active' AND c.valid_before >= ? ORDER BY c.serial",
    )
    .bind(since)
    .fetch_all(db)
    .await?)
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DbCredentialRow {
    pub grant_id: String,
    pub resource: String,
    pub role_name: String,
    pub status: DbCredentialState,
    pub issued: i64,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub dropped_at: Option<i64>,
}

pub async fn db_credential(conn: &mut Conn, grant_id: &str) -> Result<Option<DbCredentialRow>> {
    Ok(
        sqlx::query_as("SELECT * FROM db_credentials WHERE grant_id = ?")
            .bind(grant_id)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

/// Records that the login exists and one more password was issued.
pub async fn db_credential_issued(
    conn: &mut Conn,
    grant_id: &str,
    resource: &str,
    role_name: &str,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO db_credentials (grant_id, resource, role_name, status, issued, created_at)
         VALUES (?, ?, ?, 'active', 1, ?)
         ON CONFLICT (grant_id) DO UPDATE SET status = 'active', issued = issued + 1,
                                              last_error = NULL",
    )
    .bind(grant_id)
    .bind(resource)
    .bind(role_name)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records why a login could not be made or dropped (a message safe to show).
pub async fn db_credential_error(
    conn: &mut Conn,
    grant_id: &str,
    resource: &str,
    role_name: &str,
    error: &str,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO db_credentials (grant_id, resource, role_name, status, created_at, last_error)
         VALUES (?, ?, ?, 'error', ?, ?)
         ON CONFLICT (grant_id) DO UPDATE SET last_error = excluded.last_error,
             status = CASE WHEN status = 'creating' THEN 'error' ELSE status END",
    )
    .bind(grant_id)
    .bind(resource)
    .bind(role_name)
    .bind(now)
    .bind(error)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// `active → dropped`, once.
pub async fn db_credential_dropped(conn: &mut Conn, role_name: &str, now: i64) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE db_credentials SET status = 'dropped', dropped_at = ?, last_error = NULL
         WHERE role_name = ? AND status <> 'dropped'",
    )
    .bind(now)
    .bind(role_name)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Role names whose grant is live right now, on any resource (roles are server-wide in
/// PostgreSQL, and two resources may share a server): the only twokey roles that may
/// exist. Whatever the login's own status (being made, made, or a failed attempt that
/// may be retried at any moment): only the grant's end lets the reconciler drop it, so
/// it never races a creation or a re-key.
pub async fn live_db_roles(db: &Db, now: i64) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT c.role_name FROM db_credentials c JOIN grants g ON g.id = c.grant_id
         WHERE {LIVE_GRANT}"
    ))
    .bind(now)
    .fetch_all(db)
    .await?)
}

/// Marks a login as being made, before twokey touches the target.
pub async fn db_credential_creating(
    conn: &mut Conn,
    grant_id: &str,
    resource: &str,
    role_name: &str,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO db_credentials (grant_id, resource, role_name, status, created_at)
         VALUES (?, ?, ?, 'creating', ?)
         ON CONFLICT (grant_id) DO UPDATE SET status = CASE WHEN status = 'active'
                                                          THEN 'active' ELSE 'creating' END",
    )
    .bind(grant_id)
    .bind(resource)
    .bind(role_name)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The grant a role was made for, if twokey knows it.
pub async fn db_credential_by_role(db: &Db, role_name: &str) -> Result<Option<DbCredentialRow>> {
    Ok(
        sqlx::query_as("SELECT * FROM db_credentials WHERE role_name = ?")
            .bind(role_name)
            .fetch_optional(db)
            .await?,
    )
}
