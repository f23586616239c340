//! Grants: made from an approved request, live inside their window, ended by the clock
//! or revoked by a person.
//!
//! Ending a grant is one conditional UPDATE; never mints credentials (that is `ca` and
//! `dbcreds`) nor cuts sessions (the relay).

use std::collections::BTreeSet;

use sqlx::Row;

use super::{Conn, Db, RequestRow, new_id};
use crate::error::Result;
use crate::policy::GrantStatus;

#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct GrantRow {
    pub id: String,
    pub request_id: String,
    pub user_id: String,
    pub user_email: String,
    pub resource: String,
    pub role: String,
    pub starts_at: i64,
    pub ends_at: i64,
    pub status: GrantStatus,
    pub ended_at: Option<i64>,
    pub ended_by_email: Option<String>,
    pub end_comment: Option<String>,
}

impl GrantRow {
    /// Whether the grant is live at `now`: active and not past its end. The one test
    /// the relay, the credential issuers and the pages apply; [`LIVE_GRANT`] is the
    /// same test in SQL.
    pub fn is_live(&self, now: i64) -> bool {
        self.status == GrantStatus::Active && self.ends_at > now
    }
}

/// [`GrantRow::is_live`] in SQL, for a grant aliased `g`, with `now` bound once at
/// its `?`.
pub const LIVE_GRANT: &str = "g.status = 'active' AND g.ends_at > ?";

/// A live grant whose window has also begun at `now` (`starts_at <= now`): the listing
/// of live grants. `now` is bound twice, at its two `?`. Grants start when they are
/// made, so the two agree unless the clock went back.
pub const LIVE_GRANT_STARTED: &str = "g.status = 'active' AND g.starts_at <= ? AND g.ends_at > ?";

const GRANT_COLUMNS: &str =
    "g.id, g.request_id, g.user_id, u.email AS user_email, g.resource, g.role,
     g.starts_at, g.ends_at, g.status, g.ended_at, e.email AS ended_by_email, g.end_comment
     FROM grants g JOIN users u ON u.id = g.user_id LEFT JOIN users e ON e.id = g.ended_by";

pub async fn insert_grant(
    conn: &mut Conn,
    request: &RequestRow,
    starts_at: i64,
    ends_at: i64,
) -> Result<String> {
    let id = new_id();
    sqlx::query(
        "INSERT INTO grants (id, request_id, user_id, resource, role, starts_at, ends_at, status)
         VALUES (?, ?, ?, ?, ?, ?, ?, 'active')",
    )
    .bind(&id)
    .bind(&request.id)
    .bind(&request.requester_id)
    .bind(&request.resource)
    .bind(&request.role)
    .bind(starts_at)
    .bind(ends_at)
    .execute(&mut *conn)
    .await?;
    Ok(id)
}

pub async fn grant_for_request(conn: &mut Conn, request_id: &str) -> Result<Option<GrantRow>> {
    Ok(
        sqlx::query_as(&format!("SELECT {GRANT_COLUMNS} WHERE g.request_id = ?"))
            .bind(request_id)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

/// `active → to` (`ended` by the clock, `revoked` by a person). Revocation applies only
/// to a grant still inside its window; the natural end only to one past it, and is
/// recorded at the grant's end time, not at the time of the sweep.
pub async fn end_grant(
    conn: &mut Conn,
    grant_id: &str,
    to: GrantStatus,
    now: i64,
    by: Option<&str>,
    comment: Option<&str>,
) -> Result<bool> {
    let natural = to == GrantStatus::Ended;
    let done = sqlx::query(
        "UPDATE grants SET status = ?, ended_at = CASE WHEN ? THEN ends_at ELSE ? END,
                           ended_by = ?, end_comment = ?
         WHERE id = ? AND status = 'active' AND ((? AND ends_at <= ?) OR (NOT ? AND ends_at > ?))",
    )
    .bind(to)
    .bind(natural)
    .bind(now)
    .bind(by)
    .bind(comment)
    .bind(grant_id)
    .bind(natural)
    .bind(now)
    .bind(natural)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Grants still marked active whose end has passed.
pub async fn overdue_grants(conn: &mut Conn, now: i64) -> Result<Vec<GrantRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {GRANT_COLUMNS} WHERE g.status = 'active' AND g.ends_at <= ? LIMIT 500"
    ))
    .bind(now)
    .fetch_all(&mut *conn)
    .await?)
}

/// Grants live right now: active and inside their window.
pub async fn live_grants(db: &Db, now: i64) -> Result<Vec<GrantRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {GRANT_COLUMNS} WHERE {LIVE_GRANT_STARTED}
         ORDER BY g.ends_at"
    ))
    .bind(now)
    .bind(now)
    .fetch_all(db)
    .await?)
}

/// Counts for the metrics page: pending requests and live grants.
pub async fn gauges(db: &Db, now: i64) -> Result<(i64, i64)> {
    let row = sqlx::query(&format!(
        "SELECT (SELECT COUNT(*) FROM access_requests WHERE status = 'pending' AND expires_at > ?),
                    (SELECT COUNT(*) FROM grants g WHERE {LIVE_GRANT})"
    ))
    .bind(now)
    .bind(now)
    .fetch_one(db)
    .await?;
    Ok((row.get(0), row.get(1)))
}

pub async fn grant_by_id(db: &Db, grant_id: &str) -> Result<Option<GrantRow>> {
    Ok(
        sqlx::query_as(&format!("SELECT {GRANT_COLUMNS} WHERE g.id = ?"))
            .bind(grant_id)
            .fetch_optional(db)
            .await?,
    )
}

/// Which of `ids` are active grants that have not ended at `now`: one query, however
/// many ids.
pub async fn live_grants_among(
    db: &Db,
    ids: &[String],
    now: i64,
) -> Result<std::collections::HashSet<String>> {
    let json =
        serde_json::to_string(ids).map_err(|e| crate::error::Error::Internal(e.to_string()))?;
    let rows: Vec<(String,)> = sqlx::query_as(&format!(
        "SELECT g.id FROM grants g WHERE {LIVE_GRANT} \
             AND g.id IN (SELECT value FROM json_each(?))"
    ))
    .bind(now)
    .bind(json)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// A live grant with what decides whether its holder may still hold it.
#[derive(Debug, Clone)]
pub struct GrantHolding {
    pub grant_id: String,
    pub resource: String,
    pub role: String,
    /// The holder's groups as stored now.
    pub groups: BTreeSet<String>,
}

/// Of `ids`, the grants that are active, not past their end at `now`, and started after
/// their holder was last forced to sign in again, each with the holder's current
/// groups: one query, however many ids.
pub async fn grant_holdings_among(db: &Db, ids: &[String], now: i64) -> Result<Vec<GrantHolding>> {
    let json =
        serde_json::to_string(ids).map_err(|e| crate::error::Error::Internal(e.to_string()))?;
    let rows: Vec<(String, String, String, String)> = sqlx::query_as(&format!(
        "SELECT g.id, g.resource, g.role,
                (SELECT json_group_array(ug.group_name) FROM user_groups ug WHERE ug.user_id = g.user_id)
         FROM grants g JOIN users u ON u.id = g.user_id
         WHERE {LIVE_GRANT} AND g.starts_at > u.sessions_valid_after
           AND g.id IN (SELECT value FROM json_each(?))"
    ))
    .bind(now)
    .bind(json)
    .fetch_all(db)
    .await?;
    rows.into_iter()
        .map(|(grant_id, resource, role, groups)| {
            let groups: BTreeSet<String> = serde_json::from_str(&groups)
                .map_err(|e| crate::error::Error::Internal(format!("groups of a holder: {e}")))?;
            Ok(GrantHolding {
                grant_id,
                resource,
                role,
                groups,
            })
        })
        .collect()
}

/// A user's grants that are active and not past their end at `now`.
pub async fn live_grants_of(conn: &mut Conn, user_id: &str, now: i64) -> Result<Vec<GrantRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {GRANT_COLUMNS} WHERE g.user_id = ? AND {LIVE_GRANT}
         ORDER BY g.ends_at"
    ))
    .bind(user_id)
    .bind(now)
    .fetch_all(&mut *conn)
    .await?)
}
