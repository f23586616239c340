//! A PostgreSQL session's page: its transcript rendered on the server (no player, no
//! script), statement by statement, with the check of the file's SHA-256 against what
//! the audit chain recorded when the session ended, and the raw `.jsonl` download.
//!
//! Who may see it is decided before this module is called ([`super::sessions`]). A
//! transcript holds whatever the engineer sent and got back, so every value reaches the
//! page through askama's escaping: never `|safe` on transcript content. A transcript
//! that cannot be read (damaged, edited, missing) is shown as such, never a 500; one
//! whose hash does not match is shown as found, under a warning.

use askama::Template;
use askama_web::WebTemplate;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::error::PageError;
use super::extract::WebUser;
use super::sessions::{SessionVm, vm};
use super::views::Chrome;
use crate::error::Error;
use crate::recording::transcript::{self, Entry, Protocol, ReadBack, Statement};
use crate::state::AppState;
use crate::store::SessionRow;

/// Entries shown on the page at most; the rest are counted and in the download. Keeps
/// a page (and the memory it takes to build) bounded whatever the transcript's size.
pub const MAX_SHOWN: usize = 2000;

/// The transcript's hash on disk against the one the session's end recorded.
pub struct HashVm {
    /// SHA-256 of the file as it is now (empty when it cannot be read).
    pub found: String,
    /// SHA-256 the `session.ended` audit event recorded (empty when none).
    pub recorded: String,
    /// The audit event's sequence number, when there is one.
    pub seq: String,
    /// The verdict in words.
    pub verdict: String,
    /// True when the file is not what was recorded: shown prominently.
    pub alarm: bool,
}

/// A statement as shown.
pub struct StatementVm {
    /// 1-based, among statements.
    pub n: u64,
    pub at: String,
    pub protocol: &'static str,
    pub sql: String,
    /// For a multi-statement Query: which one (1-based), else 0.
    pub part: usize,
    /// The prepared statement's name, if named.
    pub name: String,
    pub params: Vec<Option<String>>,
    pub ms: String,
    pub tag: String,
    pub error: Option<transcript::StatementError>,
    pub skipped: bool,
    pub suspended: bool,
    pub row_count: u64,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
    /// Rows the result had beyond those kept.
    pub more_rows: u64,
    /// A result whose rows were counted but not kept (past the transcript's cap).
    pub rows_dropped: bool,
    pub copy_in: u64,
    pub copy_out: u64,
}

/// One line of the transcript as shown.
pub enum Item {
    Statement(Box<StatementVm>),
    Notification {
        at: String,
        channel: String,
        payload: String,
    },
    Note {
        at: String,
        text: String,
    },
}

#[derive(Template, WebTemplate)]
#[template(path = "db_session.html")]
struct DbSessionPage {
    chrome: Chrome,
    s: SessionVm,
    grant_id: String,
    end_reason: String,
    database: String,
    rows_cap: String,
    hash: HashVm,
    /// Why the transcript could not be read; empty when it was.
    read_error: String,
    /// What the header says that the session row does not.
    header_mismatch: String,
    items: Vec<Item>,
    statements: u64,
    not_shown: u64,
    truncated: bool,
    failed: bool,
    interrupted: bool,
}

/// Seconds since the session's start as `+1.234 s` or `+2:03.456`.
fn offset(t: f64) -> String {
    let t = if t.is_finite() { t.max(0.0) } else { 0.0 };
    if t < 60.0 {
        format!("+{t:.3} s")
    } else {
        let m = (t / 60.0).floor();
        format!("+{}:{:06.3}", m as u64, t - m * 60.0)
    }
}

/// A duration in milliseconds as `0.42 ms`, `12 ms` or `3.2 s`.
fn millis(ms: f64) -> String {
    let ms = if ms.is_finite() { ms.max(0.0) } else { 0.0 };
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.1} s", ms / 1000.0)
    }
}

fn protocol_name(p: Option<Protocol>) -> &'static str {
    match p {
        Some(Protocol::Simple) => "simple query",
        Some(Protocol::Extended) => "extended query",
        Some(Protocol::FunctionCall) => "function call",
        None => "",
    }
}

fn statement_vm(n: u64, s: Statement) -> StatementVm {
    let kept = s.rows.len() as u64;
    StatementVm {
        n,
        at: offset(s.t),
        protocol: protocol_name(s.protocol),
        part: if s.index > 0 { s.index + 1 } else { 0 },
        name: s.statement.unwrap_or_default(),
        params: s.params,
        ms: millis(s.ms),
        tag: s.tag.unwrap_or_default(),
        error: s.error,
        skipped: s.skipped,
        suspended: s.suspended,
        more_rows: s.row_count.saturating_sub(kept),
        rows_dropped: s.columns.is_empty() && s.row_count > 0 && kept == 0,
        row_count: s.row_count,
        columns: s.columns,
        rows: s.rows,
        copy_in: s.copy_bytes_in,
        copy_out: s.copy_bytes_out,
        sql: s.sql,
    }
}

fn items(entries: Vec<Entry>) -> Vec<Item> {
    let mut n = 0;
    entries
        .into_iter()
        .map(|e| match e {
            Entry::Statement(s) => {
                n += 1;
                Item::Statement(Box::new(statement_vm(n, *s)))
            }
            Entry::Notification {
                t,
                channel,
                payload,
            } => Item::Notification {
                at: offset(t),
                channel,
                payload,
            },
            Entry::Note { t, text } => Item::Note {
                at: offset(t),
                text,
            },
        })
        .collect()
}

/// The `session.ended` event of this session: its sequence number and the SHA-256 it
/// recorded. The chain is the record to trust (the row can be edited; an edited event
/// breaks the chain, which the audit page verifies).
async fn ended_event(state: &AppState, s: &SessionRow) -> Result<Option<(i64, String)>, Error> {
    let events = crate::audit::about(&state.db, &s.grant_id, "session.ended").await?;
    Ok(events.into_iter().find_map(|e| {
        let d: serde_json::Value = serde_json::from_str(&e.details).ok()?;
        (d["session_id"].as_str() == Some(s.id.as_str()))
            .then(|| (e.seq, d["sha256"].as_str().unwrap_or_default().to_string()))
    }))
}

fn hash_vm(s: &SessionRow, found: &Result<String, String>, event: Option<(i64, String)>) -> HashVm {
    let found_hash = found.clone().unwrap_or_default();
    let (seq, recorded) = match &event {
        Some((seq, sha)) => (seq.to_string(), sha.clone()),
        None => (String::new(), String::new()),
    };
    let row = s.recording_sha256.clone().unwrap_or_default();
    let (verdict, alarm) = if s.ended_at.is_none() {
        (
            "the session is live: its record is hashed into the audit chain when it ends"
                .to_string(),
            false,
        )
    } else if event.is_none() {
        (
            "no session.ended event for this session in the audit chain: nothing to check the file against"
                .to_string(),
            true,
        )
    } else if recorded.is_empty() {
        (
            "no hash was recorded when the session ended (its record could not be closed)"
                .to_string(),
            s.recording_failed,
        )
    } else if let Err(e) = found {
        (format!("the file cannot be read to check it: {e}"), true)
    } else if found_hash != recorded {
        (
            "DOES NOT MATCH the audit chain: the file was changed or damaged after the session ended. It is shown below as found."
                .to_string(),
            true,
        )
    } else if row != recorded {
        (
            "the file matches the audit chain, but the session's row was changed".to_string(),
            true,
        )
    } else {
        (format!("matches the audit chain (event {seq})"), false)
    };
    HashVm {
        found: found_hash,
        recorded,
        seq,
        verdict,
        alarm,
    }
}

/// A session's recording or transcript hashed as it is on disk now and checked against
/// the SHA-256 its `session.ended` event recorded (the SSH page shows the same check).
pub(super) async fn recording_check(state: &AppState, s: &SessionRow) -> Result<HashVm, Error> {
    let path = std::path::PathBuf::from(&s.recording);
    let found = tokio::task::spawn_blocking(move || {
        crate::recording::hash_file(&path)
            .map(|(_, sha)| sha)
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| Error::Internal(format!("hashing a recording: {e}")))?;
    let event = ended_event(state, s).await?;
    Ok(hash_vm(s, &found, event))
}

/// What the transcript's header says that the session row does not (an edited or
/// swapped file).
fn header_mismatch(s: &SessionRow, h: &transcript::Header) -> String {
    let mut out = Vec::new();
    if h.format != transcript::FORMAT {
        out.push(format!("format {:?}", h.format));
    }
    if h.session != s.id {
        out.push(format!("session {}", h.session));
    }
    if h.resource != s.resource {
        out.push(format!("resource {}", h.resource));
    }
    if h.user != s.user_email {
        out.push(format!("user {}", h.user));
    }
    out.join(", ")
}

/// The page of a PostgreSQL session its viewer may see.
pub async fn show(state: &AppState, user: &WebUser, s: SessionRow) -> Result<Response, PageError> {
    let hash = recording_check(state, &s).await?;
    let path = std::path::PathBuf::from(&s.recording);
    let read = tokio::task::spawn_blocking(move || transcript::read_first(&path, MAX_SHOWN))
        .await
        .map_err(|e| Error::Internal(format!("reading a transcript: {e}")))?;
    let (database, rows_cap, header_mismatch, items, statements, not_shown, read_error) = match read
    {
        Ok(ReadBack {
            header,
            entries,
            not_kept,
            statements,
        }) => (
            header.database.clone(),
            header.rows_cap.to_string(),
            header_mismatch(&s, &header),
            items(entries),
            statements,
            not_kept,
            String::new(),
        ),
        Err(e) => {
            // Only the kind is logged: a parse error can quote the transcript, and a
            // transcript can hold a secret someone typed.
            tracing::warn!(session = %s.id, kind = ?e.kind(), "a transcript cannot be read");
            (
                String::new(),
                String::new(),
                String::new(),
                Vec::new(),
                0,
                0,
                e.to_string(),
            )
        }
    };
    let page = DbSessionPage {
        chrome: Chrome::of(state, user).await?,
        s: vm(state, &s),
        end_reason: s.end_reason.clone().unwrap_or_default(),
        grant_id: s.grant_id,
        database,
        rows_cap,
        hash,
        read_error,
        header_mismatch,
        items,
        statements,
        not_shown,
        truncated: s.recording_truncated,
        failed: s.recording_failed,
        interrupted: s.interrupted,
    };
    Ok(page.into_response())
}

/// The raw transcript, as an attachment.
pub async fn download(s: SessionRow) -> Result<Response, PageError> {
    // Streamed from disk: a large transcript never sits in memory whole.
    let file = match tokio::fs::File::open(&s.recording).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotFound("transcript file").into());
        }
        Err(e) => return Err(Error::Internal(format!("transcript {}: {e}", s.id)).into()),
    };
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    // The id is ours (a UUID from the row), so it is safe in the header.
    let disposition = format!("attachment; filename=\"{}.jsonl\"", s.id);
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson".to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_and_durations_read_well() {
        for (t, want) in [
            (0.0, "+0.000 s"),
            (1.2345, "+1.234 s"),
            (59.9994, "+59.999 s"),
            (60.0, "+1:00.000"),
            (123.456, "+2:03.456"),
            (-1.0, "+0.000 s"),
            (f64::NAN, "+0.000 s"),
        ] {
            assert_eq!(offset(t), want, "{t}");
        }
        for (ms, want) in [
            (0.4213, "0.42 ms"),
            (12.4, "12 ms"),
            (999.0, "999 ms"),
            (3210.0, "3.2 s"),
            (f64::INFINITY, "0.00 ms"),
        ] {
            assert_eq!(millis(ms), want, "{ms}");
        }
    }

    fn row(ended: bool, row_sha: &str, failed: bool) -> SessionRow {
        SessionRow {
            id: "s1".into(),
            grant_id: "g1".into(),
            user_email: "a@example.com".into(),
            resource: "db".into(),
            peer: None,
            started_at: 0,
            ended_at: ended.then_some(1),
            end_reason: None,
            bytes_in: 0,
            bytes_out: 0,
            recording: "/x".into(),
            recording_bytes: None,
            recording_sha256: Some(row_sha.into()),
            recording_truncated: false,
            recording_failed: failed,
            masked_inputs: 0,
            interrupted: false,
            protocol: "postgres".into(),
            holder_id: "u1".into(),
            role: "read".into(),
        }
    }

    #[test]
    fn the_hash_verdict_alarms_on_anything_but_a_match() {
        let ok: Result<String, String> = Ok("aa".into());
        let gone: Result<String, String> = Err("No such file".into());
        let ev = |sha: &str| Some((7, sha.to_string()));
        for (s, found, event, starts, alarm) in [
            (
                row(true, "aa", false),
                &ok,
                ev("aa"),
                "matches the audit chain (event 7)",
                false,
            ),
            (
                row(false, "", false),
                &ok,
                None,
                "the session is live",
                false,
            ),
            (
                row(true, "bb", false),
                &ok,
                ev("bb"),
                "DOES NOT MATCH",
                true,
            ),
            (
                row(true, "aa", false),
                &gone,
                ev("aa"),
                "the file cannot be read",
                true,
            ),
            (
                row(true, "aa", false),
                &ok,
                None,
                "no session.ended event",
                true,
            ),
            (
                row(true, "cc", false),
                &ok,
                ev("aa"),
                "the file matches the audit chain, but",
                true,
            ),
            (
                row(true, "", true),
                &ok,
                ev(""),
                "no hash was recorded",
                true,
            ),
        ] {
            let v = hash_vm(&s, found, event);
            assert!(v.verdict.starts_with(starts), "{starts}: {}", v.verdict);
            assert_eq!(v.alarm, alarm, "{starts}");
        }
    }

    #[test]
    fn rows_beyond_those_kept_are_counted() {
        let s = |row_count, kept: usize, columns: bool| Statement {
            row_count,
            columns: if columns { vec!["a".into()] } else { vec![] },
            rows: vec![vec![Some("x".into())]; kept],
            ..Default::default()
        };
        for (st, more, dropped) in [
            (s(0, 0, false), 0, false),
            (s(2, 2, true), 0, false),
            (s(7, 2, true), 5, false),
            (s(7, 0, false), 7, true),
        ] {
            let v = statement_vm(1, st);
            assert_eq!((v.more_rows, v.rows_dropped), (more, dropped));
        }
    }
}
