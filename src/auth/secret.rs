//! Bearer secrets: fresh random values, the hash that is stored instead of them, and
//! their constant-time comparison. No I/O, no state: everything that mints a token,
//! link or CSRF value comes here.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub(crate) fn random_b64(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    URL_SAFE_NO_PAD.encode(buf)
}

/// A fresh CSRF token for a session.
pub fn new_csrf() -> String {
    random_b64(32)
}

/// Constant-time comparison of two secrets.
pub fn secrets_equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// The SHA-256 of a token, hex: what is stored instead of the token.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A random 256-bit secret with a recognisable prefix, and the hash to store.
pub fn new_secret(prefix: &str) -> (String, String) {
    let token = format!("{prefix}{}", random_b64(32));
    let hash = hash_token(&token);
    (token, hash)
}
