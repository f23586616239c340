//! All SQL lives here, so another backend changes nothing else.
//!
//! Functions that take part in a business step take a `&mut Conn` so the caller holds
//! one transaction for the whole step. State changes are conditional UPDATEs whose
//! `rows_affected()` the caller checks. Write transactions start with
//! `BEGIN IMMEDIATE` ([`begin_write`]) so SQLite serialises them from their first
//! statement: the read-check-write inside cannot be raced.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, Sqlite, SqliteConnection, SqlitePool, Transaction};

use crate::audit::{AuditEvent, GENESIS, NewEvent};
use crate::error::Result;
use crate::policy::Actor;

pub type Db = SqlitePool;
pub type Conn = SqliteConnection;
pub type Tx = Transaction<'static, Sqlite>;

/// Opens (creating if needed) the database and runs the embedded migrations.
pub async fn connect(url: &str) -> Result<Db> {
    let options = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(10));
    let db = SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await?;
    sqlx::migrate!("./migrations").run(&db).await?;
    Ok(db)
}

/// The browser-session store, in the same database.
pub type SessionStore = tower_sessions_sqlx_store::SqliteStore;

/// Makes the session store, creating its table if needed.
pub async fn session_store(db: &Db) -> Result<SessionStore> {
    let store = SessionStore::new(db.clone());
    store.migrate().await?;
    Ok(store)
}

/// Whether the database answers (for `/healthz`).
pub async fn ping(db: &Db) -> Result<()> {
    sqlx::query("SELECT 1").execute(db).await?;
    Ok(())
}

/// Starts a write transaction that holds SQLite's write lock from its first statement.
pub async fn begin_write(db: &Db) -> Result<Tx> {
    Ok(db.begin_with("BEGIN IMMEDIATE").await?)
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

// ---------------------------------------------------------------- users and groups

/// Creates the user if new (keyed by issuer and subject), refreshes their email and
/// name, and returns their id. Fails with a conflict if the email already belongs to
/// another identity.
pub async fn upsert_identity(
    conn: &mut Conn,
    issuer: &str,
    subject: &str,
    email: &str,
    display_name: &str,
    now: i64,
) -> Result<String> {
    let res = sqlx::query_scalar(
        "INSERT INTO users (id, email, display_name, created_at, issuer, subject) VALUES (?, ?, ?, ?, ?, ?)
         ON CONFLICT (issuer, subject) DO UPDATE
           SET email = excluded.email, display_name = excluded.display_name
         RETURNING id",
    )
    .bind(new_id())
    .bind(email)
    .bind(display_name)
    .bind(now)
    .bind(issuer)
    .bind(subject)
    .fetch_one(&mut *conn)
    .await;
    match res {
        Ok(id) => Ok(id),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(crate::Error::conflict(
            format!("{email} already belongs to another account; ask an admin"),
        )),
        Err(e) => Err(e.into()),
    }
}

/// A demo user: issuer `dev`, subject = email.
pub async fn upsert_user(
    conn: &mut Conn,
    email: &str,
    display_name: &str,
    now: i64,
) -> Result<String> {
    upsert_identity(conn, "dev", email, email, display_name, now).await
}

/// Refuses every session of this user that signed in before `now`.
pub async fn force_reauth(conn: &mut Conn, user_id: &str, now: i64) -> Result<bool> {
    let done = sqlx::query("UPDATE users SET sessions_valid_after = ? WHERE id = ?")
        .bind(now)
        .bind(user_id)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Users with their groups and when those were last synced, for the admin page.
pub async fn list_users(db: &Db) -> Result<Vec<UserRow>> {
    Ok(sqlx::query_as(
        "SELECT u.id, u.email, u.display_name, u.issuer, u.subject,
                COALESCE((SELECT group_concat(group_name, ', ') FROM
                          (SELECT group_name FROM user_groups g WHERE g.user_id = u.id ORDER BY group_name)), '') AS groups,
                (SELECT MAX(synced_at) FROM user_groups g WHERE g.user_id = u.id) AS synced_at,
                u.sessions_valid_after
         FROM users u ORDER BY u.email",
    )
    .fetch_all(db)
    .await?)
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserRow {
    pub id: String,
    pub email: String,
    pub display_name: String,
    pub issuer: String,
    pub subject: String,
    pub groups: String,
    pub synced_at: Option<i64>,
    pub sessions_valid_after: i64,
}

/// Replaces a user's group membership.
pub async fn set_user_groups(
    conn: &mut Conn,
    user_id: &str,
    groups: &[String],
    now: i64,
) -> Result<()> {
    sqlx::query("DELETE FROM user_groups WHERE user_id = ?")
        .bind(user_id)
        .execute(&mut *conn)
        .await?;
    for g in groups.iter().collect::<BTreeSet<_>>() {
        sqlx::query("INSERT INTO user_groups (user_id, group_name, synced_at) VALUES (?, ?, ?)")
            .bind(user_id)
            .bind(g)
            .bind(now)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// A user with their current groups, or `None` if there is no such user.
pub async fn load_actor(
    conn: &mut Conn,
    user_id: &str,
    admin_groups: &[String],
) -> Result<Option<Actor>> {
    let Some(row) = sqlx::query(
        "SELECT id, email, display_name, issuer, subject, sessions_valid_after FROM users WHERE id = ?",
    )
        .bind(user_id)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let groups: BTreeSet<String> =
        sqlx::query_scalar("SELECT group_name FROM user_groups WHERE user_id = ?")
            .bind(user_id)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect();
    let is_admin = admin_groups.iter().any(|g| groups.contains(g));
    let groups_synced_at: Option<i64> =
        sqlx::query_scalar("SELECT MAX(synced_at) FROM user_groups WHERE user_id = ?")
            .bind(user_id)
            .fetch_one(&mut *conn)
            .await?;
    Ok(Some(Actor {
        user_id: row.get("id"),
        email: row.get("email"),
        display_name: row.get("display_name"),
        issuer: row.get("issuer"),
        subject: row.get("subject"),
        sessions_valid_after: row.get("sessions_valid_after"),
        groups_synced_at,
        groups,
        is_admin,
    }))
}

pub async fn user_id_by_email(conn: &mut Conn, email: &str) -> Result<Option<String>> {
    Ok(sqlx::query_scalar("SELECT id FROM users WHERE email = ?")
        .bind(email)
        .fetch_optional(&mut *conn)
        .await?)
}

// ---------------------------------------------------------------- API tokens

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

// ---------------------------------------------------------------- requests

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
    pub status: String,
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
    pub status: Option<&'a str>,
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
        Some("pending") => {
            q.push(" AND r.status = 'pending' AND r.expires_at > ")
                .push_bind(f.now);
        }
        Some("expired") => {
            q.push(" AND (r.status = 'expired' OR (r.status = 'pending' AND r.expires_at <= ")
                .push_bind(f.now)
                .push("))");
        }
        Some(other) => {
            q.push(" AND r.status = ").push_bind(other.to_string());
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
pub async fn decide_request(conn: &mut Conn, id: &str, to: &str, now: i64) -> Result<bool> {
    let live_only = to != "expired";
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

// ---------------------------------------------------------------- approvals

#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct ApprovalRow {
    pub id: String,
    pub approver_id: String,
    pub approver_email: String,
    pub decision: String,
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
    pub decision: &'a str,
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

// ---------------------------------------------------------------- grants

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
    pub status: String,
    pub ended_at: Option<i64>,
    pub ended_by_email: Option<String>,
    pub end_comment: Option<String>,
}

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
    to: &str,
    now: i64,
    by: Option<&str>,
    comment: Option<&str>,
) -> Result<bool> {
    let natural = to == "ended";
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
        "SELECT {GRANT_COLUMNS} WHERE g.status = 'active' AND g.starts_at <= ?1 AND g.ends_at > ?1
         ORDER BY g.ends_at"
    ))
    .bind(now)
    .fetch_all(db)
    .await?)
}

/// Counts for the metrics page: pending requests and live grants.
pub async fn gauges(db: &Db, now: i64) -> Result<(i64, i64)> {
    let row = sqlx::query(
        "SELECT (SELECT COUNT(*) FROM access_requests WHERE status = 'pending' AND expires_at > ?1),
                (SELECT COUNT(*) FROM grants WHERE status = 'active' AND ends_at > ?1)",
    )
    .bind(now)
    .fetch_one(db)
    .await?;
    Ok((row.get(0), row.get(1)))
}

// ---------------------------------------------------------------- audit

/// Appends one event to the chain. Must run inside a [`begin_write`] transaction,
/// which makes reading the head and inserting after it atomic.
pub async fn append_audit(conn: &mut Conn, ts: i64, event: &NewEvent<'_>) -> Result<AuditEvent> {
    let head: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await?;
    let (seq, prev) = head.unwrap_or((0, GENESIS.to_string()));
    let ev = AuditEvent::chain(seq, &prev, ts, event);
    sqlx::query(
        "INSERT INTO audit_events (seq, ts, actor, action, subject, details, prev_hash, hash)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(ev.seq)
    .bind(ev.ts)
    .bind(&ev.actor)
    .bind(&ev.action)
    .bind(&ev.subject)
    .bind(&ev.details)
    .bind(&ev.prev_hash)
    .bind(&ev.hash)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?)
         ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
    )
    .bind(ev.seq)
    .bind(&ev.hash)
    .execute(&mut *conn)
    .await?;
    Ok(ev)
}

/// Every event in sequence order, a page at a time.
pub async fn audit_page(db: &Db, after_seq: i64, limit: i64) -> Result<Vec<AuditEvent>> {
    Ok(sqlx::query_as(
        "SELECT seq, ts, actor, action, subject, details, prev_hash, hash
         FROM audit_events WHERE seq > ? ORDER BY seq LIMIT ?",
    )
    .bind(after_seq)
    .bind(limit)
    .fetch_all(db)
    .await?)
}

/// The newest events first, for the admin page; optionally about one subject.
pub async fn recent_audit(db: &Db, subject: Option<&str>, limit: i64) -> Result<Vec<AuditEvent>> {
    Ok(sqlx::query_as(
        "SELECT seq, ts, actor, action, subject, details, prev_hash, hash
         FROM audit_events WHERE (?1 IS NULL OR subject = ?1) ORDER BY seq DESC LIMIT ?2",
    )
    .bind(subject)
    .bind(limit)
    .fetch_all(db)
    .await?)
}

/// Walks the whole chain in pages and verifies it.
pub async fn verify_audit(
    db: &Db,
) -> Result<std::result::Result<crate::audit::ChainOk, crate::audit::ChainBreak>> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = audit_page(db, after, 5000).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        all.extend(page);
    }
    let result = crate::audit::verify(all.into_iter().map(Ok::<_, crate::error::Error>))?;
    let head: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_optional(db)
            .await?;
    Ok(result.and_then(|ok| crate::audit::check_head(ok, head)))
}

// ---------------------------------------------------------------- outbox and action links

/// Users in any of these groups, except `except`: the people to tell about a request.
pub async fn users_in_groups(
    conn: &mut Conn,
    groups: &[String],
    except: &str,
) -> Result<Vec<(String, String)>> {
    let mut q = sqlx::QueryBuilder::<Sqlite>::new(
        "SELECT DISTINCT u.id, u.email FROM users u JOIN user_groups g ON g.user_id = u.id WHERE u.id != ",
    );
    q.push_bind(except.to_string())
        .push(" AND g.group_name IN (");
    let mut sep = q.separated(", ");
    for g in groups {
        sep.push_bind(g.clone());
    }
    q.push(") ORDER BY u.email");
    if groups.is_empty() {
        return Ok(Vec::new());
    }
    Ok(q.build_query_as().fetch_all(&mut *conn).await?)
}

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
    sqlx::query(
        "INSERT INTO outbox (id, request_id, kind, channel, recipient_id, recipient, next_attempt_at, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (request_id, kind, channel, recipient) DO NOTHING",
    )
    .bind(new_id())
    .bind(request_id)
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
    pub kind: String,
    pub channel: String,
    pub recipient_id: Option<String>,
    pub recipient: String,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub sent_at: Option<i64>,
}

const OUTBOX_COLUMNS: &str =
    "id, request_id, kind, channel, recipient_id, recipient, status, attempts,
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
pub async fn finish_outbox(conn: &mut Conn, id: &str, status: &str, now: i64) -> Result<()> {
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

// ---------------------------------------------------------------- Slack links

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

// ---------------------------------------------------------------- ssh certificates

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

/// A number that grows with every change to the audit chain (and so to the KRL).
pub async fn audit_head_seq(db: &Db) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM audit_events")
            .fetch_one(db)
            .await?,
    )
}

// ---------------------------------------------------------------- CLI sign-in codes

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

// ---------------------------------------------------------------- database logins

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DbCredentialRow {
    pub grant_id: String,
    pub resource: String,
    pub role_name: String,
    pub status: String,
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
    Ok(sqlx::query_scalar(
        "SELECT c.role_name FROM db_credentials c JOIN grants g ON g.id = c.grant_id
         WHERE g.status = 'active' AND g.ends_at > ?",
    )
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
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT id FROM grants WHERE status = 'active' AND ends_at > ? \
         AND id IN (SELECT value FROM json_each(?))",
    )
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
    let rows: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT g.id, g.resource, g.role,
                (SELECT json_group_array(ug.group_name) FROM user_groups ug WHERE ug.user_id = g.user_id)
         FROM grants g JOIN users u ON u.id = g.user_id
         WHERE g.status = 'active' AND g.ends_at > ? AND g.starts_at > u.sessions_valid_after
           AND g.id IN (SELECT value FROM json_each(?))",
    )
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
        "SELECT {GRANT_COLUMNS} WHERE g.user_id = ? AND g.status = 'active' AND g.ends_at > ?
         ORDER BY g.ends_at"
    ))
    .bind(user_id)
    .bind(now)
    .fetch_all(&mut *conn)
    .await?)
}

// ---------------------------------------------------------------- relay sessions

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
    /// From the grant: its holder and role, for permission checks.
    pub holder_id: String,
    pub role: String,
}

const SESSION_COLUMNS: &str = "s.id, s.grant_id, s.user_email, s.resource, s.peer, s.started_at,
     s.ended_at, s.end_reason, s.bytes_in, s.bytes_out, s.recording, s.recording_bytes,
     s.recording_sha256, s.recording_truncated, s.recording_failed, s.masked_inputs, s.interrupted, g.user_id AS holder_id, g.role AS role
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
}

pub async fn insert_session(conn: &mut Conn, s: &NewSession<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO relay_sessions (id, grant_id, user_email, resource, peer, started_at, recording, relay_instance)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(s.id)
    .bind(s.grant_id)
    .bind(s.user_email)
    .bind(s.resource)
    .bind(s.peer)
    .bind(s.started_at)
    .bind(s.recording)
    .bind(s.relay_instance)
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

/// A host key the relay saw on a target whose config pins none.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct HostKeyRow {
    pub id: String,
    pub resource: String,
    pub address: String,
    pub public_key: String,
    pub fingerprint: String,
    /// pending, confirmed, rejected, or replaced (by a later confirmed key).
    pub status: String,
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
    (from, to): (&str, &str),
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
