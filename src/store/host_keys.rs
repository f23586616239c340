//! Target host keys the relay saw where the config pins none, and an admin's decision
//! on each (pending → confirmed | rejected; confirmed → replaced).
//!
//! Never trusts a key by itself: only a key an admin confirmed is used.

use super::{Conn, Db, new_id};
use crate::error::Result;
use crate::policy::HostKeyStatus;

/// A host key the relay saw on a target whose config pins none.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct HostKeyRow {
    pub id: String,
    pub resource: String,
    pub address: String,
    pub public_key: String,
    pub fingerprint: String,
    /// pending, confirmed, rejected, or replaced (by a later confirmed key).
    pub status: HostKeyStatus,
    pub first_seen_at: i64,
    pub decided_by: Option<String>,
    pub decided_at: Option<i64>,
}

const HOST_KEY_COLUMNS: &str = "id, resource, address, public_key, fingerprint, status, \
     first_seen_at, decided_by, decided_at FROM target_host_keys";

/// The key an admin confirmed for `resource`, if any.
pub async fn confirmed_host_key(
    conn: impl sqlx::SqliteExecutor<'_>,
    resource: &str,
) -> Result<Option<HostKeyRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {HOST_KEY_COLUMNS} WHERE resource = ? AND status = 'confirmed'"
    ))
    .bind(resource)
    .fetch_optional(conn)
    .await?)
}

/// Records a key seen on `resource` as pending, unless it is known already. Returns the
/// key's row and whether this call added it; None when it is new but `max_pending` keys
/// already wait for `resource` (a host or a man in the middle showing key after key
/// cannot grow the table without bound).
pub async fn record_host_key(
    conn: &mut Conn,
    resource: &str,
    address: &str,
    public_key: &str,
    fingerprint: &str,
    now: i64,
    max_pending: i64,
) -> Result<Option<(HostKeyRow, bool)>> {
    let known = sqlx::query_as(&format!(
        "SELECT {HOST_KEY_COLUMNS} WHERE resource = ? AND fingerprint = ?"
    ))
    .bind(resource)
    .bind(fingerprint)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(row) = known {
        return Ok(Some((row, false)));
    }
    let (pending,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM target_host_keys WHERE resource = ? AND status = 'pending'",
    )
    .bind(resource)
    .fetch_one(&mut *conn)
    .await?;
    if pending >= max_pending {
        return Ok(None);
    }
    let added = sqlx::query(
        "INSERT INTO target_host_keys (id, resource, address, public_key, fingerprint, status, first_seen_at)
         VALUES (?, ?, ?, ?, ?, 'pending', ?) ON CONFLICT (resource, fingerprint) DO NOTHING",
    )
    .bind(new_id())
    .bind(resource)
    .bind(address)
    .bind(public_key)
    .bind(fingerprint)
    .bind(now)
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    let row = sqlx::query_as(&format!(
        "SELECT {HOST_KEY_COLUMNS} WHERE resource = ? AND fingerprint = ?"
    ))
    .bind(resource)
    .bind(fingerprint)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Some((row, added)))
}

/// Every key seen, newest first.
pub async fn host_keys(db: &Db) -> Result<Vec<HostKeyRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {HOST_KEY_COLUMNS} ORDER BY first_seen_at DESC, resource"
    ))
    .fetch_all(db)
    .await?)
}

pub async fn host_key(conn: &mut Conn, id: &str) -> Result<Option<HostKeyRow>> {
    Ok(
        sqlx::query_as(&format!("SELECT {HOST_KEY_COLUMNS} WHERE id = ?"))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

/// Marks the key confirmed for `resource` (if any) replaced, ahead of confirming another;
/// who confirmed it, and when, stay as they were.
pub async fn retire_confirmed_host_key(conn: &mut Conn, resource: &str) -> Result<()> {
    sqlx::query(
        "UPDATE target_host_keys SET status = 'replaced'
         WHERE resource = ? AND status = 'confirmed'",
    )
    .bind(resource)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Moves a key from `from` to `to`: true if it was still `from`.
pub async fn decide_host_key(
    conn: &mut Conn,
    id: &str,
    (from, to): (HostKeyStatus, HostKeyStatus),
    by: &str,
    now: i64,
) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE target_host_keys SET status = ?, decided_by = ?, decided_at = ?
         WHERE id = ? AND status = ?",
    )
    .bind(to)
    .bind(by)
    .bind(now)
    .bind(id)
    .bind(from)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}
