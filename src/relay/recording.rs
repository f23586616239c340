//! Session recordings in asciicast v2: a JSON header line, then `[seconds, "o"|"i"|"r",
//! data]` lines for output, input and resizes. When the session closes, the file's
//! SHA-256 and size go into the audit chain, so an edited recording is detectable.

use std::io::Write;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::state::AppState;

pub struct Recorder {
    file: std::io::BufWriter<std::fs::File>,
    path: std::path::PathBuf,
    started: Instant,
    width: u32,
    height: u32,
    wrote_header: bool,
    timestamp: i64,
    finished: bool,
}

/// Runs `f` on a shared recorder. A poisoned lock (a panicked writer) skips the event:
/// losing a line of recording never takes the session down.
pub fn with(rec: &std::sync::Mutex<Recorder>, f: impl FnOnce(&mut Recorder)) {
    if let Ok(mut r) = rec.lock() {
        f(&mut r);
    }
}

/// A finished recording.
pub struct Finished {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
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
        Ok(Recorder {
            file: std::io::BufWriter::new(file),
            path,
            started: Instant::now(),
            width: 80,
            height: 24,
            wrote_header: false,
            timestamp: state.clock.now().timestamp(),
            finished: false,
        })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
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
        let _ = writeln!(self.file, "{h}");
    }

    fn event(&mut self, kind: &str, data: &str) {
        if self.finished {
            return;
        }
        self.header();
        let t = self.started.elapsed().as_secs_f64();
        let line = serde_json::json!([(t * 1e6).round() / 1e6, kind, data]);
        let _ = writeln!(self.file, "{line}");
    }

    pub fn output(&mut self, data: &[u8]) {
        self.event("o", &String::from_utf8_lossy(data));
    }

    pub fn input(&mut self, data: &[u8]) {
        self.event("i", &String::from_utf8_lossy(data));
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

    /// Closes the recording (later events are ignored) and hashes it.
    pub fn finish(&mut self) -> std::io::Result<Finished> {
        self.header();
        self.finished = true;
        self.file.flush()?;
        self.file.get_ref().sync_all()?;
        let bytes = std::fs::read(&self.path)?;
        Ok(Finished {
            path: self.path.display().to_string(),
            bytes: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(&bytes)),
        })
    }
}
