//! Session recordings in asciicast v2: a JSON header line, then `[seconds, "o"|"i"|"r",
//! data]` lines for output, input and resizes. When the session closes, the file's
//! SHA-256 and size go into the audit chain, so an edited recording is detectable.
//!
//! A recording is hashed as it is written (never read back), and its *output* is capped:
//! past the cap a marker says so and later output is counted, not written, so one bulk
//! download cannot fill the disk or hold memory. What the engineer sends (typed input,
//! exec commands, sftp requests) is recorded past the cap too: nothing the session
//! itself does can switch its record off (DESIGN.md invariant 8).
//!
//! Masking at a password prompt is bounded so the target cannot steer it into hiding
//! commands: only in a terminal (pty) session, only for one line (it ends at Enter), at
//! most [`MASK_CAP`] characters, never while the target echoes what is typed, and each
//! masked span is marked in the recording and counted for the session's page.

use std::io::Write;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::hashed::Hashed;
use super::mask::{Ended, MASK_CAP, Mask, asks_for_secret};

/// One session's asciicast v2 recording, hashed as it is written.
pub struct Recorder {
    file: std::io::BufWriter<Hashed>,
    path: std::path::PathBuf,
    started: Instant,
    last_flush: Instant,
    width: u32,
    height: u32,
    wrote_header: bool,
    timestamp: i64,
    finished: bool,
    limit: u64,
    truncated: bool,
    /// The tail of a UTF-8 character split across two chunks, per direction.
    carry_in: Vec<u8>,
    carry_out: Vec<u8>,
    /// A write failed: the recording is incomplete, and the session must say so.
    failed: bool,
    /// The terminal's current output line (its tail), to spot a password prompt.
    line: String,
    /// Input is being typed at a secret prompt: recorded as `*` until Enter.
    mask: Option<Mask>,
    /// The session has a terminal (pty): only then can a prompt mask what is typed.
    terminal: bool,
    /// Masked spans so far, shown on the session's page.
    masked_inputs: u32,
    /// The last span Enter ended, until the next line: if the target then echoes what
    /// was typed in it, it was not a secret after all.
    ended: Option<Ended>,
}

/// Runs `f` on a shared recorder and says whether the recording is still whole. False
/// (a write failed, or a writer panicked and poisoned the lock) means what passes next
/// would go unrecorded: the relay then ends the session rather than let it go on.
#[must_use]
pub fn with(rec: &std::sync::Mutex<Recorder>, f: impl FnOnce(&mut Recorder)) -> bool {
    match rec.lock() {
        Ok(mut r) => {
            f(&mut r);
            !r.failed
        }
        Err(_) => false,
    }
}

/// A finished recording.
pub struct Finished {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
    /// The cap was reached: what came after is counted, not recorded.
    pub truncated: bool,
    /// A write to the recording failed.
    pub failed: bool,
    /// Spans of input masked at a password prompt.
    pub masked_inputs: u32,
}

impl Recorder {
    /// A new recording `SESSION_ID.cast` in `dir` (made if missing), never overwriting
    /// one: output past `limit` bytes is counted, not written; `timestamp` (Unix
    /// seconds) goes in the header.
    pub fn create(
        dir: &std::path::Path,
        session_id: &str,
        limit: u64,
        timestamp: i64,
    ) -> std::io::Result<Recorder> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{session_id}.cast"));
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok(Recorder::new(file, path, limit, timestamp))
    }

    fn new(file: std::fs::File, path: std::path::PathBuf, limit: u64, timestamp: i64) -> Recorder {
        Recorder {
            file: std::io::BufWriter::with_capacity(
                16 * 1024,
                Hashed {
                    file,
                    hasher: Sha256::new(),
                    bytes: 0,
                    broken: false,
                },
            ),
            path,
            started: Instant::now(),
            last_flush: Instant::now(),
            width: 80,
            height: 24,
            wrote_header: false,
            timestamp,
            finished: false,
            limit,
            truncated: false,
            carry_in: Vec::new(),
            carry_out: Vec::new(),
            failed: false,
            line: String::new(),
            mask: None,
            terminal: false,
            masked_inputs: 0,
            ended: None,
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn size(&self) -> u64 {
        self.file.get_ref().bytes + self.file.buffer().len() as u64
    }

    fn header(&mut self) {
        if self.wrote_header {
            return;
        }
        self.wrote_header = true;
        let h = serde_json::json!({
            "version": 2, "width": self.width, "height": self.height,
            "timestamp": self.timestamp, "env": {"TERM": "xterm-256color"}
        });
        let r = writeln!(self.file, "{h}");
        self.failed |= r.is_err();
    }

    fn line(&mut self, kind: &str, data: &str) {
        let t = self.started.elapsed().as_secs_f64();
        let r = (|| {
            write!(self.file, "[{t:.6},\"{kind}\",")?;
            serde_json::to_writer(&mut self.file, data)?;
            self.file.write_all(b"]\n")
        })();
        self.failed |= r.is_err();
    }

    fn event(&mut self, kind: &str, data: &str) {
        if self.finished {
            return;
        }
        self.header();
        // Only output and resizes are capped: input and markers (what the engineer
        // sends, sftp requests, masked spans) always reach the record, or the session
        // ends when they cannot.
        if matches!(kind, "o" | "r") {
            if self.truncated {
                return;
            }
            if self.size() + data.len() as u64 > self.limit {
                self.truncated = true;
                self.line(
                    "m",
                    "twokey: recording limit reached; the rest of this session's output is counted, not recorded (input still is)",
                );
                return;
            }
        }
        self.line(kind, data);
        // Written out at once for what is typed, and at least every second otherwise,
        // so a recording that can no longer be written is noticed within a second
        // (and the session cut), not when the buffer happens to fill.
        if kind != "o" || self.last_flush.elapsed() >= Duration::from_secs(1) {
            self.flush();
        }
    }

    /// Text from a chunk of bytes, holding back a character cut at the end so the next
    /// chunk completes it (asciicast lines are text).
    fn text(carry: &mut Vec<u8>, data: &[u8]) -> String {
        carry.extend_from_slice(data);
        let keep = match std::str::from_utf8(carry) {
            Ok(_) => 0,
            // Incomplete at the very end (at most 3 bytes): keep it for later.
            Err(e) if e.error_len().is_none() => carry.len() - e.valid_up_to(),
            Err(_) => 0,
        };
        let rest = carry.split_off(carry.len() - keep);
        let text = String::from_utf8_lossy(carry).into_owned();
        *carry = rest;
        text
    }

    pub fn output(&mut self, data: &[u8]) {
        if self.truncated {
            return;
        }
        let text = Self::text(&mut self.carry_out, data);
        // A real secret prompt does not echo what is typed (at most `*`): a target that
        // echoes is not asking for a secret, so what was masked is written in clear.
        if let Some(m) = &self.mask
            && !m.typed.is_empty()
            && text
                .chars()
                .any(|c| !c.is_control() && !c.is_whitespace() && c != '*')
        {
            self.unmask("the target echoes what is typed, so this is not a secret prompt");
        }
        // A whole line typed at once (pasted) ends its span before any echo comes back:
        // an echo of exactly what was masked, right after, shows it was no secret.
        if let Some(e) = self.ended.as_mut() {
            e.seen.push_str(&text);
            if e.seen.contains(&e.typed) {
                let typed = std::mem::take(&mut e.typed);
                self.ended = None;
                self.masked_inputs = self.masked_inputs.saturating_sub(1);
                self.note("twokey: the target echoed the masked input, so it was not a secret; it follows in clear");
                self.event("i", &typed);
            } else if e.seen.len() > 8 * MASK_CAP {
                let cut = e.seen.len() - 4 * MASK_CAP;
                let cut = (cut..e.seen.len())
                    .find(|&i| e.seen.is_char_boundary(i))
                    .unwrap_or(0);
                e.seen.drain(..cut);
            }
        }
        match text.rfind('\n') {
            Some(i) => self.line = text[i + 1..].to_string(),
            None => self.line.push_str(&text),
        }
        if self.line.len() > 256 {
            let cut = self.line.len() - 256;
            let cut = (cut..self.line.len())
                .find(|&i| self.line.is_char_boundary(i))
                .unwrap_or(0);
            self.line.drain(..cut);
        }
        if !text.is_empty() {
            self.event("o", &text);
        }
    }

    /// The session has a terminal: a password prompt may mask what is typed at it.
    pub fn terminal(&mut self) {
        self.terminal = true;
    }

    /// Ends a masked span that was not a secret: a marker says why, then what was typed
    /// in it, in clear. Not counted as masked.
    fn unmask(&mut self, why: &str) {
        if let Some(m) = self.mask.take() {
            self.note(&format!(
                "twokey: masking ended: {why}; what was typed at the prompt follows in clear"
            ));
            if !m.typed.is_empty() {
                self.event("i", &m.typed);
            }
        }
    }

    pub fn input(&mut self, data: &[u8]) {
        let text = Self::text(&mut self.carry_in, data);
        // The next line: a span that ended before it stays masked.
        if self.mask.is_none() && text.contains(['\r', '\n']) {
            self.ended = None;
        }
        // A span starts only in a terminal whose output is still being recorded (past
        // the cap the prompt and any echo are unseen), at a prompt asking for a secret.
        if self.mask.is_none()
            && self.terminal
            && !self.truncated
            && !text.is_empty()
            && asks_for_secret(&self.line)
        {
            let prompt = self.line.trim();
            let from = prompt.char_indices().rev().nth(79).map_or(0, |(i, _)| i);
            let prompt = prompt[from..].to_string();
            self.note(&format!(
                "twokey: masked input begins at the prompt {prompt:?}"
            ));
            self.mask = Some(Mask {
                typed: String::new(),
            });
        }
        if self.mask.is_none() {
            if !text.is_empty() {
                self.event("i", &text);
            }
            return;
        }
        let mut out = String::with_capacity(text.len());
        for c in text.chars() {
            let Some(m) = self.mask.as_mut() else {
                out.push(c);
                continue;
            };
            if matches!(c, '\r' | '\n' | '\u{3}' | '\u{4}') {
                // Enter (or ^C, ^D) ends the span: one line at most.
                let typed = std::mem::take(&mut m.typed);
                let n = typed.chars().count();
                self.mask = None;
                self.line.clear();
                if !typed.is_empty() {
                    self.masked_inputs += 1;
                    self.ended = Some(Ended {
                        typed,
                        seen: String::new(),
                    });
                }
                out.push(c);
                if !out.is_empty() {
                    self.event("i", &out);
                    out.clear();
                }
                self.note(&format!("twokey: masked input ends ({n} characters)"));
            } else if m.typed.chars().count() >= MASK_CAP {
                if !out.is_empty() {
                    self.event("i", &out);
                    out.clear();
                }
                self.unmask(&format!(
                    "longer than {MASK_CAP} characters, so not a secret"
                ));
                out.push(c);
            } else {
                m.typed.push(c);
                out.push('*');
            }
        }
        if !out.is_empty() {
            self.event("i", &out);
        }
    }

    /// Writes out what is buffered, so a recording that cannot be written shows it now
    /// rather than at the end.
    pub fn flush(&mut self) {
        self.header();
        self.failed |= self.file.flush().is_err();
        self.last_flush = Instant::now();
    }

    /// A marker in the recording (asciicast v2 "m" event).
    pub fn note(&mut self, text: &str) {
        self.event("m", text);
    }

    pub fn resize(&mut self, cols: u32, rows: u32) {
        if !self.wrote_header {
            // Before anything is shown: the header carries the size.
            self.width = cols;
            self.height = rows;
            return;
        }
        self.event("r", &format!("{cols}x{rows}"));
    }

    /// Closes the recording (later events are ignored) and returns its size and hash,
    /// taken as it was written. A recording that could not be written in full still
    /// gets the size and hash of what the file holds, marked `failed`.
    pub fn finish(&mut self) -> std::io::Result<Finished> {
        if self.finished {
            return Err(std::io::Error::other("recording already finished"));
        }
        self.header();
        let pending = [
            ("o", std::mem::take(&mut self.carry_out)),
            ("i", std::mem::take(&mut self.carry_in)),
        ];
        for (kind, carry) in pending {
            if !carry.is_empty() && !self.truncated {
                self.line(kind, &String::from_utf8_lossy(&carry));
            }
        }
        if self.mask.take().is_some_and(|m| !m.typed.is_empty()) {
            // A span the session ended in counts as masked.
            self.masked_inputs += 1;
            self.line("m", "twokey: masked input ends (session ended)");
        }
        self.finished = true;
        self.failed |= self.file.flush().is_err();
        let inner = self.file.get_mut();
        self.failed |= inner.file.sync_all().is_err();
        let sha256 = hex::encode(std::mem::take(&mut inner.hasher).finalize());
        Ok(Finished {
            path: self.path.display().to_string(),
            bytes: inner.bytes,
            sha256,
            truncated: self.truncated,
            failed: self.failed,
            masked_inputs: self.masked_inputs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{MASK_CAP, Recorder, with};

    #[test]
    fn a_write_that_fails_is_reported_not_hidden() {
        // /dev/full: every write fails with "no space left on device".
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let rec = std::sync::Mutex::new(Recorder::new(full, "/dev/full".into(), 1 << 30, 0));
        // Small writes sit in the buffer: the recording is still whole so far.
        assert!(with(&rec, |r| r.output(b"hello\r\n")));
        // The buffer spills to the disk and fails: from now on, not whole.
        assert!(!with(&rec, |r| r.output(&[b'x'; 64 * 1024])));
        assert!(!with(&rec, |r| r.input(b"ls\r")));
        // Finishing still accounts for what reached the file: here, nothing.
        let finished = rec.lock().unwrap().finish().unwrap();
        assert!(finished.failed);
        assert_eq!(finished.bytes, 0);
        assert_eq!(
            finished.sha256,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // A writer that panicked (a poisoned lock) counts as a failed recording too.
        let file = tempfile::tempfile().unwrap();
        let ok = std::sync::Mutex::new(Recorder::new(file, "t".into(), 1 << 30, 0));
        assert!(with(&ok, |r| r.output(b"fine")));
        let _ = std::panic::catch_unwind(|| {
            let _guard = ok.lock().unwrap();
            panic!("a writer panics");
        });
        assert!(!with(&ok, |r| r.output(b"after")));
    }

    /// A recorder writing to a temporary file, and a way to read back its events.
    fn recorder(limit: u64) -> (Recorder, tempfile::NamedTempFile) {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let file = tmp.reopen().unwrap();
        (Recorder::new(file, tmp.path().into(), limit, 0), tmp)
    }

    fn events(tmp: &tempfile::NamedTempFile) -> Vec<(String, String)> {
        std::fs::read_to_string(tmp.path())
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v[1].as_str().unwrap().into(), v[2].as_str().unwrap().into())
            })
            .collect()
    }

    fn typed(ev: &[(String, String)]) -> String {
        ev.iter()
            .filter(|(k, _)| k == "i")
            .map(|(_, d)| d.as_str())
            .collect()
    }

    #[test]
    fn input_is_recorded_past_the_cap_and_output_is_not() {
        let (mut r, tmp) = recorder(1024);
        r.output(&[b'x'; 2000]);
        r.output(b"hidden output");
        r.input(b"typed after the cap\r");
        let done = r.finish().unwrap();
        assert!(done.truncated);
        let ev = events(&tmp);
        assert_eq!(typed(&ev), "typed after the cap\r");
        assert!(!ev.iter().any(|(_, d)| d.contains("hidden output")));
    }

    #[test]
    fn masking_is_one_line_in_a_terminal_marked_counted_and_bounded() {
        // No terminal: a prompt masks nothing.
        let (mut r, tmp) = recorder(1 << 20);
        r.output(b"Password:");
        r.input(b"rm -rf /srv\r");
        assert_eq!(r.finish().unwrap().masked_inputs, 0);
        assert_eq!(typed(&events(&tmp)), "rm -rf /srv\r");

        // A terminal, echo off: masked up to Enter, marked, counted; the next line is
        // in clear.
        let (mut r, tmp) = recorder(1 << 20);
        r.terminal();
        r.output(b"[sudo] password for a: ");
        r.input(b"hunt");
        r.input(b"er2\rwhoami\r");
        r.output(b"\r\nroot\r\n$ ");
        let done = r.finish().unwrap();
        assert_eq!(done.masked_inputs, 1);
        let ev = events(&tmp);
        assert_eq!(typed(&ev), "*******\rwhoami\r");
        assert!(
            ev.iter()
                .any(|(k, d)| k == "m" && d.contains("masked input begins"))
        );
        assert!(
            ev.iter()
                .any(|(k, d)| k == "m" && d.contains("masked input ends (7 characters)"))
        );

        // The target echoes what is typed: not a secret, in clear, not counted.
        for chunks in [&[&b"ls -la"[..], b"\r"][..], &[b"ls -la\r"]] {
            let (mut r, tmp) = recorder(1 << 20);
            r.terminal();
            r.output(b"Password:");
            for c in chunks {
                r.input(c);
                r.output(&c[..c.len().min(3)]);
            }
            r.output(b"-la\r\n");
            assert_eq!(r.finish().unwrap().masked_inputs, 0, "{chunks:?}");
            assert!(typed(&events(&tmp)).contains("ls -la"), "{chunks:?}");
        }

        // Longer than a secret: in clear from its start.
        let (mut r, tmp) = recorder(1 << 20);
        r.terminal();
        r.output(b"Password:");
        let long = "y".repeat(MASK_CAP + 10);
        r.input(long.as_bytes());
        assert_eq!(r.finish().unwrap().masked_inputs, 0);
        assert!(typed(&events(&tmp)).contains(&long));
    }

    #[test]
    fn a_character_split_across_chunks_is_kept_whole() {
        let mut carry = Vec::new();
        let bytes = "héllo ✓".as_bytes();
        // Split inside the three-byte check mark.
        let cut = bytes.len() - 1;
        let a = Recorder::text(&mut carry, &bytes[..cut]);
        let b = Recorder::text(&mut carry, &bytes[cut..]);
        assert_eq!(a, "héllo ");
        assert_eq!(b, "✓");
        assert!(carry.is_empty());
        // Invalid bytes are replaced, not held forever.
        assert_eq!(Recorder::text(&mut carry, b"\xffok"), "\u{fffd}ok");
        assert!(carry.is_empty());
    }
}
