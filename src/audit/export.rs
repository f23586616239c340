//! The JSONL export: one event (or signed checkpoint) per line, closed by a statement
//! signed over the last event; written a page at a time ([`write`]) and parsed back for
//! offline verification ([`parse_export_line`]).
//!
//! Never adds anything to a line that the chain does not hold, except the readable
//! `time` (ignored when parsed back).

use std::io::Write;

use super::{AuditEvent, GENESIS, PAGE, checkpoint, signing};
use crate::clock::from_millis;
use crate::error::Error;
use crate::state::AppState;

impl AuditEvent {
    /// One line of the JSONL export: the stored fields plus a readable time.
    pub fn to_export_line(&self) -> String {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(obj) = v.as_object_mut() {
            obj.insert(
                "time".into(),
                from_millis(self.ts)
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                    .into(),
            );
        }
        v.to_string()
    }
}

/// One line of a JSONL export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportLine {
    Event(AuditEvent),
    /// A signed checkpoint from the database, placed after the event it covers.
    Checkpoint(checkpoint::SignedHead),
    /// The export's closing statement, signed when it was written: always the last line.
    End(checkpoint::SignedHead),
}

/// Parses a JSONL export line back for offline verification.
pub fn parse_export_line(line: &str) -> Result<ExportLine, String> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not an audit event: {e}"))?;
    for (key, end) in [
        (checkpoint::EXPORT_CHECKPOINT_KEY, false),
        (checkpoint::EXPORT_END_KEY, true),
    ] {
        if let Some(inner) = v.get(key) {
            let head = checkpoint::SignedHead::from_export(inner)
                .map_err(|e| format!("not a checkpoint: {e}"))?;
            return Ok(if end {
                ExportLine::End(head)
            } else {
                ExportLine::Checkpoint(head)
            });
        }
    }
    serde_json::from_value(v)
        .map(ExportLine::Event)
        .map_err(|e| format!("not an audit event: {e}"))
}

/// Why an export stopped.
#[derive(Debug)]
pub enum ExportError {
    /// Reading the chain or signing failed.
    Store(Error),
    /// The output could not be opened (the message names it).
    Open(String),
    /// Writing the output failed.
    Io(std::io::Error),
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    pub events: u64,
    /// The seq the closing checkpoint covers (0 for an empty log).
    pub end_seq: i64,
}

/// Signs a closing checkpoint, then opens the output with `open` and writes every
/// event up to it, a page at a time, each signed checkpoint after the event it covers,
/// and the signed closing statement last.
pub async fn write<W: Write>(
    state: &AppState,
    open: impl FnOnce() -> Result<W, String>,
) -> Result<Exported, ExportError> {
    // Always a checkpoint at export: the file ends with a statement signed over its
    // last event, so a copy cut short, or ending at an earlier checkpoint, fails.
    let closing = signing::checkpoint(state, "export")
        .await
        .map_err(ExportError::Store)?;
    let (end_seq, end_hash, end_ts) = match &closing {
        Some(c) => (c.seq, c.hash.clone(), c.ts),
        None => (0, GENESIS.to_string(), state.now_ms()),
    };
    let end = state
        .audit_key
        .sign_export_end(end_seq, &end_hash, end_ts)
        .map_err(ExportError::Store)?;
    let checkpoints = checkpoint::list(&state.db, end_seq)
        .await
        .map_err(ExportError::Store)?;
    let mut checkpoints = checkpoints.into_iter().peekable();
    let mut out = open().map_err(ExportError::Open)?;
    let mut after = 0;
    let mut count = 0u64;
    'pages: while after < end_seq {
        let page = super::page(&state.db, after, PAGE)
            .await
            .map_err(ExportError::Store)?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for ev in &page {
            // Events added while exporting belong to the next export.
            if ev.seq > end_seq {
                break 'pages;
            }
            writeln!(out, "{}", ev.to_export_line()).map_err(ExportError::Io)?;
            count += 1;
            while let Some(cp) = checkpoints.next_if(|c| c.seq <= ev.seq) {
                writeln!(out, "{}", cp.to_export_line()).map_err(ExportError::Io)?;
            }
        }
    }
    writeln!(out, "{}", end.to_export_end_line()).map_err(ExportError::Io)?;
    out.flush().map_err(ExportError::Io)?;
    Ok(Exported {
        events: count,
        end_seq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::tests::chain;

    #[test]
    fn export_lines_round_trip() {
        for ev in chain(3) {
            let line = ev.to_export_line();
            assert!(line.contains("\"time\""));
            assert_eq!(parse_export_line(&line).unwrap(), ExportLine::Event(ev));
        }
    }
}
