//! Held actions and the decisions on them.
//!
//! Each transition is one conditional UPDATE (`... WHERE status = 'pending'`) whose
//! result the caller (`access::held`) checks; never decides whether a decision counts.

use sqlx::Sqlite;

use super::{ApprovalRow, Conn, Db, new_id};
use crate::error::Result;
use crate::policy::{Decision, HeldStatus};

/// A held action, with its sender's email joined in.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct HeldRow {
    pub id: String,
    pub session_id: String,
    pub grant_id: String,
    pub request_id: String,
    pub requester_id: String,
    pub requester_email: String,
    pub resource: String,
    pub role: String,
    pub protocol: String,
    pub action: String,
    pub params: String,
    pub action_sha256: String,
    pub parse: String,
    pub why: String,
    pub required_approvals: i64,
    pub status: HeldStatus,
    pub created_at: i64,
    pub expires_at: i64,
    pub decided_at: Option<i64>,
    pub ran_at: Option<i64>,
}

impl HeldRow {
    /// The parameters as the relay read them (`None` for NULL).
    pub fn params(&self) -> Vec<Option<String>> {
        serde_json::from_str(&self.params).unwrap_or_default()
    }

    /// Statement kinds and tables, as parsed.
    pub fn parse(&self) -> HeldParse {
        serde_json::from_str(&self.parse).unwrap_or_default()
    }
}

/// What the relay parsed of a held statement (empty for a command).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct HeldParse {
    #[serde(default)]
    pub kinds: Vec<String>,
    #[serde(default)]
    pub tables: Vec<String>,
}

const HELD_COLUMNS: &str = "h.id, h.session_id, h.grant_id, g.request_id, h.requester_id,
     u.email AS requester_email, h.resource, h.role, h.protocol, h.action, h.params,
     h.action_sha256, h.parse, h.why, h.required_approvals, h.status, h.created_at,
     h.expires_at, h.decided_at, h.ran_at
     FROM held_actions h JOIN users u ON u.id = h.requester_id JOIN grants g ON g.id = h.grant_id";

pub struct NewHeld<'a> {
    pub session_id: &'a str,
    pub grant_id: &'a str,
    pub requester_id: &'a str,
    pub resource: &'a str,
    pub role: &'a str,
    pub protocol: &'a str,
    pub action: &'a str,
    pub params: &'a [Option<String>],
    pub action_sha256: &'a str,
    pub parse: &'a HeldParse,
    pub why: &'a str,
    pub required_approvals: u32,
    pub created_at: i64,
    pub expires_at: i64,
}

pub async fn insert_held(conn: &mut Conn, h: &NewHeld<'_>) -> Result<String> {
    let id = new_id();
    sqlx::query(
        "INSERT INTO held_actions
           (id, session_id, grant_id, requester_id, resource, role, protocol, action, params,
            action_sha256, parse, why, required_approvals, status, created_at, expires_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
    )
    .bind(&id)
    .bind(h.session_id)
    .bind(h.grant_id)
    .bind(h.requester_id)
    .bind(h.resource)
    .bind(h.role)
    .bind(h.protocol)
    .bind(h.action)
    .bind(serde_json::to_string(h.params).unwrap_or_else(|_| "[]".into()))
    .bind(h.action_sha256)
    .bind(serde_json::to_string(h.parse).unwrap_or_else(|_| "{}".into()))
    .bind(h.why)
    .bind(i64::from(h.required_approvals))
    .bind(h.created_at)
    .bind(h.expires_at)
    .execute(&mut *conn)
    .await?;
    Ok(id)
}

pub async fn get_held(conn: &mut Conn, id: &str) -> Result<Option<HeldRow>> {
    Ok(
        sqlx::query_as(&format!("SELECT {HELD_COLUMNS} WHERE h.id = ?"))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

/// Which held actions to list: `None` lists all (admins); `Some((user, keys))` the
/// user's own and those of the `resource/role` keys they approve. Newest first.
pub async fn list_held(
    db: &Db,
    status: Option<HeldStatus>,
    visible_to: Option<(&str, &[String])>,
    limit: i64,
) -> Result<Vec<HeldRow>> {
    let mut q = sqlx::QueryBuilder::<Sqlite>::new(format!("SELECT {HELD_COLUMNS} WHERE 1 = 1"));
    if let Some(s) = status {
        q.push(" AND h.status = ").push_bind(s);
    }
    if let Some((user, keys)) = visible_to {
        q.push(" AND (h.requester_id = ")
            .push_bind(user.to_string());
        if !keys.is_empty() {
            q.push(" OR (h.resource || '/' || h.role) IN (");
            let mut sep = q.separated(", ");
            for k in keys {
                sep.push_bind(k.clone());
            }
            q.push(")");
        }
        q.push(")");
    }
    q.push(" ORDER BY h.created_at DESC, h.rowid DESC LIMIT ")
        .push_bind(limit);
    Ok(q.build_query_as().fetch_all(db).await?)
}

/// `from → to`, only from `from` (and, for a decision, only before it expires).
/// Returns whether this call made the transition.
pub async fn move_held(
    conn: &mut Conn,
    id: &str,
    from: HeldStatus,
    to: HeldStatus,
    now: i64,
) -> Result<bool> {
    let decision = matches!(to, HeldStatus::Approved | HeldStatus::Denied);
    let done = sqlx::query(
        "UPDATE held_actions
         SET status = ?,
             decided_at = CASE WHEN ? THEN ? ELSE decided_at END,
             ran_at = CASE WHEN ? = 'ran' THEN ? ELSE ran_at END
         WHERE id = ? AND status = ? AND (NOT ? OR expires_at > ?)",
    )
    .bind(to)
    .bind(decision || to == HeldStatus::Expired)
    .bind(now)
    .bind(to)
    .bind(now)
    .bind(id)
    .bind(from)
    .bind(decision)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub struct NewHeldDecision<'a> {
    pub held_id: &'a str,
    pub approver_id: &'a str,
    pub decision: Decision,
    pub comment: Option<&'a str>,
    pub channel: &'a str,
    pub approver_groups: &'a [String],
    pub now: i64,
}

/// Records a decision while the held action is pending and this approver has not yet
/// decided. Returns false when either no longer holds.
pub async fn insert_held_decision(conn: &mut Conn, d: &NewHeldDecision<'_>) -> Result<bool> {
    let groups = serde_json::to_string(d.approver_groups).unwrap_or_else(|_| "[]".into());
    let done = sqlx::query(
        "INSERT INTO held_decisions
           (id, held_id, approver_id, decision, comment, channel, approver_groups, created_at)
         SELECT ?, ?, ?, ?, ?, ?, ?, ?
         WHERE EXISTS (SELECT 1 FROM held_actions
                       WHERE id = ? AND status = 'pending' AND expires_at > ?)
         ON CONFLICT (held_id, approver_id) DO NOTHING",
    )
    .bind(new_id())
    .bind(d.held_id)
    .bind(d.approver_id)
    .bind(d.decision)
    .bind(d.comment)
    .bind(d.channel)
    .bind(groups)
    .bind(d.now)
    .bind(d.held_id)
    .bind(d.now)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The decisions on a held action, oldest first (as [`ApprovalRow`]s).
pub async fn held_decisions_for(conn: &mut Conn, held_id: &str) -> Result<Vec<ApprovalRow>> {
    Ok(sqlx::query_as(
        "SELECT d.id, d.approver_id, u.email AS approver_email, d.decision, d.comment, d.channel,
                d.approver_groups, d.created_at
         FROM held_decisions d JOIN users u ON u.id = d.approver_id
         WHERE d.held_id = ? ORDER BY d.created_at, d.rowid",
    )
    .bind(held_id)
    .fetch_all(&mut *conn)
    .await?)
}

/// Held actions left undecided or unrun by a relay that is gone: pending past their
/// wait, or pending or approved on a session that has ended.
pub async fn stale_held(conn: &mut Conn, now: i64) -> Result<Vec<HeldRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {HELD_COLUMNS} JOIN relay_sessions s ON s.id = h.session_id
         WHERE (h.status = 'pending' AND h.expires_at <= ?)
            OR (h.status IN ('pending', 'approved') AND s.ended_at IS NOT NULL)
         LIMIT 500"
    ))
    .bind(now)
    .fetch_all(&mut *conn)
    .await?)
}

/// `approved → ran`, only while the held action's grant is live: the relay calls it
/// just before it sends the action on, so an approval runs at most once and never
/// after its grant ended. Returns whether this call made the transition.
pub async fn claim_held_run(conn: &mut Conn, id: &str, now: i64) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE held_actions SET status = 'ran', ran_at = ?
         WHERE id = ? AND status = 'approved'
           AND EXISTS (SELECT 1 FROM grants g
                       WHERE g.id = held_actions.grant_id AND g.status = 'active' AND g.ends_at > ?)",
    )
    .bind(now)
    .bind(id)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The ids of a session's held actions that may still run (pending or approved).
pub async fn unrun_held_of_session(conn: &mut Conn, session_id: &str) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM held_actions WHERE session_id = ? AND status IN ('pending', 'approved')",
    )
    .bind(session_id)
    .fetch_all(&mut *conn)
    .await?)
}
