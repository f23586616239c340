//! Verifying the evidence: the stored chain with its recorded head, every signed
//! checkpoint and an operator's pinned head ([`verify_db`]), or an export file offline
//! ([`verify_export`]), each with the same messages `twokey audit verify` prints.
//!
//! Reads the database a page at a time; never writes, and never trusts a key it was
//! not given (or, for an export without one, the export's own closing key, which the
//! caller is told to compare).

use std::collections::BTreeMap;

use ssh_key::PublicKey;

use super::checkpoint::{
    ACTION, CHECKPOINT_NAMESPACE, EXPORT_NAMESPACE, SignedHead, fingerprint, list,
};
use super::{ChainBreak, ChainOk, GENESIS, PAGE, check_head, recorded_head, verify_from};
use crate::error::{Error, Result};
use crate::store::Db;

/// A head an operator recorded earlier (`SEQ:HASH`): the chain must still hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadPin {
    pub seq: i64,
    pub hash: String,
}

impl std::str::FromStr for HeadPin {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("{s:?} is not SEQ:HASH (as `twokey audit verify` prints the head)");
        let (seq, hash) = s.trim().split_once(':').ok_or_else(bad)?;
        let seq: i64 = seq.parse().map_err(|_| bad())?;
        let hash = hash.to_ascii_lowercase();
        if seq < 1 || hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        Ok(HeadPin { seq, hash })
    }
}

/// What a successful verification established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub chain: ChainOk,
    /// The newest signed checkpoint's seq, if any.
    pub checkpoint: Option<i64>,
    /// The fingerprint of the key the newest checkpoint was signed with.
    pub key: Option<String>,
}

/// Why verification failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The hash chain itself is broken.
    Chain(ChainBreak),
    /// A signed checkpoint is missing, forged, or no longer matches the chain.
    Checkpoint { seq: i64, reason: String },
    /// The operator's pinned head is not in the chain.
    Pin(String),
    /// An export file is incomplete (cut off) or malformed.
    Export(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Chain(b) => write!(f, "first bad event is seq {}: {}", b.seq, b.reason),
            Failure::Checkpoint { seq, reason } => write!(f, "checkpoint at seq {seq}: {reason}"),
            Failure::Pin(r) => write!(f, "pinned head: {r}"),
            Failure::Export(r) => write!(f, "{r}"),
        }
    }
}

/// Checks signed checkpoints against a verified chain of `end` events. `hash_at(seq)`
/// is the verified hash of event `seq`, known at least for every checkpoint's seq and
/// the pin's within `1..=end`; `recorded` the seqs of `audit.checkpoint` events; each
/// checkpoint must be signed by one of `accepted`.
pub fn check_signed(
    end: i64,
    hash_at: impl Fn(i64) -> Option<String>,
    checkpoints: &[SignedHead],
    recorded: &[i64],
    accepted: &[PublicKey],
    pin: Option<&HeadPin>,
) -> std::result::Result<(Option<i64>, Option<String>), Failure> {
    let mut newest: Option<(i64, String)> = None;
    for cp in checkpoints {
        let fail = |reason: String| Failure::Checkpoint {
            seq: cp.seq,
            reason,
        };
        let key = cp.verify(CHECKPOINT_NAMESPACE, accepted).map_err(fail)?;
        if cp.seq < 1 || cp.seq > end {
            return Err(fail(format!(
                "it covers seq {} but the chain ends at seq {end}: the newest events were deleted or cut off",
                cp.seq
            )));
        }
        // A rewrite that recomputed every hash still cannot match the signed one.
        if hash_at(cp.seq).as_deref() != Some(cp.hash.as_str()) {
            return Err(fail(format!(
                "event {} does not match the signed head: the chain was rewritten at or before seq {}",
                cp.seq, cp.seq
            )));
        }
        if newest.as_ref().is_none_or(|(s, _)| *s < cp.seq) {
            newest = Some((cp.seq, fingerprint(&key)));
        }
    }
    for &seq in recorded {
        if !checkpoints.iter().any(|c| c.seq == seq) {
            return Err(Failure::Checkpoint {
                seq,
                reason: "event records a checkpoint whose signed head is missing (deleted)".into(),
            });
        }
    }
    if let Some(pin) = pin {
        if pin.seq > end {
            return Err(Failure::Pin(format!(
                "seq {} is beyond the end of the chain (seq {end}): events were deleted or cut off",
                pin.seq
            )));
        }
        if hash_at(pin.seq).as_deref() != Some(pin.hash.as_str()) {
            return Err(Failure::Pin(format!(
                "event {} does not have the pinned hash: the chain was rewritten at or before seq {}",
                pin.seq, pin.seq
            )));
        }
    }
    Ok(match newest {
        Some((s, k)) => (Some(s), Some(k)),
        None => (None, None),
    })
}

/// Verifies the live database: the chain, the recorded head, every signed checkpoint
/// (with one of `accepted`), and the pinned head. Reads the chain a page at a time and
/// keeps only the hashes the checkpoints and the pin need, so it holds one page (plus
/// the checkpoints) in memory, however long the chain.
pub async fn verify_db(
    db: &Db,
    accepted: &[PublicKey],
    pin: Option<&HeadPin>,
) -> Result<std::result::Result<Verified, Failure>> {
    // The checkpoints first: each covers an event that already exists, so the chain
    // read after them holds every event they name.
    let checkpoints = list(db, i64::MAX).await?;
    let mut needed: BTreeMap<i64, Option<String>> = checkpoints
        .iter()
        .map(|c| c.seq)
        .chain(pin.map(|p| p.seq))
        .map(|s| (s, None))
        .collect();
    let mut recorded = Vec::new();
    let (mut seq, mut hash) = (0i64, GENESIS.to_string());
    loop {
        let page = super::page(db, seq, PAGE).await?;
        if page.is_empty() {
            break;
        }
        for e in &page {
            if let Some(slot) = needed.get_mut(&e.seq) {
                *slot = Some(e.hash.clone());
            }
            if e.action == ACTION {
                recorded.push(e.seq);
            }
        }
        match verify_from(seq, &hash, page.into_iter().map(Ok::<_, Error>))? {
            Ok(ok) => {
                seq += ok.events as i64;
                hash = ok.head;
            }
            Err(b) => return Ok(Err(Failure::Chain(b))),
        }
    }
    let head = recorded_head(db).await?;
    let chain = match check_head(
        ChainOk {
            events: seq as u64,
            head: hash,
        },
        head,
    ) {
        Ok(c) => c,
        Err(b) => return Ok(Err(Failure::Chain(b))),
    };
    let hash_at = |s: i64| needed.get(&s).cloned().flatten();
    Ok(
        check_signed(seq, hash_at, &checkpoints, &recorded, accepted, pin).map(
            |(checkpoint, key)| Verified {
                chain,
                checkpoint,
                key,
            },
        ),
    )
}

/// Verifies an export offline: the chain, its checkpoints, and its closing statement,
/// which must be the last line and cover the last event. With no `accepted` key the
/// closing statement's own key is used for every line (and should be compared with
/// the server's); with some, every signature must be by one of them.
pub fn verify_export<I, E>(
    lines: I,
    accepted: &[PublicKey],
    pin: Option<&HeadPin>,
) -> std::result::Result<std::result::Result<Verified, Failure>, E>
where
    I: IntoIterator<Item = std::result::Result<super::ExportLine, E>>,
{
    use super::ExportLine;
    let mut hashes = Vec::new();
    let mut recorded = Vec::new();
    let mut checkpoints = Vec::new();
    let mut end: Option<SignedHead> = None;
    let (mut seq, mut hash) = (0i64, GENESIS.to_string());
    for line in lines {
        let line = line?;
        if end.is_some() {
            return Ok(Err(Failure::Export(
                "lines follow the export's closing checkpoint: not a file twokey wrote".into(),
            )));
        }
        match line {
            ExportLine::Event(ev) => {
                let (ev_seq, ev_hash, is_cp) = (ev.seq, ev.hash.clone(), ev.action == ACTION);
                match verify_from(seq, &hash, std::iter::once(Ok::<_, E>(ev)))? {
                    Ok(_) => {
                        seq = ev_seq;
                        hash = ev_hash.clone();
                        hashes.push(ev_hash);
                        if is_cp {
                            recorded.push(ev_seq);
                        }
                    }
                    Err(b) => return Ok(Err(Failure::Chain(b))),
                }
            }
            ExportLine::Checkpoint(cp) => checkpoints.push(cp),
            ExportLine::End(e) => end = Some(e),
        }
    }
    let Some(end) = end else {
        return Ok(Err(Failure::Export(format!(
            "the export's closing checkpoint is missing (after seq {seq}): the file was cut off, or is not a complete export"
        ))));
    };
    let own;
    let accepted = if accepted.is_empty() {
        match end.signer() {
            Ok(k) => {
                own = [k];
                &own[..]
            }
            Err(e) => {
                return Ok(Err(Failure::Export(format!(
                    "the export's closing checkpoint: {e}"
                ))));
            }
        }
    } else {
        accepted
    };
    if let Err(e) = end.verify(EXPORT_NAMESPACE, accepted) {
        return Ok(Err(Failure::Export(format!(
            "the export's closing checkpoint: {e}"
        ))));
    }
    if end.seq != seq || end.hash != hash {
        return Ok(Err(Failure::Export(format!(
            "the export's closing checkpoint covers seq {} but the file's events end at seq {seq}: events were cut off or altered",
            end.seq
        ))));
    }
    Ok(check_signed(
        hashes.len() as i64,
        |s| hashes.get(usize::try_from(s - 1).ok()?).cloned(),
        &checkpoints,
        &recorded,
        accepted,
        pin,
    )
    .map(|(checkpoint, _)| Verified {
        chain: ChainOk {
            events: seq as u64,
            head: hash,
        },
        checkpoint,
        key: Some(fingerprint(&accepted[0])).filter(|_| accepted.len() == 1),
    }))
}
