//! The audit log in the database: the one way to append an event ([`append`]), reading
//! events back, and verifying the stored chain, with their SQL.
//!
//! Every module that changes state appends through [`append`], in the transaction of
//! the change it records, so an event is never lost nor recorded for a change that
//! rolled back. Verification reads the chain a page at a time (keyset by `seq`), so it
//! holds one page in memory however long the chain is. Never updates or deletes an
//! event.

use super::{AuditEvent, ChainBreak, ChainOk, GENESIS, NewEvent, check_head, verify_from};
use crate::error::{Error, Result};
use crate::store::{Conn, Db};

/// How many events verification reads at a time.
pub const PAGE: i64 = 5000;

/// Appends one event to the chain. Must run inside a [`crate::store::begin_write`]
/// transaction, which makes reading the head and inserting after it atomic.
pub async fn append(conn: &mut Conn, ts: i64, event: &NewEvent<'_>) -> Result<AuditEvent> {
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
pub async fn page(db: &Db, after_seq: i64, limit: i64) -> Result<Vec<AuditEvent>> {
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
pub async fn recent(db: &Db, subject: Option<&str>, limit: i64) -> Result<Vec<AuditEvent>> {
    Ok(sqlx::query_as(
        "SELECT seq, ts, actor, action, subject, details, prev_hash, hash
         FROM audit_events WHERE (?1 IS NULL OR subject = ?1) ORDER BY seq DESC LIMIT ?2",
    )
    .bind(subject)
    .bind(limit)
    .fetch_all(db)
    .await?)
}

/// Walks the whole chain a page at a time and verifies it, then compares its end with
/// the recorded head. Holds one page in memory, however long the chain.
pub async fn verify_chain(db: &Db) -> Result<std::result::Result<ChainOk, ChainBreak>> {
    let (mut seq, mut hash) = (0i64, GENESIS.to_string());
    // A live server appends while this walks: the head is read after the walk, and
    // the events appended meanwhile (committed with the head, so there by then) are
    // walked too before the two are compared. Bounded: a chain still growing after a
    // few rounds is compared as it stands.
    let mut head = None;
    for _ in 0..8 {
        loop {
            let page = page(db, seq, PAGE).await?;
            if page.is_empty() {
                break;
            }
            // A page that verifies ends at `seq + its length`, so the next page's keyset
            // (`seq > last`) and the verifier's expected next seq agree.
            match verify_from(seq, &hash, page.into_iter().map(Ok::<_, Error>))? {
                Ok(ok) => {
                    seq += ok.events as i64;
                    hash = ok.head;
                }
                Err(b) => return Ok(Err(b)),
            }
        }
        head = recorded_head(db).await?;
        if head.as_ref().is_none_or(|(h, _)| *h <= seq) {
            break;
        }
    }
    Ok(check_head(
        ChainOk {
            events: seq as u64,
            head: hash,
        },
        head,
    ))
}

/// The head `append` recorded last (`audit_head`), which catches the newest events
/// being deleted.
pub async fn recorded_head(db: &Db) -> Result<Option<(i64, String)>> {
    Ok(
        sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_optional(db)
            .await?,
    )
}

/// A number that grows with every change to the audit chain (and so to the KRL).
pub async fn head_seq(db: &Db) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM audit_events")
            .fetch_one(db)
            .await?,
    )
}

/// Every event `action` about `subject`, oldest first (a grant's `session.ended`
/// events, say), however many there are.
pub async fn about(db: &Db, subject: &str, action: &str) -> Result<Vec<AuditEvent>> {
    Ok(sqlx::query_as(
        "SELECT seq, ts, actor, action, subject, details, prev_hash, hash
         FROM audit_events WHERE subject = ? AND action = ? ORDER BY seq",
    )
    .bind(subject)
    .bind(action)
    .fetch_all(db)
    .await?)
}
