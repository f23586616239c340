//! The pure hash chain: how an event is hashed onto the one before it, and how a run
//! of events is verified. No I/O: the same code checks the live table ([`super::log`])
//! and an exported file ([`super::checkpoint::verify_export`]).
//!
//! Each event's hash covers the previous event's hash and every field of its own,
//! each length-prefixed so no two different events hash alike. Editing, deleting or
//! reordering any row breaks the chain at that row, which [`verify`] reports.
//!
//! Never put a secret in `details`: the log is exported to auditors and SIEMs.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `prev_hash` of the first event.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One stored audit event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct AuditEvent {
    pub seq: i64,
    /// Milliseconds since the epoch.
    pub ts: i64,
    /// Who acted: an email, or `system` for the sweeper.
    pub actor: String,
    /// What happened, e.g. `request.created`, `request.approved`, `grant.revoked`.
    pub action: String,
    /// What it happened to: a request or grant id.
    pub subject: String,
    /// A JSON object, stored as the exact text that was hashed.
    pub details: String,
    pub prev_hash: String,
    pub hash: String,
}

/// An event about to be appended.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub subject: &'a str,
    pub details: serde_json::Value,
}

/// The hash of an event's content chained to `prev_hash`.
pub fn event_hash(
    prev_hash: &str,
    seq: i64,
    ts: i64,
    actor: &str,
    action: &str,
    subject: &str,
    details: &str,
) -> String {
    let mut h = Sha256::new();
    h.update(b"twokey-audit-v1");
    let seq = seq.to_string();
    let ts = ts.to_string();
    for part in [prev_hash, &seq, &ts, actor, action, subject, details] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

impl AuditEvent {
    /// Builds the event that follows `(prev_seq, prev_hash)`.
    pub fn chain(prev_seq: i64, prev_hash: &str, ts: i64, new: &NewEvent<'_>) -> AuditEvent {
        let seq = prev_seq + 1;
        let details = new.details.to_string();
        let hash = event_hash(
            prev_hash,
            seq,
            ts,
            new.actor,
            new.action,
            new.subject,
            &details,
        );
        AuditEvent {
            seq,
            ts,
            actor: new.actor.to_string(),
            action: new.action.to_string(),
            subject: new.subject.to_string(),
            details,
            prev_hash: prev_hash.to_string(),
            hash,
        }
    }

    fn recomputed_hash(&self) -> String {
        event_hash(
            &self.prev_hash,
            self.seq,
            self.ts,
            &self.actor,
            &self.action,
            &self.subject,
            &self.details,
        )
    }
}

/// Where and why a chain is broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    /// The first sequence number that does not verify.
    pub seq: i64,
    pub reason: String,
}

/// A verified chain's summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainOk {
    pub events: u64,
    pub head: String,
}

/// Verifies a chain in sequence order, from the first event (`seq` 1).
/// Works the same on the live table and on an exported file.
pub fn verify<I, E>(events: I) -> Result<Result<ChainOk, ChainBreak>, E>
where
    I: IntoIterator<Item = Result<AuditEvent, E>>,
{
    verify_from(0, GENESIS, events)
}

/// Verifies the events that follow `(after_seq, after_hash)`, in sequence order.
/// `ChainOk::events` counts the events checked here.
pub fn verify_from<I, E>(
    after_seq: i64,
    after_hash: &str,
    events: I,
) -> Result<Result<ChainOk, ChainBreak>, E>
where
    I: IntoIterator<Item = Result<AuditEvent, E>>,
{
    let mut prev = after_hash.to_string();
    let mut count = 0u64;
    for (expected_seq, ev) in (after_seq + 1..).zip(events) {
        let ev = ev?;
        if ev.seq != expected_seq {
            let reason = if ev.seq > expected_seq {
                format!("event {expected_seq} is missing (next found is {})", ev.seq)
            } else {
                format!("event {} is out of order", ev.seq)
            };
            return Ok(Err(ChainBreak {
                seq: expected_seq,
                reason,
            }));
        }
        if ev.prev_hash != prev {
            return Ok(Err(ChainBreak {
                seq: ev.seq,
                reason: "prev_hash does not match the previous event (deleted or reordered)".into(),
            }));
        }
        if ev.recomputed_hash() != ev.hash {
            return Ok(Err(ChainBreak {
                seq: ev.seq,
                reason: "content does not match its hash (edited)".into(),
            }));
        }
        prev = ev.hash;
        count += 1;
    }
    Ok(Ok(ChainOk {
        events: count,
        head: prev,
    }))
}

/// Compares a verified chain with the recorded head, which catches the newest events
/// being deleted (the shorter chain still verifies on its own).
pub fn check_head(ok: ChainOk, head: Option<(i64, String)>) -> Result<ChainOk, ChainBreak> {
    let Some((seq, hash)) = head else {
        return Ok(ok);
    };
    let last = ok.events as i64;
    if seq > last {
        return Err(ChainBreak {
            seq: last + 1,
            reason: format!(
                "events {} to {seq} are missing (the recorded head is {seq})",
                last + 1
            ),
        });
    }
    if seq == last && hash != ok.head {
        return Err(ChainBreak {
            seq,
            reason: "the last event does not match the recorded head".into(),
        });
    }
    Ok(ok)
}
#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn chain(n: i64) -> Vec<AuditEvent> {
        let mut out: Vec<AuditEvent> = Vec::new();
        for i in 0..n {
            let (seq, hash) = out
                .last()
                .map(|e| (e.seq, e.hash.clone()))
                .unwrap_or((0, GENESIS.to_string()));
            let subject = format!("r{i}");
            out.push(AuditEvent::chain(
                seq,
                &hash,
                1_700_000_000_000 + i,
                &NewEvent {
                    actor: "bob@example.com",
                    action: "request.approved",
                    subject: &subject,
                    details: serde_json::json!({"n": i}),
                },
            ));
        }
        out
    }

    fn check(events: Vec<AuditEvent>) -> Result<ChainOk, ChainBreak> {
        verify(events.into_iter().map(Ok::<_, ()>)).unwrap()
    }

    #[test]
    fn intact_chain_verifies() {
        let ok = check(chain(5)).unwrap();
        assert_eq!(ok.events, 5);
        assert_eq!(check(Vec::new()).unwrap().head, GENESIS);
    }

    #[test]
    fn edits_deletions_and_swaps_are_located() {
        let mut edited = chain(5);
        edited[2].details = r#"{"n":99}"#.into();
        assert_eq!(check(edited).unwrap_err().seq, 3);

        let mut deleted = chain(5);
        deleted.remove(1);
        assert_eq!(check(deleted).unwrap_err().seq, 2);

        // Swap the content of rows 3 and 4, keeping their seq numbers in place.
        let mut swapped = chain(5);
        let (a, b) = (swapped[2].clone(), swapped[3].clone());
        swapped[2] = AuditEvent { seq: 3, ..b };
        swapped[3] = AuditEvent { seq: 4, ..a };
        assert_eq!(check(swapped).unwrap_err().seq, 3);

        let mut rehashed = chain(5);
        // An attacker who edits a row and recomputes its hash still breaks the next link.
        rehashed[1].actor = "mallory@example.com".into();
        rehashed[1].hash = rehashed[1].recomputed_hash();
        assert_eq!(check(rehashed).unwrap_err().seq, 3);
    }

    #[test]
    fn fields_cannot_be_shifted_across_boundaries() {
        let a = event_hash(GENESIS, 1, 1, "ab", "c", "s", "{}");
        let b = event_hash(GENESIS, 1, 1, "a", "bc", "s", "{}");
        assert_ne!(a, b);
    }

    #[test]
    fn a_truncated_chain_is_caught_by_the_head() {
        let full = chain(5);
        let head = Some((5, full[4].hash.clone()));
        assert!(check_head(check(full.clone()).unwrap(), head.clone()).is_ok());
        let truncated = full[..3].to_vec();
        let ok = check(truncated).unwrap();
        assert_eq!(check_head(ok, head).unwrap_err().seq, 4);
    }
}
