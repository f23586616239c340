//! Cancel keys. The relay gives each client its own backend key (a random process id
//! and secret) and keeps the target's real key to itself; a CancelRequest is forwarded
//! to that client's own backend only when both halves of the relay's key match (the
//! secret compared in constant time). A guessed or another session's key cancels
//! nothing, and the target's real key never leaves the relay.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::Rng;
use subtle::ConstantTimeEq;

/// Where a cancel for one session goes.
#[derive(Clone)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    pub pid: i32,
    pub secret: Vec<u8>,
    /// The session, for the log.
    pub session: String,
    /// Told of each cancel: a statement the relay holds for review is withdrawn by it
    /// (the backend, idle, has nothing to cancel).
    pub cancelled: Arc<tokio::sync::Notify>,
}

struct Key {
    secret: [u8; 4],
    upstream: Upstream,
}

/// The live sessions' keys, by the process id the client was given.
#[derive(Default)]
pub struct CancelKeys(Mutex<HashMap<i32, Key>>);

/// Takes a session's key off the table when dropped.
pub struct KeyGuard {
    keys: Arc<CancelKeys>,
    pid: i32,
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.keys.0.lock() {
            m.remove(&self.pid);
        }
    }
}

impl CancelKeys {
    /// A new key for a session whose backend is `upstream`: (pid, secret) to give the
    /// client, and the guard that forgets it.
    pub fn register(keys: &Arc<CancelKeys>, upstream: Upstream) -> (i32, [u8; 4], KeyGuard) {
        let mut rng = rand::thread_rng();
        let secret: [u8; 4] = rng.r#gen();
        let mut m = keys.0.lock().unwrap_or_else(|p| p.into_inner());
        let pid = loop {
            let pid = rng.gen_range(1..i32::MAX);
            if !m.contains_key(&pid) {
                break pid;
            }
        };
        m.insert(pid, Key { secret, upstream });
        (
            pid,
            secret,
            KeyGuard {
                keys: keys.clone(),
                pid,
            },
        )
    }

    /// The backend a CancelRequest with this key may cancel, if the key is one the
    /// relay gave out and still holds.
    pub fn lookup(&self, pid: i32, secret: &[u8]) -> Option<Upstream> {
        let m = self.0.lock().ok()?;
        let key = m.get(&pid)?;
        (secret.len() == 4 && bool::from(key.secret.ct_eq(secret))).then(|| key.upstream.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream() -> Upstream {
        Upstream {
            host: "127.0.0.1".into(),
            port: 5432,
            pid: 42,
            secret: vec![1, 2, 3, 4],
            session: "s".into(),
            cancelled: Arc::default(),
        }
    }

    #[test]
    fn only_the_exact_key_finds_its_backend_and_only_while_held() {
        let keys = Arc::new(CancelKeys::default());
        let (pid, secret, guard) = CancelKeys::register(&keys, upstream());
        assert_eq!(keys.lookup(pid, &secret).map(|u| u.pid), Some(42));
        let mut wrong = secret;
        wrong[0] ^= 1;
        assert!(keys.lookup(pid, &wrong).is_none());
        assert!(keys.lookup(pid.wrapping_add(1), &secret).is_none());
        assert!(keys.lookup(pid, &secret[..3]).is_none());
        assert!(
            keys.lookup(42, &[1, 2, 3, 4]).is_none(),
            "the target's own key"
        );
        drop(guard);
        assert!(keys.lookup(pid, &secret).is_none());
    }
}
