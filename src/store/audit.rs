//! The audit chain's SQL (moving to `audit/`).

use super::{Conn, Db};
use crate::audit::{AuditEvent, GENESIS, NewEvent};
use crate::error::Result;

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

/// A number that grows with every change to the audit chain (and so to the KRL).
pub async fn audit_head_seq(db: &Db) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM audit_events")
            .fetch_one(db)
            .await?,
    )
}
