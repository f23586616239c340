//! Access requests and the approvals recorded on them.
//!
//! Each transition is one conditional UPDATE (`... WHERE status = 'pending'`) whose
//! result the caller (`access`) checks; never decides whether an approval counts.

use sqlx::Sqlite;

use super::{Conn, Db, new_id};
use crate::error::Result;
use crate::policy::{Decision, RequestStatus};

/// An access request row, with its requester's email joined in.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct RequestRow {
    pub id: String,
    pub requester_id: String,
    pub requester_email: String,
    pub resource: String,
    pub role: String,
    pub duration_secs: i64,
    pub reason: String,
    pub ticket: Option<String>,
    pub status: RequestStatus,
    pub created_at: i64,
    pub expires_at: i64,
    pub decided_at: Option<i64>,
}

const REQUEST_COLUMNS: &str =
    "r.id, r.requester_id, u.email AS requester_email, r.resource, r.role,
     r.duration_secs, r.reason, r.ticket, r.status, r.created_at, r.expires_at, r.decided_at
     FROM access_requests r JOIN users u ON u.id = r.requester_id";

pub struct NewRequest<'a> {
    pub requester_id: &'a str,
    pub resource: &'a str,
    pub role: &'a str,
    pub duration_secs: i64,
    pub reason: &'a str,
    pub ticket: Option<&'a str>,
    pub created_at: i64,
    pub expires_at: i64,
}

pub async fn insert_request(conn: &mut Conn, r: &NewRequest<'_>) -> Result<String> {
    let id = new_id();
    sqlx::query(
        "INSERT INTO access_requests
           (id, requester_id, resource, role, duration_secs, reason, ticket, status, created_at, expires_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
    )
    .bind(&id)
    .bind(r.requester_id)
    .bind(r.resource)
    .bind(r.role)
    .bind(r.duration_secs)
    .bind(r.reason)
    .bind(r.ticket)
    .bind(r.created_at)
    .bind(r.expires_at)
    .execute(&mut *conn)
    .await?;
    Ok(id)
}

pub async fn get_request(conn: &mut Conn, id: &str) -> Result<Option<RequestRow>> {
    Ok(
        sqlx::query_as(&format!("SELECT {REQUEST_COLUMNS} WHERE r.id = ?"))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

/// Which requests to list.
pub struct ListFilter<'a> {
    /// By status as it holds now: a pending request past its TTL counts as expired
    /// even before the sweeper marks it.
    pub status: Option<RequestStatus>,
    /// Only requests filed by this user.
    pub requester: Option<&'a str>,
    /// `None` lists every request (admins). `Some((user, keys))` lists the user's own
    /// requests and those for the `resource/role` keys they approve.
    pub visible_to: Option<(&'a str, &'a [String])>,
    pub now: i64,
    pub limit: i64,
}

/// Newest first.
pub async fn list_requests(db: &Db, f: &ListFilter<'_>) -> Result<Vec<RequestRow>> {
    let mut q = sqlx::QueryBuilder::<Sqlite>::new(format!("SELECT {REQUEST_COLUMNS} WHERE 1 = 1"));
    match f.status {
        Some(RequestStatus::Pending) => {
            q.push(" AND r.status = 'pending' AND r.expires_at > ")
                .push_bind(f.now);
        }
        Some(RequestStatus::Expired) => {
            q.push(" AND (r.status = 'expired' OR (r.status = 'pending' AND r.expires_at <= ")
                .push_bind(f.now)
                .push("))");
        }
        Some(other) => {
            q.push(" AND r.status = ").push_bind(other);
        }
        None => {}
    }
    if let Some(user) = f.requester {
        q.push(" AND r.requester_id = ").push_bind(user.to_string());
    }
    if let Some((user, keys)) = f.visible_to {
        q.push(" AND (r.requester_id = ")
            .push_bind(user.to_string());
        if !keys.is_empty() {
            q.push(" OR (r.resource || '/' || r.role) IN (");
            let mut sep = q.separated(", ");
            for k in keys {
                sep.push_bind(k.clone());
            }
            q.push(")");
        }
        q.push(")");
    }
    q.push(" ORDER BY r.created_at DESC, r.id LIMIT ")
        .push_bind(f.limit);
    Ok(q.build_query_as().fetch_all(db).await?)
}

/// `pending → to`, only while pending (and, unless expiring, not past its TTL).
/// Returns whether this call made the transition.
pub async fn decide_request(
    conn: &mut Conn,
    id: &str,
    to: RequestStatus,
    now: i64,
) -> Result<bool> {
    let live_only = to != RequestStatus::Expired;
    let done = sqlx::query(
        "UPDATE access_requests SET status = ?, decided_at = ?
         WHERE id = ? AND status = 'pending' AND (NOT ? OR expires_at > ?)",
    )
    .bind(to)
    .bind(now)
    .bind(id)
    .bind(live_only)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Pending requests whose TTL has run out.
pub async fn overdue_requests(conn: &mut Conn, now: i64) -> Result<Vec<RequestRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {REQUEST_COLUMNS} WHERE r.status = 'pending' AND r.expires_at <= ? LIMIT 500"
    ))
    .bind(now)
    .fetch_all(&mut *conn)
    .await?)
}

#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct ApprovalRow {
    pub id: String,
    pub approver_id: String,
    pub approver_email: String,
    pub decision: Decision,
    pub comment: Option<String>,
    pub channel: String,
    pub approver_groups: String,
    pub created_at: i64,
}

impl ApprovalRow {
    pub fn groups(&self) -> Vec<String> {
        serde_json::from_str(&self.approver_groups).unwrap_or_default()
    }
}

pub struct NewApproval<'a> {
    pub request_id: &'a str,
    pub approver_id: &'a str,
    pub decision: Decision,
    pub comment: Option<&'a str>,
    pub channel: &'a str,
    pub approver_groups: &'a [String],
    pub now: i64,
}

/// Records a decision while the request is still pending and this approver has not
/// yet decided. Returns false when either no longer holds.
pub async fn insert_approval(conn: &mut Conn, a: &NewApproval<'_>) -> Result<bool> {
    let groups = serde_json::to_string(a.approver_groups).unwrap_or_else(|_| "[]".into());
    let done = sqlx::query(
        "INSERT INTO approvals
           (id, request_id, approver_id, decision, comment, channel, approver_groups, created_at)
         SELECT ?, ?, ?, ?, ?, ?, ?, ?
         WHERE EXISTS (SELECT 1 FROM access_requests
                       WHERE id = ? AND status = 'pending' AND expires_at > ?)
         ON CONFLICT (request_id, approver_id) DO NOTHING",
    )
    .bind(new_id())
    .bind(a.request_id)
    .bind(a.approver_id)
    .bind(a.decision)
    .bind(a.comment)
    .bind(a.channel)
    .bind(groups)
    .bind(a.now)
    .bind(a.request_id)
    .bind(a.now)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn approvals_for(conn: &mut Conn, request_id: &str) -> Result<Vec<ApprovalRow>> {
    Ok(sqlx::query_as(
        "SELECT a.id, a.approver_id, u.email AS approver_email, a.decision, a.comment, a.channel,
                a.approver_groups, a.created_at
         FROM approvals a JOIN users u ON u.id = a.approver_id
         WHERE a.request_id = ? ORDER BY a.created_at, a.id",
    )
    .bind(request_id)
    .fetch_all(&mut *conn)
    .await?)
}
