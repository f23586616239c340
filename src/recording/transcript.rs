//! PostgreSQL session transcripts: JSON Lines, a [`Header`] line and then one
//! [`Entry`] per statement run (its text, parameters, protocol, start, duration, rows,
//! command tag or error, and the first rows of its result), per notification, and per
//! note the relay makes (a cut, the cap reached). When the session closes, the file's
//! SHA-256 and size go into the audit chain, as for terminal recordings.
//!
//! The cap works as for terminal recordings: past it, results (columns and rows) are no
//! longer written, but every statement the engineer sends still is, with its outcome
//! and row count. Nothing the session does can switch its record off (DESIGN.md
//! invariant 8). This file writes and reads the format only; what goes into an entry is
//! the relay's.

use std::io::{BufRead, Write};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::Finished;
use super::hashed::Hashed;

/// What the format's first line says.
pub const FORMAT: &str = "twokey-pg-transcript";

/// The first line of a transcript.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Header {
    pub format: String,
    pub version: u32,
    /// Unix seconds at the session's start.
    pub timestamp: i64,
    pub session: String,
    pub resource: String,
    pub user: String,
    /// The database the relay logged in to upstream.
    pub database: String,
    /// Rows of each result kept (the role's `transcript_rows`).
    pub rows_cap: usize,
}

/// One event of a session, after the header.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Entry {
    /// A statement that ran (or failed, or was not run).
    Statement(Box<Statement>),
    /// A NOTIFY delivered to the session.
    Notification {
        /// Seconds since the session's start.
        t: f64,
        channel: String,
        payload: String,
    },
    /// Something the relay says about the session (a cut, the cap reached).
    Note { t: f64, text: String },
}

/// How a statement reached the server.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// A Query message (psql's default); one entry per statement of the string.
    Simple,
    /// Parse/Bind/Execute (drivers, prepared statements, pipelines).
    Extended,
    /// A FunctionCall message.
    FunctionCall,
}

/// A statement and its outcome.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Statement {
    /// Seconds since the session's start, when it was sent.
    pub t: f64,
    pub protocol: Option<Protocol>,
    /// The statement's text (for a Query of several statements, the whole string, with
    /// `index` telling which).
    pub sql: String,
    /// Which statement of a multi-statement Query (0-based).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub index: usize,
    /// The prepared statement's name (extended protocol), if named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement: Option<String>,
    /// Bound parameters as text; binary ones as `\x` and hex; `None` for NULL.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub params: Vec<Option<String>>,
    /// How long until its outcome, in milliseconds.
    pub ms: f64,
    /// The result's column names, when it had one (and the cap is not reached).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
    /// Its first rows, as text (binary values as `\x` and hex), up to the header's
    /// `rows_cap`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rows: Vec<Vec<Option<String>>>,
    /// All rows the result had, kept or not.
    pub row_count: u64,
    /// The command tag (`SELECT 3`, `INSERT 0 1`, `COPY 10`), when it completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Its error, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<StatementError>,
    /// Not run: refused by the relay under this rule (its message is the error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Not run: an earlier error in the same pipeline made the server skip it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// The portal was suspended after a row limit (Execute with max rows).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspended: bool,
    /// COPY bytes the client sent (FROM STDIN) and received (TO STDOUT).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub copy_bytes_in: u64,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub copy_bytes_out: u64,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

/// An error the server answered a statement with.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StatementError {
    pub severity: String,
    /// The SQLSTATE, e.g. `42P01`.
    pub code: String,
    pub message: String,
}

/// One session's transcript, hashed as it is written.
pub struct Transcript {
    file: Hashed,
    /// Lines not yet written out: at most about [`BUFFER`], and let go of while the
    /// session is quiet (an idle session holds none).
    buf: Vec<u8>,
    path: std::path::PathBuf,
    started: Instant,
    limit: u64,
    truncated: bool,
    failed: bool,
    finished: bool,
    last_flush: Instant,
}

/// How long a running session's entries may wait in memory before they reach the file
/// (so a crash loses at most this much, and a live session's page lags at most this).
pub const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Bytes of lines held before they are written out regardless of the time.
const BUFFER: usize = 16 * 1024;

impl Transcript {
    /// A new transcript `SESSION_ID.jsonl` in `dir` (made if missing), never
    /// overwriting one; results past `limit` bytes are counted, not written.
    pub fn create(
        dir: &std::path::Path,
        header: &Header,
        limit: u64,
    ) -> std::io::Result<Transcript> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{}.jsonl", header.session));
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let mut t = Transcript {
            file: Hashed {
                file,
                hasher: Sha256::new(),
                bytes: 0,
                broken: false,
            },
            buf: Vec::new(),
            path,
            started: Instant::now(),
            limit,
            truncated: false,
            failed: false,
            finished: false,
            last_flush: Instant::now(),
        };
        t.line(header);
        Ok(t)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Seconds since the transcript began, for an entry's `t`.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Whether every write so far reached the file.
    pub fn is_whole(&self) -> bool {
        !self.failed
    }

    /// Writes an entry. Past the cap a statement keeps its text, parameters and outcome
    /// but loses its columns and rows.
    pub fn write(&mut self, entry: Entry) {
        if self.finished {
            return;
        }
        let mut entry = entry;
        if !self.truncated && self.file.bytes + self.buf.len() as u64 >= self.limit {
            self.truncated = true;
            let t = self.elapsed();
            self.line(&Entry::Note {
                t,
                text: "the transcript reached its size cap: results from here on are counted, not kept".into(),
            });
        }
        if self.truncated
            && let Entry::Statement(s) = &mut entry
        {
            s.columns.clear();
            s.rows.clear();
        }
        self.line(&entry);
    }

    /// Writes out what is buffered.
    pub fn flush(&mut self) {
        if !self.buf.is_empty() {
            self.failed |= self.file.write_all(&self.buf).is_err();
            self.buf.clear();
        }
        self.last_flush = Instant::now();
    }

    /// Writes out what is buffered and lets go of the buffer (the session went quiet).
    pub fn release(&mut self) {
        self.flush();
        self.buf = Vec::new();
    }

    /// Writes out what is buffered if the last write-out is [`FLUSH_EVERY`] old: a
    /// busy session does not pay one file write per statement.
    pub fn flush_if_due(&mut self) {
        if self.last_flush.elapsed() >= FLUSH_EVERY {
            self.flush();
        }
    }

    fn line<T: Serialize>(&mut self, v: &T) {
        let at = self.buf.len();
        if serde_json::to_writer(&mut self.buf, v).is_err() {
            self.buf.truncate(at);
            self.failed = true;
            return;
        }
        self.buf.push(b'\n');
        if self.buf.len() >= BUFFER {
            self.flush();
        }
    }

    /// Closes the transcript and returns its size and hash, taken as it was written.
    pub fn finish(&mut self) -> std::io::Result<Finished> {
        if self.finished {
            return Err(std::io::Error::other("transcript already finished"));
        }
        self.finished = true;
        self.flush();
        let inner = &mut self.file;
        self.failed |= inner.file.sync_all().is_err();
        let sha256 = hex::encode(std::mem::take(&mut inner.hasher).finalize());
        Ok(Finished {
            path: self.path.display().to_string(),
            bytes: inner.bytes,
            sha256,
            truncated: self.truncated,
            failed: self.failed,
            masked_inputs: 0,
        })
    }
}

/// A transcript read back: its header and entries; a line that does not parse is an
/// error naming its number (a damaged or edited file is shown as such, not skipped).
pub fn read(path: &std::path::Path) -> std::io::Result<(Header, Vec<Entry>)> {
    let f = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut lines = f.lines();
    let bad = |n: usize, e: serde_json::Error| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("transcript line {n}: {e}"),
        )
    };
    let first = lines.next().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "empty transcript")
    })??;
    let header: Header = serde_json::from_str(&first).map_err(|e| bad(1, e))?;
    let mut entries = Vec::new();
    for (i, line) in lines.enumerate() {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        entries.push(serde_json::from_str(&line).map_err(|e| bad(i + 2, e))?);
    }
    Ok((header, entries))
}

/// A transcript read back for showing: its header, its first entries, and what the rest
/// held (every line is still parsed, so damage anywhere is an error, as with [`read`]).
#[derive(Debug)]
pub struct ReadBack {
    pub header: Header,
    /// The first `keep` entries.
    pub entries: Vec<Entry>,
    /// Entries after those.
    pub not_kept: u64,
    /// Statements in the whole transcript, kept or not.
    pub statements: u64,
}

/// Reads a transcript keeping at most `keep` entries in memory, so that showing a large
/// one stays bounded; errors as [`read`] does.
pub fn read_first(path: &std::path::Path, keep: usize) -> std::io::Result<ReadBack> {
    let f = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut lines = f.lines();
    let bad = |n: usize, e: serde_json::Error| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("transcript line {n}: {e}"),
        )
    };
    let first = lines.next().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "empty transcript")
    })??;
    let header: Header = serde_json::from_str(&first).map_err(|e| bad(1, e))?;
    let mut back = ReadBack {
        header,
        entries: Vec::new(),
        not_kept: 0,
        statements: 0,
    };
    for (i, line) in lines.enumerate() {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        let entry: Entry = serde_json::from_str(&line).map_err(|e| bad(i + 2, e))?;
        if matches!(entry, Entry::Statement(_)) {
            back.statements += 1;
        }
        if back.entries.len() < keep {
            back.entries.push(entry);
        } else {
            back.not_kept += 1;
        }
    }
    Ok(back)
}

/// The last `keep` entries of a transcript (which may still be written: a line that
/// does not read, such as one half written, is passed over), and how many came before.
pub fn read_last(path: &std::path::Path, keep: usize) -> std::io::Result<(Vec<Entry>, u64)> {
    let f = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut last = std::collections::VecDeque::with_capacity(keep + 1);
    let mut before = 0;
    for line in f.lines().skip(1) {
        let Ok(entry) = serde_json::from_str::<Entry>(&line?) else {
            continue;
        };
        last.push_back(entry);
        if last.len() > keep {
            last.pop_front();
            before += 1;
        }
    }
    Ok((last.into(), before))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(session: &str) -> Header {
        Header {
            format: FORMAT.into(),
            version: 1,
            timestamp: 1_700_000_000,
            session: session.into(),
            resource: "prod-db".into(),
            user: "alice@example.com".into(),
            database: "app".into(),
            rows_cap: 2,
        }
    }

    #[test]
    fn what_is_written_reads_back_and_hashes_as_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Transcript::create(dir.path(), &header("s1"), 1 << 20).unwrap();
        let st = Statement {
            protocol: Some(Protocol::Extended),
            sql: "select $1::int".into(),
            params: vec![Some("7".into()), None],
            columns: vec!["int4".into()],
            rows: vec![vec![Some("7".into())]],
            row_count: 1,
            tag: Some("SELECT 1".into()),
            ..Default::default()
        };
        t.write(Entry::Statement(Box::new(st.clone())));
        t.write(Entry::Note {
            t: 1.0,
            text: "cut".into(),
        });
        let done = t.finish().unwrap();
        let (h, entries) = read(std::path::Path::new(&done.path)).unwrap();
        assert_eq!(h, header("s1"));
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0], Entry::Statement(Box::new(st)));
        let (bytes, sha) = super::super::hash_file(std::path::Path::new(&done.path)).unwrap();
        assert_eq!((bytes, sha), (done.bytes, done.sha256));
        assert!(!done.truncated && !done.failed);
    }

    #[test]
    fn entries_wait_in_memory_until_written_out_and_a_quiet_one_lets_go_of_its_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Transcript::create(dir.path(), &header("s2"), 1 << 20).unwrap();
        let path = t.path().to_path_buf();
        let on_disk = || std::fs::read_to_string(&path).unwrap().lines().count();
        t.write(Entry::Note {
            t: 0.5,
            text: "one".into(),
        });
        // Nothing reaches the file before it is written out: the buffer holds it.
        assert_eq!(on_disk(), 0);
        t.flush();
        assert_eq!(on_disk(), 2, "the header and the note");
        t.write(Entry::Note {
            t: 0.6,
            text: "two".into(),
        });
        t.release();
        assert_eq!(on_disk(), 3);
        assert_eq!(t.buf.capacity(), 0, "a quiet transcript holds no buffer");
        // Past the buffer's size lines go out without waiting for the clock.
        for i in 0..BUFFER / 16 {
            t.write(Entry::Note {
                t: 1.0,
                text: format!("note {i}"),
            });
        }
        assert!(on_disk() > 3);
        assert!(t.buf.len() < BUFFER);
        let done = t.finish().unwrap();
        let (bytes, sha) = super::super::hash_file(&path).unwrap();
        assert_eq!((bytes, sha), (done.bytes, done.sha256));
        assert_eq!(read(&path).unwrap().1.len(), 2 + BUFFER / 16);
    }

    #[test]
    fn past_the_cap_statements_are_kept_and_results_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Transcript::create(dir.path(), &header("s2"), 600).unwrap();
        for i in 0..20 {
            t.write(Entry::Statement(Box::new(Statement {
                sql: format!("select {i}"),
                columns: vec!["x".into()],
                rows: vec![vec![Some(i.to_string())]],
                row_count: 1,
                ..Default::default()
            })));
        }
        let done = t.finish().unwrap();
        assert!(done.truncated);
        let (_, entries) = read(std::path::Path::new(&done.path)).unwrap();
        let sqls: Vec<String> = entries
            .iter()
            .filter_map(|e| match e {
                Entry::Statement(s) => Some(s.sql.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(sqls.len(), 20, "every statement is kept");
        let Some(Entry::Statement(last)) = entries.last() else {
            panic!("{entries:?}")
        };
        assert!(last.rows.is_empty() && last.row_count == 1, "{last:?}");
        assert!(
            entries.iter().any(|e| matches!(e, Entry::Note { .. })),
            "the cap is marked"
        );
    }

    #[test]
    fn a_damaged_line_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Transcript::create(dir.path(), &header("s3"), 1 << 20).unwrap();
        t.write(Entry::Note {
            t: 0.0,
            text: "x".into(),
        });
        let done = t.finish().unwrap();
        let mut text = std::fs::read_to_string(&done.path).unwrap();
        text.push_str("{not json\n");
        std::fs::write(&done.path, text).unwrap();
        let err = read(std::path::Path::new(&done.path)).unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
    }

    #[test]
    fn read_first_keeps_the_first_entries_and_counts_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Transcript::create(dir.path(), &header("s4"), 1 << 20).unwrap();
        for i in 0..5 {
            t.write(Entry::Statement(Box::new(Statement {
                sql: format!("select {i}"),
                ..Default::default()
            })));
        }
        t.write(Entry::Note {
            t: 0.0,
            text: "x".into(),
        });
        let done = t.finish().unwrap();
        let path = std::path::Path::new(&done.path);
        for (keep, kept, not_kept) in [(0, 0, 6), (2, 2, 4), (6, 6, 0), (100, 6, 0)] {
            let back = read_first(path, keep).unwrap();
            assert_eq!(back.header, header("s4"));
            assert_eq!(
                (back.entries.len(), back.not_kept, back.statements),
                (kept, not_kept, 5),
                "keep {keep}"
            );
        }
        let Entry::Statement(s) = &read_first(path, 1).unwrap().entries[0] else {
            panic!()
        };
        assert_eq!(s.sql, "select 0");
        // Damage past what is kept is still found.
        let mut text = std::fs::read_to_string(path).unwrap();
        text.push_str("{not json\n");
        std::fs::write(path, text).unwrap();
        let err = read_first(path, 1).unwrap_err();
        assert!(err.to_string().contains("line 8"), "{err}");
    }
}
