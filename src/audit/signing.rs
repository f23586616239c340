//! Signing checkpoints of the stored chain: [`checkpoint`] now (a command, an export),
//! [`checkpoint_if_due`] from the background sweeper, never over a chain that no longer
//! extends what was signed, reading back what was signed ([`super::checkpoint::list`]).
//!
//! The key and the signed statement are [`super::checkpoint`]'s; this file holds the
//! SQL. It must never sign a rewritten chain.

use super::checkpoint::{ACTION, CHECKPOINT_NAMESPACE, SignedHead};
use super::{AuditEvent, GENESIS, NewEvent, verify_from};
use crate::error::{Error, Result};
use crate::state::AppState;
use crate::store::{self, Conn};

/// Signs a checkpoint of the current head now (unless the head is already one), e.g.
/// for `twokey audit checkpoint` and at export. Returns the newest checkpoint, or
/// `None` when the log is empty.
pub async fn checkpoint(state: &AppState, reason: &str) -> Result<Option<SignedHead>> {
    make(state, reason, true).await
}

/// The background worker's step: signs a checkpoint when the head has moved and
/// either `audit.checkpoint_every` events or `audit.checkpoint_interval` have passed
/// since the last one (or there is none yet). Returns the new checkpoint, if any.
pub async fn checkpoint_if_due(state: &AppState) -> Result<Option<SignedHead>> {
    make(state, "periodic", false).await
}

async fn make(state: &AppState, reason: &str, force: bool) -> Result<Option<SignedHead>> {
    let now = state.now_ms();
    let signer = &state.audit_key;
    let mut tx = store::begin_write(&state.db).await?;
    let head: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *tx)
            .await?;
    let Some((head_seq, _)) = head else {
        return Ok(None);
    };
    let last = latest(&mut tx).await?;
    if let Some(last) = &last {
        if last.seq >= head_seq && !force {
            return Ok(None);
        }
        let cfg = &state.config().audit;
        let interval = i64::try_from(cfg.checkpoint_interval().as_millis()).unwrap_or(i64::MAX);
        let due = (head_seq - last.seq) as u64 >= cfg.checkpoint_every
            || now.saturating_sub(last.ts) >= interval;
        if !force && !due {
            return Ok(None);
        }
    }
    // Never bless a rewritten chain: what is signed must extend what was signed.
    if let Err(why) = extends(&mut tx, last.as_ref(), signer.remembered()).await? {
        tracing::error!(reason = %why, "audit: refusing to sign a checkpoint");
        return Err(Error::Internal(format!(
            "audit: refusing to sign a checkpoint: {why}; run `twokey audit verify`"
        )));
    }
    if let Some(last) = last.as_ref().filter(|l| l.seq >= head_seq) {
        // Already signed, and still matching (checked just above).
        return Ok(Some(last.clone()));
    }
    let details = serde_json::json!({
        "key": signer.fingerprint(),
        "reason": reason,
        "previous": last.as_ref().map(|l| l.seq),
    });
    let ev = super::append(
        &mut tx,
        now,
        &NewEvent {
            actor: "system",
            action: ACTION,
            subject: "audit",
            details,
        },
    )
    .await?;
    // The checkpoint covers its own event: removing the row leaves an
    // `audit.checkpoint` event without its signature, which verify reports.
    let signed = signer.sign(CHECKPOINT_NAMESPACE, ev.seq, &ev.hash, now)?;
    sqlx::query(
        "INSERT INTO audit_checkpoints (seq, hash, ts, key_fingerprint, signature)
         VALUES (?, ?, ?, ?, ?)",
    )
    .bind(signed.seq)
    .bind(&signed.hash)
    .bind(signed.ts)
    .bind(signer.fingerprint())
    .bind(&signed.signature)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    signer.remember(signed.seq, &signed.hash);
    tracing::info!(seq = signed.seq, "audit checkpoint signed");
    Ok(Some(signed))
}

async fn latest(conn: &mut Conn) -> Result<Option<SignedHead>> {
    Ok(sqlx::query_as(
        "SELECT seq, hash, ts, signature FROM audit_checkpoints ORDER BY seq DESC LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await?)
}

async fn hash_at(conn: &mut Conn, seq: i64) -> Result<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT hash FROM audit_events WHERE seq = ?")
            .bind(seq)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

/// Whether the chain still holds the last checkpoint (and what this process last
/// signed) and links correctly from there to the head. `Ok(Err(why))` is a refusal.
async fn extends(
    conn: &mut Conn,
    last: Option<&SignedHead>,
    remembered: Option<(i64, String)>,
) -> Result<std::result::Result<(), String>> {
    let (mut seq, mut hash) = match last {
        Some(l) => {
            // Any key may have signed it (the key may have been rotated): the
            // signature must be sound, and `audit verify` judges the key.
            let signer = match l.signer() {
                Ok(k) => k,
                Err(e) => return Ok(Err(format!("the checkpoint at seq {}: {e}", l.seq))),
            };
            if let Err(e) = l.verify(CHECKPOINT_NAMESPACE, &[signer]) {
                return Ok(Err(format!("the checkpoint at seq {}: {e}", l.seq)));
            }
            if hash_at(conn, l.seq).await?.as_deref() != Some(l.hash.as_str()) {
                return Ok(Err(format!(
                    "event {} no longer matches the checkpoint signed for it",
                    l.seq
                )));
            }
            (l.seq, l.hash.clone())
        }
        None => {
            let recorded: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM audit_events WHERE action = ?")
                    .bind(ACTION)
                    .fetch_one(&mut *conn)
                    .await?;
            if recorded > 0 {
                return Ok(Err(format!(
                    "the chain records {recorded} checkpoint(s) but audit_checkpoints holds none"
                )));
            }
            (0, GENESIS.to_string())
        }
    };
    if let Some((s, h)) = remembered
        && hash_at(conn, s).await?.as_deref() != Some(h.as_str())
    {
        return Ok(Err(format!(
            "event {s} no longer matches what this server signed for it"
        )));
    }
    loop {
        let page: Vec<AuditEvent> = sqlx::query_as(
            "SELECT seq, ts, actor, action, subject, details, prev_hash, hash
             FROM audit_events WHERE seq > ? ORDER BY seq LIMIT 5000",
        )
        .bind(seq)
        .fetch_all(&mut *conn)
        .await?;
        if page.is_empty() {
            return Ok(Ok(()));
        }
        match verify_from(seq, &hash, page.into_iter().map(Ok::<_, Error>))? {
            Ok(ok) => {
                seq += ok.events as i64;
                hash = ok.head;
            }
            Err(b) => return Ok(Err(format!("event {}: {}", b.seq, b.reason))),
        }
    }
}
