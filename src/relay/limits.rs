//! Limits that hold whatever the protocol: connections per address ([`PerAddress`]),
//! the time a peer has to log in ([`LoginGrace`]), and how often one credential's
//! refusals are audited ([`RefusalLog`]). Each is applied before or around the
//! protocol's own work, so a peer cannot spend the relay's memory, file descriptors
//! or audit chain by connecting, stalling, or retrying.
//!
//! This must never admit anyone: a limit only refuses or closes.

use std::sync::Arc;
use std::time::Duration;

/// How many connections each address has open; a guard gives its slot back.
#[derive(Default)]
pub(crate) struct PerAddress(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One connection's place in [`PerAddress`]; dropping it gives the place back.
pub(crate) struct AddressSlot {
    table: Arc<PerAddress>,
    ip: std::net::IpAddr,
}

impl PerAddress {
    /// A slot for one more connection from `ip`, or None when it has `limit` open.
    pub(crate) fn enter(
        table: &Arc<PerAddress>,
        ip: std::net::IpAddr,
        limit: usize,
    ) -> Option<AddressSlot> {
        let mut m = table.0.lock().ok()?;
        let n = m.entry(ip).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            table: table.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.table.0.lock()
            && let Some(n) = m.get_mut(&self.ip)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// A connection's stream, which fails once the login grace time has passed without a
/// successful authentication: a peer that connects and stalls at any step before auth,
/// reading or not reading, is closed.
pub(crate) struct LoginGrace<S> {
    inner: S,
    authenticated: Arc<std::sync::atomic::AtomicBool>,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> LoginGrace<S> {
    /// `inner`, failing after `grace` unless `authenticated` is set first.
    pub(crate) fn new(
        inner: S,
        authenticated: Arc<std::sync::atomic::AtomicBool>,
        grace: Duration,
    ) -> Self {
        LoginGrace {
            inner,
            authenticated,
            deadline: Some(Box::pin(tokio::time::sleep(grace))),
        }
    }

    /// Ready(error) once the grace time is over and nobody has logged in.
    fn expired(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Error> {
        if let Some(deadline) = self.deadline.as_mut() {
            if self
                .authenticated
                .load(std::sync::atomic::Ordering::Acquire)
            {
                self.deadline = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "login grace time over",
                ));
            }
        }
        std::task::Poll::Pending
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for LoginGrace<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let std::task::Poll::Ready(e) = self.expired(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for LoginGrace<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let std::task::Poll::Ready(e) = self.expired(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let std::task::Poll::Ready(e) = self.expired(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Holders of one of our certificates can retry a refused login as fast as they like;
/// the audit chain records each (certificate, reason) at most once a minute.
#[derive(Default)]
pub(crate) struct RefusalLog(
    std::sync::Mutex<std::collections::HashMap<(u64, String), std::time::Instant>>,
);

impl RefusalLog {
    const EVERY: Duration = Duration::from_secs(60);
    /// Entries kept at most; past it, ones older than a minute are dropped.
    const CAP: usize = 10_000;

    /// Whether this (credential, reason) should be audited now: not seen in a minute.
    pub(crate) fn first_in_a_while(&self, serial: u64, reason: &str) -> bool {
        let Ok(mut m) = self.0.lock() else {
            return true;
        };
        let now = std::time::Instant::now();
        if m.len() >= Self::CAP {
            m.retain(|_, at| now.duration_since(*at) < Self::EVERY);
        }
        let key = (serial, reason.to_string());
        if m.get(&key)
            .is_some_and(|at| now.duration_since(*at) < Self::EVERY)
        {
            return false;
        }
        // Full of recent refusals: audit rather than forget.
        if m.len() < Self::CAP {
            m.insert(key, now);
        }
        true
    }
}
