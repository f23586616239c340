//! The SSH user certificate authority: its key at rest, the certificates it signs for
//! grants, and the key revocation list (KRL) that stock `sshd` reads.
//!
//! A certificate never has empty or wildcard principals, never outlives its grant, and
//! carries only the extensions its role allows (DESIGN.md invariant 4). The CA's
//! private key never leaves this module: not in logs, errors, pages or the audit log.

mod check;
pub mod krl;

use std::path::{Path, PathBuf};

use ssh_key::certificate::{Builder, CertType};
use ssh_key::getrandom::SysRng;
use ssh_key::public::KeyData;
use ssh_key::rand_core::UnwrapErr;
use ssh_key::{Algorithm, Certificate, HashAlg, LineEnding, PrivateKey, PublicKey};

use crate::config::{CaConfig, Secret};
use crate::error::{Error, Result};
use crate::keyfile::{check_private_mode, write_private};

pub use check::check_config;

/// Extensions a role may allow; anything else is refused in config.
pub const KNOWN_EXTENSIONS: &[&str] = &[
    "permit-pty",
    "permit-port-forwarding",
    "permit-agent-forwarding",
    "permit-X11-forwarding",
    "permit-user-rc",
    "no-touch-required",
];

/// How far back a certificate's validity starts, to absorb clock skew between twokey
/// and the target.
pub const BACKDATE_SECS: u64 = 60;

/// The smallest RSA key accepted from a user.
pub const MIN_RSA_BITS: u32 = 3072;

/// The user CA, decrypted in memory.
pub struct Ca {
    key: PrivateKey,
    public: PublicKey,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("public", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// What a certificate says, decided by `access` from the grant and its role.
pub struct CertSpec<'a> {
    pub public_key: &'a PublicKey,
    pub serial: u64,
    pub key_id: &'a str,
    pub principals: &'a [String],
    pub valid_after: u64,
    pub valid_before: u64,
    pub extensions: &'a [String],
    pub force_command: Option<&'a str>,
    pub source_address: Option<&'a str>,
}

/// What errors about the CA key start with.
const WHO: &str = "ssh ca";

fn internal(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("{WHO}: {what}: {e}"))
}

impl Ca {
    /// Loads the CA key from `key_file`, or makes one there (mode 0600) when absent.
    /// With a passphrase the key is kept encrypted at rest.
    pub fn load_or_create(config: &CaConfig, data_dir: &Path) -> Result<Ca> {
        let path = config.key_path(data_dir);
        let passphrase = config
            .passphrase()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let passphrase = passphrase.as_ref().map(Secret::expose);
        if path.exists() {
            return Self::load(&path, passphrase);
        }
        let key = PrivateKey::random(&mut UnwrapErr(SysRng), Algorithm::Ed25519)
            .map_err(|e| internal("generating the key", e))?;
        let mut key = key;
        key.set_comment("twokey user CA");
        let at_rest = match passphrase {
            Some(p) => key
                .encrypt(&mut UnwrapErr(SysRng), p)
                .map_err(|e| internal("encrypting the key", e))?,
            None => key.clone(),
        };
        let pem = at_rest
            .to_openssh(LineEnding::LF)
            .map_err(|e| internal("encoding the key", e))?;
        write_private(WHO, &path, pem.as_bytes())?;
        tracing::info!(path = %path.display(), fingerprint = %key.fingerprint(HashAlg::Sha256), "generated the SSH user CA");
        Ok(Ca {
            public: key.public_key().clone(),
            key,
        })
    }

    fn load(path: &Path, passphrase: Option<&str>) -> Result<Ca> {
        check_private_mode(WHO, path)?;
        let text = std::fs::read_to_string(path)
            .map_err(|e| internal(&format!("reading {}", path.display()), e))?;
        let key = PrivateKey::from_openssh(text.trim())
            .map_err(|_| internal(&format!("{}", path.display()), "not an OpenSSH private key"))?;
        let key = match (key.is_encrypted(), passphrase) {
            (true, Some(p)) => key.decrypt(p).map_err(|_| {
                internal(
                    &format!("{}", path.display()),
                    "the passphrase (ca.passphrase_file) does not decrypt it",
                )
            })?,
            (true, None) => {
                return Err(internal(
                    &format!("{}", path.display()),
                    "the key is encrypted: set ca.passphrase_file",
                ));
            }
            (false, None) => key,
            (false, Some(p)) => {
                // Made before a passphrase was set: encrypted now, so the key does not
                // stay readable to whoever can read the data dir.
                let encrypted = key
                    .encrypt(&mut UnwrapErr(SysRng), p)
                    .and_then(|k| k.to_openssh(LineEnding::LF).map(|pem| pem.to_string()))
                    .map_err(|e| internal("encrypting the key", e))?;
                let tmp = path.with_extension("encrypting");
                let _ = std::fs::remove_file(&tmp);
                write_private(WHO, &tmp, encrypted.as_bytes())?;
                std::fs::rename(&tmp, path)
                    .map_err(|e| internal(&format!("replacing {}", path.display()), e))?;
                tracing::info!(path = %path.display(), "encrypted a key kept in the clear (ca.passphrase_file is set)");
                key
            }
        };
        if key.algorithm() != Algorithm::Ed25519 {
            return Err(internal(
                &format!("{}", path.display()),
                "the CA key must be Ed25519",
            ));
        }
        Ok(Ca {
            public: key.public_key().clone(),
            key,
        })
    }

    /// The line for sshd's `TrustedUserCAKeys`.
    pub fn public_key_line(&self) -> String {
        let mut public = self.public.clone();
        public.set_comment("twokey-user-ca");
        public.to_openssh().unwrap_or_default()
    }

    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// The private key, for the relay's own host key (which is kept at rest the same
    /// way). Never for anything that could print or send it.
    pub(crate) fn private_key(&self) -> &PrivateKey {
        &self.key
    }

    pub fn fingerprint(&self) -> String {
        self.public.fingerprint(HashAlg::Sha256).to_string()
    }

    /// Signs a user certificate. Refuses specs that break invariant 4 even if a caller
    /// got them wrong.
    pub fn sign(&self, spec: &CertSpec<'_>) -> Result<Certificate> {
        if spec.principals.is_empty() || spec.principals.iter().any(|p| !valid_principal(p)) {
            return Err(Error::Internal(
                "ssh ca: refusing empty or wildcard principals".into(),
            ));
        }
        if spec.valid_before <= spec.valid_after {
            return Err(Error::Internal("ssh ca: empty validity window".into()));
        }
        if let Some(ext) = spec
            .extensions
            .iter()
            .find(|e| !KNOWN_EXTENSIONS.contains(&e.as_str()))
        {
            return Err(Error::Internal(format!("ssh ca: unknown extension {ext}")));
        }
        let mut b = Builder::new_with_random_nonce(
            &mut UnwrapErr(SysRng),
            spec.public_key.key_data().clone(),
            spec.valid_after,
            spec.valid_before,
        )
        .map_err(|e| internal("certificate", e))?;
        let step = |r: ssh_key::Result<&mut Builder>| {
            r.map(|_| ()).map_err(|e| internal("certificate", e))
        };
        step(b.serial(spec.serial))?;
        step(b.key_id(spec.key_id))?;
        step(b.cert_type(CertType::User))?;
        for p in spec.principals {
            step(b.valid_principal(p.as_str()))?;
        }
        for e in spec.extensions {
            step(b.extension(e.as_str(), ""))?;
        }
        if let Some(cmd) = spec.force_command {
            step(b.critical_option("force-command", cmd))?;
        }
        if let Some(addrs) = spec.source_address {
            step(b.critical_option("source-address", addrs))?;
        }
        step(b.comment(spec.key_id))?;
        b.sign(&self.key).map_err(|e| internal("signing", e))
    }
}

/// A principal is a login name: no wildcards, separators or spaces.
pub fn valid_principal(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 64
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@'))
}

/// Parses a user's public key (one `authorized_keys`-style line) and refuses weak or
/// unsupported ones with a message the user can act on.
pub fn parse_user_key(text: &str) -> std::result::Result<PublicKey, String> {
    let line = text.trim();
    if line.is_empty() {
        return Err("is empty: paste the contents of your .pub file".into());
    }
    if line.starts_with("-----BEGIN") {
        return Err(
            "looks like a private key: never paste that anywhere; paste the .pub file".into(),
        );
    }
    if line.contains('\n') {
        return Err("must be one key on one line".into());
    }
    if line.len() > 16 * 1024 {
        return Err("is too long to be a public key".into());
    }
    let key = PublicKey::from_openssh(line).map_err(|_| {
        "is not an OpenSSH public key (expected e.g. \"ssh-ed25519 AAAA… you@host\")".to_string()
    })?;
    match key.key_data() {
        KeyData::Ed25519(_) | KeyData::SkEd25519(_) | KeyData::SkEcdsaSha2NistP256(_) => Ok(key),
        KeyData::Ecdsa(_) => Ok(key),
        KeyData::Rsa(rsa) if rsa.key_size() >= MIN_RSA_BITS => Ok(key),
        KeyData::Rsa(rsa) => Err(format!(
            "is a {}-bit RSA key; RSA keys need at least {MIN_RSA_BITS} bits (or use ssh-keygen -t ed25519)",
            rsa.key_size()
        )),
        KeyData::Dsa(_) => {
            Err("is a DSA key, which OpenSSH no longer accepts; use ssh-keygen -t ed25519".into())
        }
        KeyData::Certificate(_) => Err("is a certificate; paste the public key itself".into()),
        _ => Err("uses an unsupported key type; use ssh-keygen -t ed25519".into()),
    }
}

/// A random non-zero serial (63 bits, so it survives any signed 64-bit column).
pub fn random_serial() -> u64 {
    loop {
        let s = rand::random::<u64>() >> 1;
        if s != 0 {
            return s;
        }
    }
}

/// Where the CA key lives unless configured.
pub fn default_key_path(data_dir: &Path) -> PathBuf {
    CaConfig::default_key_path(data_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca(dir: &Path, passphrase: Option<&str>) -> Result<Ca> {
        let pass_file = passphrase.map(|p| {
            let f = dir.join("pass");
            std::fs::write(&f, p).unwrap();
            f
        });
        Ca::load_or_create(
            &CaConfig {
                key_file: None,
                passphrase_file: pass_file,
            },
            dir,
        )
    }

    #[test]
    fn key_is_created_private_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = ca(dir.path(), None).unwrap();
        let path = default_key_path(dir.path());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = ca(dir.path(), None).unwrap();
        assert_eq!(a.public_key_line(), b.public_key_line());
        assert!(a.public_key_line().starts_with("ssh-ed25519 "));
        assert!(!format!("{a:?}").contains("PRIVATE"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = ca(dir.path(), None).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn encrypted_key_needs_its_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let a = ca(dir.path(), Some("correct horse")).unwrap();
        let text = std::fs::read_to_string(default_key_path(dir.path())).unwrap();
        assert!(PrivateKey::from_openssh(&text).unwrap().is_encrypted());
        let b = ca(dir.path(), Some("correct horse")).unwrap();
        assert_eq!(a.public_key_line(), b.public_key_line());
        let err = ca(dir.path(), Some("wrong")).unwrap_err().to_string();
        assert!(err.contains("does not decrypt"), "{err}");
        let err = ca(dir.path(), None).unwrap_err().to_string();
        assert!(err.contains("ca.passphrase_file"), "{err}");
    }

    #[test]
    fn weak_and_malformed_keys_are_refused() {
        let user = PrivateKey::random(&mut UnwrapErr(SysRng), Algorithm::Ed25519).unwrap();
        let line = user.public_key().to_openssh().unwrap();
        assert!(parse_user_key(&format!("  {line}\n")).is_ok());
        // Weak RSA and any DSA, encoded as OpenSSH writes them.
        use ssh_key::Mpint;
        use ssh_key::public::{DsaPublicKey, RsaPublicKey};
        let big = |bytes: usize| Mpint::from_positive_bytes(&vec![0xc5; bytes]);
        let rsa = |bits: usize| {
            PublicKey::new(
                KeyData::Rsa(
                    RsaPublicKey::new(Mpint::from_positive_bytes(&[1, 0, 1]), big(bits / 8))
                        .unwrap(),
                ),
                "x",
            )
            .to_openssh()
            .unwrap()
        };
        let err = parse_user_key(&rsa(2048)).unwrap_err();
        assert!(err.contains("2048-bit RSA"), "{err}");
        assert!(parse_user_key(&rsa(3072)).is_ok());
        let dsa = PublicKey::new(
            KeyData::Dsa(DsaPublicKey::new(big(128), big(20), big(128), big(128)).unwrap()),
            "x",
        )
        .to_openssh()
        .unwrap();
        assert!(parse_user_key(&dsa).unwrap_err().contains("DSA"));
        for (bad, want) in [
            ("", "is empty"),
            ("ssh-ed25519 not-base64!!", "not an OpenSSH public key"),
            ("hello world", "not an OpenSSH public key"),
            ("-----BEGIN OPENSSH PRIVATE KEY-----", "private key"),
            ("ssh-ed25519 AAAA\nssh-ed25519 AAAA", "one line"),
        ] {
            let err = parse_user_key(bad).unwrap_err();
            assert!(err.contains(want), "{bad:?}: {err}");
        }
    }

    #[test]
    fn certificates_carry_exactly_the_spec() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), None).unwrap();
        let user = PrivateKey::random(&mut UnwrapErr(SysRng), Algorithm::Ed25519).unwrap();
        let principals = vec!["deploy".to_string()];
        let extensions = vec!["permit-pty".to_string()];
        let spec = CertSpec {
            public_key: user.public_key(),
            serial: 77,
            key_id: "twokey:g1:alice@example.com",
            principals: &principals,
            valid_after: 1_000,
            valid_before: 2_000,
            extensions: &extensions,
            force_command: Some("uptime"),
            source_address: Some("127.0.0.1/32"),
        };
        let cert = ca.sign(&spec).unwrap();
        assert_eq!(cert.serial(), 77);
        assert_eq!(cert.cert_type(), CertType::User);
        assert_eq!(cert.key_id(), "twokey:g1:alice@example.com");
        assert_eq!(cert.valid_principals(), ["deploy"]);
        assert_eq!((cert.valid_after(), cert.valid_before()), (1_000, 2_000));
        assert_eq!(cert.extensions().keys().collect::<Vec<_>>(), ["permit-pty"]);
        assert_eq!(
            cert.critical_options()
                .get("force-command")
                .map(String::as_str),
            Some("uptime")
        );
        assert_eq!(
            cert.critical_options()
                .get("source-address")
                .map(String::as_str),
            Some("127.0.0.1/32")
        );
        let fp = ca.public_key().fingerprint(HashAlg::Sha256);
        cert.validate_at(1_500, [&fp]).unwrap();

        for bad in [vec![], vec!["*".to_string()], vec!["a,b".to_string()]] {
            let spec = CertSpec {
                principals: &bad,
                ..spec_clone(&spec)
            };
            assert!(ca.sign(&spec).is_err(), "{bad:?}");
        }
        let unknown = vec!["permit-everything".to_string()];
        assert!(
            ca.sign(&CertSpec {
                extensions: &unknown,
                ..spec_clone(&spec)
            })
            .is_err()
        );
    }

    fn spec_clone<'a>(s: &CertSpec<'a>) -> CertSpec<'a> {
        CertSpec {
            public_key: s.public_key,
            serial: s.serial,
            key_id: s.key_id,
            principals: s.principals,
            valid_after: s.valid_after,
            valid_before: s.valid_before,
            extensions: s.extensions,
            force_command: s.force_command,
            source_address: s.source_address,
        }
    }
}
