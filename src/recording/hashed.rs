//! The hashed writer under every recording, and the hash of a recording read back.
//!
//! A recording is hashed as it is written, never read back while the session runs: the
//! SHA-256 and byte count cover exactly what reached the file. [`hash_file`] reads a
//! file that was left behind (a crash) to hash it as found. This file must never
//! decide what is recorded (that is the format's, [`super::asciicast`]), only account
//! for it.

use std::io::Write;

use sha2::{Digest, Sha256};

/// The file, hashed and counted on its way to disk: the hash and count cover exactly
/// the bytes the file took. After a failed write nothing more is written (not even by a
/// later flush), so the hash still matches the file.
pub(super) struct Hashed {
    pub(super) file: std::fs::File,
    pub(super) hasher: Sha256,
    pub(super) bytes: u64,
    pub(super) broken: bool,
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

/// A file's size and SHA-256, read in chunks.
pub fn hash_file(path: &std::path::Path) -> std::io::Result<(u64, String)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((bytes, hex::encode(hasher.finalize())))
}
