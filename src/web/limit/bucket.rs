//! The per-address budgets themselves: a token bucket per (endpoint group, client
//! address), kept as a GCRA arrival time and refilled on twokey's injected clock, and
//! how the client's address is found behind trusted proxies. Pure: no I/O, no state.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;

use axum::http::HeaderMap;

/// Which endpoints share a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bucket {
    /// `/login/dev`, `/auth/oidc/start`, `/auth/oidc/callback`.
    SignIn,
    /// `/a/{token}`, GET and POST.
    Link,
    /// `POST /api/v1/cli/token`.
    Token,
    /// `POST /slack/interactions` (Slack calls from few addresses: a larger budget).
    Slack,
}

impl Bucket {
    /// (burst, refill per minute).
    pub const fn rule(self) -> (u32, u32) {
        match self {
            Bucket::SignIn => (20, 20),
            Bucket::Link => (30, 30),
            Bucket::Token => (10, 10),
            Bucket::Slack => (120, 300),
        }
    }

    pub(crate) fn what(self) -> &'static str {
        match self {
            Bucket::SignIn => "sign-in attempts",
            Bucket::Link => "link visits",
            Bucket::Token => "token requests",
            Bucket::Slack => "Slack requests",
        }
    }
}

/// Most addresses tracked at once.
const MAX_ENTRIES: usize = 100_000;

/// The buckets of every client: for each, the theoretical arrival time (GCRA), in
/// whole milliseconds on twokey's clock, so the arithmetic is exact.
#[derive(Default)]
pub struct Limiter {
    entries: Mutex<HashMap<(Bucket, IpAddr), i64>>,
}

/// The address a client is counted under: itself, or its /64 for IPv6.
fn key_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl Limiter {
    /// Takes one token for `ip` at `now` (ms). `Err(seconds)` says how long until
    /// the next one.
    pub fn check(&self, bucket: Bucket, ip: IpAddr, now: i64) -> Result<(), u64> {
        let (burst, per_minute) = bucket.rule();
        // One request costs `interval`; `burst` of them may be spent at once.
        let interval = 60_000 / i64::from(per_minute.max(1));
        let window = interval * i64::from(burst);
        let key = (bucket, key_of(ip));
        let mut entries = match self.entries.lock() {
            Ok(g) => g,
            // A panic elsewhere while holding the lock: the counts are still usable.
            Err(poisoned) => poisoned.into_inner(),
        };
        if !entries.contains_key(&key) && entries.len() >= MAX_ENTRIES {
            // Entries whose budget is whole again carry no information.
            entries.retain(|_, tat| *tat > now);
            if entries.len() >= MAX_ENTRIES {
                tracing::warn!("rate limiter full: refusing new client addresses");
                return Err(60);
            }
        }
        let tat = entries.get(&key).copied().unwrap_or(now).max(now);
        let next = tat + interval;
        if next - now <= window {
            entries.insert(key, next);
            Ok(())
        } else {
            let wait_ms = next - window - now;
            Err(((wait_ms + 999) / 1000).max(1) as u64)
        }
    }
}

/// The client's address: the peer, or behind a trusted proxy the last untrusted
/// address the proxies recorded in `X-Forwarded-For`.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .map(|s| s.parse::<IpAddr>().ok())
        .collect::<Option<Vec<_>>>()
        // A malformed header: count the proxy itself rather than guess.
        .unwrap_or_default();
    forwarded
        .into_iter()
        .rev()
        .find(|ip| !trusted.contains(ip))
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_burst_then_refill_on_the_clock_per_address() {
        let l = Limiter::default();
        let (burst, per_minute) = Bucket::Token.rule();
        for _ in 0..burst {
            assert_eq!(l.check(Bucket::Token, ip("10.0.0.1"), 0), Ok(()));
        }
        let wait = l.check(Bucket::Token, ip("10.0.0.1"), 0).unwrap_err();
        assert_eq!(wait, u64::from(60 / per_minute));
        // Another address, and another bucket, are unaffected.
        assert_eq!(l.check(Bucket::Token, ip("10.0.0.2"), 0), Ok(()));
        assert_eq!(l.check(Bucket::SignIn, ip("10.0.0.1"), 0), Ok(()));
        // One token comes back after 60/per_minute seconds, not before.
        let step = i64::from(60_000 / per_minute);
        assert!(l.check(Bucket::Token, ip("10.0.0.1"), step - 1).is_err());
        assert_eq!(l.check(Bucket::Token, ip("10.0.0.1"), step), Ok(()));
        assert!(l.check(Bucket::Token, ip("10.0.0.1"), step).is_err());
    }

    #[test]
    fn ipv6_counts_per_64() {
        let l = Limiter::default();
        let (burst, _) = Bucket::Token.rule();
        for i in 0..burst {
            let a = ip(&format!("2001:db8:1:2::{:x}", i + 1));
            assert_eq!(l.check(Bucket::Token, a, 0), Ok(()));
        }
        assert!(
            l.check(Bucket::Token, ip("2001:db8:1:2:ffff::1"), 0)
                .is_err()
        );
        assert_eq!(l.check(Bucket::Token, ip("2001:db8:1:3::1"), 0), Ok(()));
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let proxy = ip("10.1.1.1");
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "203.0.113.9, 198.51.100.7".parse().unwrap(),
        );
        // From an untrusted peer the header is ignored.
        assert_eq!(client_ip(ip("192.0.2.1"), &h, &[proxy]), ip("192.0.2.1"));
        // From the proxy, the last address it recorded (the one it saw) counts: the
        // earlier ones are whatever the client claimed.
        assert_eq!(client_ip(proxy, &h, &[proxy]), ip("198.51.100.7"));
        // A chain of trusted proxies is skipped.
        h.insert(
            "x-forwarded-for",
            "203.0.113.9, 198.51.100.7, 10.1.1.2".parse().unwrap(),
        );
        assert_eq!(
            client_ip(proxy, &h, &[proxy, ip("10.1.1.2")]),
            ip("198.51.100.7")
        );
        h.insert("x-forwarded-for", "not an address".parse().unwrap());
        assert_eq!(client_ip(proxy, &h, &[proxy]), proxy);
    }
}
