//! Private key files at rest: written mode 0600 from their first byte, and refused
//! when others can read them. Shared by every key twokey keeps on disk (the SSH CA in
//! `ca`, the audit signing key in `audit::checkpoint`), so neither imports the other.
//!
//! Never reads or logs a key's contents: it only writes the bytes it is given and
//! checks a file's mode.

use std::path::Path;

use crate::error::{Error, Result};

/// Writes a new private key file, mode 0600 from its first byte, and syncs it. Shared
/// by every key twokey keeps on disk (CA, audit signing key); `who` prefixes errors.
pub fn write_private(who: &str, path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |what: String, e: std::io::Error| Error::Internal(format!("{who}: {what}: {e}"));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("creating {}", dir.display()), e))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| fail(format!("writing {}", path.display()), e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| fail(format!("writing {}", path.display()), e))
}

/// Like OpenSSH with identity files: a private key others can read is refused.
pub fn check_private_mode(who: &str, path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| Error::Internal(format!("{who}: reading {}: {e}", path.display())))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(Error::Internal(format!(
            "{who}: {}: is readable by others (mode {:o}); chmod 600 it",
            path.display(),
            mode & 0o777
        )));
    }
    Ok(())
}
