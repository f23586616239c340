//! Signed checkpoints of the audit chain head, and the verification that checks them.
//!
//! The chain's hash is unkeyed: whoever can write the database can edit an event and
//! recompute every hash after it (and the recorded head). A checkpoint is the
//! statement "event `seq` has hash `hash`", signed with an Ed25519 key that lives in
//! a file outside the database (like the SSH CA key). A rewrite of any event at or
//! before a checkpoint no longer matches it, and its signature cannot be remade
//! without the key. Signatures are OpenSSH signatures (`ssh-keygen -Y`), so an
//! auditor can check one with stock tools too.
//!
//! Checkpoints are made by the background worker (every `audit.checkpoint_interval`
//! or `audit.checkpoint_every` events, whichever comes first), by `twokey audit
//! checkpoint`, and always at export. Each is recorded as an `audit.checkpoint` event
//! and covers that event itself, so deleting a checkpoint row is caught as well. An
//! export ends with a closing statement signed under another namespace, so a file
//! cut off after any earlier checkpoint still fails.
//!
//! The private key never leaves this module: not in logs, errors, pages or the log.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ssh_key::getrandom::SysRng;
use ssh_key::rand_core::UnwrapErr;
use ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey, PublicKey, SshSig};

pub use super::verify::{Failure, HeadPin, Verified, check_signed, verify_db, verify_export};

use crate::clock::from_millis;
use crate::config::{AuditConfig, CaConfig, Secret};
use crate::error::{Error, Result};
use crate::store::Db;

/// The SSH signature namespace of checkpoints stored in the database.
pub const CHECKPOINT_NAMESPACE: &str = "twokey-audit-checkpoint";
/// The namespace of an export's closing statement: a checkpoint signature cannot be
/// passed off as one, so a file cut off after an earlier checkpoint still fails.
pub const EXPORT_NAMESPACE: &str = "twokey-audit-export";
/// The audit action of a checkpoint.
pub const ACTION: &str = "audit.checkpoint";
/// The key of a checkpoint line in a JSONL export.
pub const EXPORT_CHECKPOINT_KEY: &str = "checkpoint";
/// The key of an export's closing line.
pub const EXPORT_END_KEY: &str = "export_end";

/// Where the signing key lives unless configured.
pub fn default_key_path(data_dir: &Path) -> PathBuf {
    AuditConfig::default_key_path(data_dir)
}

/// A signed statement: event `seq` of the chain has hash `hash` (made at `ts`, ms).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SignedHead {
    pub seq: i64,
    pub hash: String,
    pub ts: i64,
    /// An armored SSH signature (`-----BEGIN SSH SIGNATURE-----`), which names its key.
    pub signature: String,
}

/// The exact bytes signed. Every field is on its own line with its name, and `seq`
/// and `ts` are integers, so no two statements read alike.
fn statement(seq: i64, hash: &str, ts: i64) -> String {
    format!("twokey audit head v1\nseq {seq}\nhash {hash}\nts {ts}\n")
}

/// What errors about the audit signing key start with.
const WHO: &str = "audit key";

fn internal(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("{WHO}: {what}: {e}"))
}

impl SignedHead {
    fn sig(&self) -> std::result::Result<SshSig, String> {
        SshSig::from_pem(self.signature.trim())
            .map_err(|_| "the signature is not an SSH signature".into())
    }

    /// The key the signature names (not yet checked).
    pub fn signer(&self) -> std::result::Result<PublicKey, String> {
        Ok(PublicKey::from(self.sig()?.public_key().clone()))
    }

    /// Checks the signature under `namespace` with one of `accepted`; returns its key.
    pub fn verify(
        &self,
        namespace: &str,
        accepted: &[PublicKey],
    ) -> std::result::Result<PublicKey, String> {
        let sig = self.sig()?;
        let signer = PublicKey::from(sig.public_key().clone());
        // Match on the key itself, never on a comment or a fingerprint the file states.
        let Some(key) = accepted.iter().find(|k| k.key_data() == signer.key_data()) else {
            return Err(format!(
                "signed by {}, which is not {}",
                fingerprint(&signer),
                describe_keys(accepted)
            ));
        };
        key.verify(
            namespace,
            statement(self.seq, &self.hash, self.ts).as_bytes(),
            &sig,
        )
        .map_err(|_| "the signature does not verify: forged or altered".to_string())?;
        Ok(key.clone())
    }

    /// The JSON object written in an export line.
    fn to_export(&self) -> serde_json::Value {
        let key = self
            .signer()
            .ok()
            .and_then(|k| public_line(&k).ok())
            .unwrap_or_default();
        serde_json::json!({
            "seq": self.seq,
            "hash": self.hash,
            "ts": self.ts,
            "time": from_millis(self.ts).to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "public_key": key,
            "signature": self.signature,
        })
    }

    /// A `{"checkpoint": …}` export line.
    pub fn to_export_line(&self) -> String {
        serde_json::json!({ EXPORT_CHECKPOINT_KEY: self.to_export() }).to_string()
    }

    /// An `{"export_end": …}` export line.
    pub fn to_export_end_line(&self) -> String {
        serde_json::json!({ EXPORT_END_KEY: self.to_export() }).to_string()
    }

    /// Reads the object of a checkpoint or closing line. Its `public_key` must be the
    /// key that made the signature: a line naming one key but signed by another lies.
    pub fn from_export(v: &serde_json::Value) -> std::result::Result<SignedHead, String> {
        let field = |name: &str| v.get(name).ok_or_else(|| format!("lacks {name}"));
        let int = |name: &str| {
            field(name)?
                .as_i64()
                .ok_or_else(|| format!("{name} is not an integer"))
        };
        let text = |name: &str| {
            field(name)?
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("{name} is not a string"))
        };
        let head = SignedHead {
            seq: int("seq")?,
            hash: text("hash")?,
            ts: int("ts")?,
            signature: text("signature")?,
        };
        let stated = PublicKey::from_openssh(text("public_key")?.trim())
            .map_err(|_| "public_key is not an OpenSSH public key".to_string())?;
        if stated.key_data() != head.signer()?.key_data() {
            return Err("its public_key is not the key that made its signature".into());
        }
        Ok(head)
    }
}

/// A key's SHA-256 fingerprint, as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

fn describe_keys(keys: &[PublicKey]) -> String {
    match keys {
        [] => "any accepted key".into(),
        [k] => format!("the accepted key {}", fingerprint(k)),
        more => format!(
            "any of the accepted keys {}",
            more.iter().map(fingerprint).collect::<Vec<_>>().join(", ")
        ),
    }
}

fn public_line(key: &PublicKey) -> std::result::Result<String, String> {
    let mut key = key.clone();
    key.set_comment("twokey-audit");
    key.to_openssh().map_err(|e| e.to_string())
}

/// Reads an OpenSSH public key line (what `twokey audit public-key` prints).
pub fn parse_public_key(text: &str) -> std::result::Result<PublicKey, String> {
    let key = PublicKey::from_openssh(text.trim()).map_err(|_| {
        "is not an OpenSSH public key line (as `twokey audit public-key` prints)".to_string()
    })?;
    if key.algorithm() != Algorithm::Ed25519 {
        return Err("is not an Ed25519 key".into());
    }
    Ok(key)
}

/// The signing key, decrypted in memory, and the newest head this process signed.
pub struct Signer {
    key: PrivateKey,
    public: PublicKey,
    /// What this process last signed: a chain that no longer contains it is never
    /// signed again, even if every checkpoint row was removed from the database.
    last_signed: Mutex<Option<(i64, String)>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("public", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Loads the key from its file, or makes one there (mode 0600) when absent. With a
    /// passphrase (`audit.passphrase_file`, else `ca.passphrase_file`) it is kept
    /// encrypted at rest.
    pub fn load_or_create(config: &AuditConfig, ca: &CaConfig, data_dir: &Path) -> Result<Signer> {
        let path = config.key_path(data_dir);
        let passphrase = config
            .passphrase(ca)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let passphrase = passphrase.as_ref().map(Secret::expose);
        let key = if path.exists() {
            load(&path, passphrase)?
        } else {
            let mut key = PrivateKey::random(&mut UnwrapErr(SysRng), Algorithm::Ed25519)
                .map_err(|e| internal("generating the key", e))?;
            key.set_comment("twokey audit signing key");
            let at_rest = match passphrase {
                Some(p) => key
                    .encrypt(&mut UnwrapErr(SysRng), p)
                    .map_err(|e| internal("encrypting the key", e))?,
                None => key.clone(),
            };
            let pem = at_rest
                .to_openssh(LineEnding::LF)
                .map_err(|e| internal("encoding the key", e))?;
            crate::keyfile::write_private(WHO, &path, pem.as_bytes())?;
            tracing::info!(path = %path.display(), fingerprint = %fingerprint(key.public_key()), "generated the audit signing key");
            key
        };
        Ok(Signer {
            public: key.public_key().clone(),
            key,
            last_signed: Mutex::new(None),
        })
    }

    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// The public key as one OpenSSH line, for `--public-key` and auditors.
    pub fn public_key_line(&self) -> String {
        public_line(&self.public).unwrap_or_default()
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.public)
    }

    pub(crate) fn sign(
        &self,
        namespace: &str,
        seq: i64,
        hash: &str,
        ts: i64,
    ) -> Result<SignedHead> {
        let sig = self
            .key
            .sign(
                namespace,
                HashAlg::Sha512,
                statement(seq, hash, ts).as_bytes(),
            )
            .map_err(|e| internal("signing", e))?;
        let signature = sig
            .to_pem(LineEnding::LF)
            .map_err(|e| internal("encoding a signature", e))?;
        Ok(SignedHead {
            seq,
            hash: hash.to_string(),
            ts,
            signature,
        })
    }

    /// Signs an export's closing statement for `head` (the export's closing checkpoint).
    pub fn sign_export_end(&self, seq: i64, hash: &str, ts: i64) -> Result<SignedHead> {
        self.sign(EXPORT_NAMESPACE, seq, hash, ts)
    }

    pub(crate) fn remember(&self, seq: i64, hash: &str) {
        let mut last = self.last_signed.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_ref().is_none_or(|(s, _)| *s < seq) {
            *last = Some((seq, hash.to_string()));
        }
    }

    pub(crate) fn remembered(&self) -> Option<(i64, String)> {
        self.last_signed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn load(path: &Path, passphrase: Option<&str>) -> Result<PrivateKey> {
    crate::keyfile::check_private_mode(WHO, path)?;
    let at = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| internal(&format!("reading {at}"), e))?;
    let key = PrivateKey::from_openssh(text.trim())
        .map_err(|_| internal(&at, "not an OpenSSH private key"))?;
    let key = match (key.is_encrypted(), passphrase) {
        (true, Some(p)) => key.decrypt(p).map_err(|_| {
            internal(
                &at,
                "the passphrase (audit.passphrase_file, else ca.passphrase_file) does not decrypt it",
            )
        })?,
        (true, None) => {
            return Err(internal(
                &at,
                "the key is encrypted: set audit.passphrase_file",
            ));
        }
        (false, _) => key,
    };
    if key.algorithm() != Algorithm::Ed25519 {
        return Err(internal(&at, "the audit signing key must be Ed25519"));
    }
    Ok(key)
}

/// Every checkpoint up to and including `seq`, oldest first.
pub async fn list(db: &Db, up_to: i64) -> Result<Vec<SignedHead>> {
    Ok(sqlx::query_as(
        "SELECT seq, hash, ts, signature FROM audit_checkpoints WHERE seq <= ? ORDER BY seq",
    )
    .bind(up_to)
    .fetch_all(db)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(dir: &Path, passphrase: Option<&str>) -> Result<Signer> {
        let pass_file = passphrase.map(|p| {
            let f = dir.join("pass");
            std::fs::write(&f, p).unwrap();
            f
        });
        Signer::load_or_create(
            &AuditConfig {
                passphrase_file: pass_file,
                ..AuditConfig::default()
            },
            &CaConfig {
                key_file: None,
                passphrase_file: None,
            },
            dir,
        )
    }

    #[test]
    fn key_is_private_reloaded_and_encrypted_with_its_passphrase() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = signer(dir.path(), None).unwrap();
        let path = default_key_path(dir.path());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            a.public_key_line(),
            signer(dir.path(), None).unwrap().public_key_line()
        );
        assert!(!format!("{a:?}").contains("PRIVATE"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = signer(dir.path(), None).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let a = signer(dir.path(), Some("correct horse")).unwrap();
        let text = std::fs::read_to_string(default_key_path(dir.path())).unwrap();
        assert!(PrivateKey::from_openssh(&text).unwrap().is_encrypted());
        let b = signer(dir.path(), Some("correct horse")).unwrap();
        assert_eq!(a.public_key_line(), b.public_key_line());
        let err = signer(dir.path(), Some("wrong")).unwrap_err().to_string();
        assert!(err.contains("does not decrypt"), "{err}");
        let err = signer(dir.path(), None).unwrap_err().to_string();
        assert!(err.contains("audit.passphrase_file"), "{err}");
    }

    #[test]
    fn signatures_bind_seq_hash_time_namespace_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = signer(dir.path(), None).unwrap();
        let other_dir = tempfile::tempdir().unwrap();
        let other = signer(other_dir.path(), None).unwrap();
        let keys = [s.public_key().clone()];
        let h = "ab".repeat(32);
        let cp = s.sign(CHECKPOINT_NAMESPACE, 7, &h, 1000).unwrap();
        assert!(cp.signature.starts_with("-----BEGIN SSH SIGNATURE-----"));
        assert!(cp.verify(CHECKPOINT_NAMESPACE, &keys).is_ok());
        for altered in [
            SignedHead {
                seq: 8,
                ..cp.clone()
            },
            SignedHead {
                hash: "cd".repeat(32),
                ..cp.clone()
            },
            SignedHead {
                ts: 1001,
                ..cp.clone()
            },
        ] {
            let err = altered.verify(CHECKPOINT_NAMESPACE, &keys).unwrap_err();
            assert!(err.contains("does not verify"), "{err}");
        }
        assert!(cp.verify(EXPORT_NAMESPACE, &keys).is_err());
        let foreign = other.sign(CHECKPOINT_NAMESPACE, 7, &h, 1000).unwrap();
        let err = foreign.verify(CHECKPOINT_NAMESPACE, &keys).unwrap_err();
        assert!(err.contains("not the accepted key"), "{err}");
        let garbage = SignedHead {
            signature: "nope".into(),
            ..cp.clone()
        };
        assert!(
            garbage
                .verify(CHECKPOINT_NAMESPACE, &keys)
                .unwrap_err()
                .contains("not an SSH signature")
        );

        // An export line naming one key while signed by another is refused as it is read.
        let mut v: serde_json::Value = serde_json::from_str(&foreign.to_export_line()).unwrap();
        v[EXPORT_CHECKPOINT_KEY]["public_key"] = s.public_key_line().into();
        let err = SignedHead::from_export(&v[EXPORT_CHECKPOINT_KEY]).unwrap_err();
        assert!(err.contains("not the key that made"), "{err}");
        let v: serde_json::Value = serde_json::from_str(&cp.to_export_line()).unwrap();
        assert_eq!(
            SignedHead::from_export(&v[EXPORT_CHECKPOINT_KEY]).unwrap(),
            cp
        );
    }

    #[test]
    fn head_pins_parse_strictly() {
        let h = "Ab".repeat(32);
        let pin: HeadPin = format!("12:{h}").parse().unwrap();
        assert_eq!(
            pin,
            HeadPin {
                seq: 12,
                hash: h.to_ascii_lowercase()
            }
        );
        for bad in [
            "",
            "12",
            "x:ab",
            "0:abab",
            &format!("-1:{h}"),
            &format!("3:{}", "zz".repeat(32)),
        ] {
            assert!(bad.parse::<HeadPin>().is_err(), "{bad:?}");
        }
    }
}
