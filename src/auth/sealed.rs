//! Sealed cookies: the little state a visitor who is not signed in needs (the sign-in
//! form's CSRF token, an OpenID Connect sign-in in progress) kept in their own browser,
//! encrypted and authenticated, instead of in the session table.
//!
//! Why: a session row per anonymous page view let anyone fill the session table with a
//! loop of GETs. Now nothing is written server-side until someone has signed in.
//!
//! How: AES-256-GCM (ring) under a key kept beside the CA key in the data dir (never in
//! the database, shared by replicas that share the data dir), a fresh random nonce per
//! cookie, the cookie's name as associated data (a value sealed for one cookie does not
//! open as another), and an expiry inside the sealed payload checked on twokey's clock.
//! The browser can neither read (the PKCE verifier and nonce stay secret) nor forge nor
//! prolong what it holds. What this module must never do: log a sealed value or key.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Seals and opens cookie values.
pub struct Sealer {
    key: LessSafeKey,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(<key redacted>)")
    }
}

#[derive(Serialize, serde::Deserialize)]
struct Payload<T> {
    /// Expiry, ms since the epoch on twokey's clock.
    exp: i64,
    v: T,
}

/// Where the cookie key lives: `DATA_DIR/cookie.key`.
pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("cookie.key")
}

impl Sealer {
    /// A sealer with this 256-bit key.
    pub fn new(key: &[u8; 32]) -> Result<Self> {
        let key = UnboundKey::new(&AES_256_GCM, key)
            .map_err(|_| Error::Internal("cookie key rejected".into()))?;
        Ok(Sealer {
            key: LessSafeKey::new(key),
        })
    }

    /// Reads the key from the data dir, making it (mode 0600) on first start. Two
    /// replicas starting at once both end up with whichever was written first.
    pub fn load_or_create(data_dir: &Path) -> Result<Self> {
        let path = key_path(data_dir);
        let bad =
            |e: std::io::Error| Error::Internal(format!("cookie key {}: {e}", path.display()));
        if !path.exists() {
            std::fs::create_dir_all(data_dir).map_err(bad)?;
            let mut key = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut key);
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            match opts.open(&path) {
                Ok(mut f) => {
                    f.write_all(URL_SAFE_NO_PAD.encode(key).as_bytes())
                        .and_then(|_| f.sync_all())
                        .map_err(bad)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(bad(e)),
            }
        }
        let text = std::fs::read_to_string(&path).map_err(bad)?;
        let bytes = URL_SAFE_NO_PAD
            .decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| {
                Error::Internal(format!(
                    "cookie key {} is not 32 bytes of base64url; delete it to make a new one (sign-ins in progress restart)",
                    path.display()
                ))
            })?;
        Sealer::new(&bytes)
    }

    /// Seals `value` for the cookie `name`, good until `expires_at` (ms).
    pub fn seal<T: Serialize>(&self, name: &str, value: &T, expires_at: i64) -> Result<String> {
        let mut data = serde_json::to_vec(&Payload {
            exp: expires_at,
            v: value,
        })
        .map_err(|e| Error::Internal(format!("seal: {e}")))?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut data,
            )
            .map_err(|_| Error::Internal("seal failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(URL_SAFE_NO_PAD.encode(out))
    }

    /// Opens a value sealed for the cookie `name`, if it is authentic and not expired
    /// at `now` (ms). Anything else (tampered, another cookie's, expired, garbage) is
    /// `None`: the caller treats it as absent.
    pub fn open<T: DeserializeOwned>(&self, name: &str, sealed: &str, now: i64) -> Option<T> {
        if sealed.len() > 8192 {
            return None;
        }
        let raw = URL_SAFE_NO_PAD.decode(sealed).ok()?;
        if raw.len() < NONCE_LEN {
            return None;
        }
        let (nonce, rest) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut data = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut data)
            .ok()?;
        let payload: Payload<T> = serde_json::from_slice(plain).ok()?;
        (now < payload.exp).then_some(payload.v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer() -> Sealer {
        Sealer::new(&[7u8; 32]).unwrap()
    }

    #[test]
    fn round_trip_and_expiry() {
        let s = sealer();
        let sealed = s.seal("c", &"secret-value".to_string(), 1000).unwrap();
        assert!(!sealed.contains("secret"));
        assert_eq!(
            s.open::<String>("c", &sealed, 999).as_deref(),
            Some("secret-value")
        );
        assert_eq!(s.open::<String>("c", &sealed, 1000), None, "expired");
    }

    #[test]
    fn tampered_foreign_or_other_cookies_values_do_not_open() {
        let s = sealer();
        let sealed = s.seal("c", &"v".to_string(), i64::MAX).unwrap();
        // Another cookie's value.
        assert_eq!(s.open::<String>("d", &sealed, 0), None);
        // Another key.
        let other = Sealer::new(&[8u8; 32]).unwrap();
        assert_eq!(other.open::<String>("c", &sealed, 0), None);
        // Any flipped byte.
        let mut raw = URL_SAFE_NO_PAD.decode(&sealed).unwrap();
        for i in 0..raw.len() {
            raw[i] ^= 1;
            assert_eq!(
                s.open::<String>("c", &URL_SAFE_NO_PAD.encode(&raw), 0),
                None,
                "byte {i}"
            );
            raw[i] ^= 1;
        }
        assert_eq!(s.open::<String>("c", "", 0), None);
        assert_eq!(s.open::<String>("c", "!!!", 0), None);
    }

    #[test]
    fn the_key_file_is_made_once_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let a = Sealer::load_or_create(dir.path()).unwrap();
        let b = Sealer::load_or_create(dir.path()).unwrap();
        let sealed = a.seal("c", &1u32, i64::MAX).unwrap();
        assert_eq!(b.open::<u32>("c", &sealed, 0), Some(1));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(key_path(dir.path()))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
