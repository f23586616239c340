//! Session recordings in asciicast v2: a JSON header line, then `[seconds, "o"|"i"|"r",
//! data]` lines for output, input and resizes. When the session closes, the file's
//! SHA-256 and size go into the audit chain, so an edited recording is detectable.
//!
//! A recording is hashed as it is written (never read back), and capped: past the cap
//! a marker says so and later data is counted, not written, so one bulk transfer
//! cannot fill the disk or hold memory.

use std::io::Write;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::state::AppState;

/// The file, hashed and counted on its way to disk: the hash and count cover exactly
/// the bytes the file took. After a failed write nothing more is written (not even by a
/// later flush), so the hash still matches the file.
struct Hashed {
    file: std::fs::File,
    hasher: Sha256,
    bytes: u64,
    broken: bool,
}

impl Write for Hashed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.broken {
            return Err(std::io::Error::other(
                "an earlier write to the recording failed",
            ));
        }
        let n = self.file.write(buf).inspect_err(|_| self.broken = true)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

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
    secret: bool,
}

/// Words that make a prompt ending in `:` a secret one (sudo, ssh-keygen, psql, MFA).
const SECRET_PROMPTS: &[&str] = &[
    "password",
    "passphrase",
    "passcode",
    "pin",
    "token",
    "secret",
    "otp",
    "verification code",
];

/// Whether `line` (the text since the last newline) asks for a secret.
fn asks_for_secret(line: &str) -> bool {
    let line = line.trim_end().to_lowercase();
    let Some(prompt) = line.strip_suffix(':') else {
        return false;
    };
    SECRET_PROMPTS.iter().any(|w| {
        prompt.rmatch_indices(w).any(|(i, _)| {
            // A whole word: "pin" is not "ping".
            let before = prompt[..i].chars().next_back();
            let after = prompt[i + w.len()..].chars().next();
            !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
        })
    })
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
}

impl Recorder {
    pub fn create(state: &AppState, session_id: &str) -> std::io::Result<Recorder> {
        let dir = state.config.server.data_dir.join("recordings");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{session_id}.cast"));
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let limit = state
            .config
            .relay
            .as_ref()
            .map_or(crate::config::DEFAULT_MAX_RECORDING_BYTES, |r| {
                r.max_recording_bytes
            });
        Ok(Recorder::new(
            file,
            path,
            limit,
            state.clock.now().timestamp(),
        ))
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
            secret: false,
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
        if self.finished || self.truncated {
            return;
        }
        self.header();
        if self.size() + data.len() as u64 > self.limit {
            self.truncated = true;
            self.line(
                "m",
                "twokey: recording limit reached; the rest of this session is counted, not recorded",
            );
            return;
        }
        self.line(kind, data);
        // Written out at once for what is typed, and at least every second otherwise,
        // so a recording that can no longer be written is noticed within a second
        // (and the session cut), not when the buffer happens to fill.
        if kind == "i" || self.last_flush.elapsed() >= Duration::from_secs(1) {
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

    pub fn input(&mut self, data: &[u8]) {
        if self.truncated {
            return;
        }
        let mut text = Self::text(&mut self.carry_in, data);
        // What is typed at a password prompt is not kept: each character becomes `*`,
        // up to and including the Enter that ends it.
        if !self.secret && asks_for_secret(&self.line) {
            self.secret = true;
        }
        if self.secret {
            let mut masked = String::with_capacity(text.len());
            for c in text.chars() {
                if self.secret {
                    if c == '\r' || c == '\n' || c == '\u{3}' {
                        self.secret = false;
                        self.line.clear();
                        masked.push(c);
                    } else {
                        masked.push('*');
                    }
                } else {
                    masked.push(c);
                }
            }
            text = masked;
        }
        if !text.is_empty() {
            self.event("i", &text);
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{Recorder, asks_for_secret, with};

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

    #[test]
    fn secret_prompts_are_spotted() {
        for p in [
            "[sudo] password for alice: ",
            "Password:",
            "Enter passphrase for key '/root/.ssh/id_ed25519': ",
            "Password for user postgres: ",
            "Verification code: ",
            "PIN:",
        ] {
            assert!(asks_for_secret(p), "{p:?}");
        }
        for p in ["alice@host:~$ ", "ping: ", "password changed", "Name: ", ""] {
            assert!(!asks_for_secret(p), "{p:?}");
        }
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
