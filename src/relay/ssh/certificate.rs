//! SSH admission: what only an SSH certificate can be checked for (signed by twokey's
//! CA, a user certificate, no unknown critical option, from a permitted source address,
//! a twokey key id naming a grant, and carrying the role's principals), around the
//! shared [`admission::authorize`].
//!
//! russh checks only the validity window and that the signature matches the key inside
//! the certificate; everything else is here. This must never accept a certificate on
//! its own say-so: the grant it names is looked up live by the core.

use std::net::SocketAddr;

use russh::keys::ssh_key::{Certificate, HashAlg};

use crate::relay::admission::{self, Admitted, Presented, Refusal};
use crate::state::AppState;

/// Critical options twokey's certificates may carry; any other is refused.
const KNOWN_CRITICAL: &[&str] = &["force-command", "source-address"];

/// The SSH side of admission: the certificate is twokey's, a user certificate, within
/// validity, with no unknown critical option, from a permitted address.
pub fn check_certificate(
    state: &AppState,
    cert: &Certificate,
    peer: Option<SocketAddr>,
) -> std::result::Result<Presented, Refusal> {
    let bad = |m: &str| Err(Refusal::Credential(m.to_string()));
    let now = u64::try_from(state.now_ms() / 1000).unwrap_or(0);
    // russh checked the signature against the key inside the certificate; that key
    // must be twokey's CA, checked here.
    let ca_fp = state.ca.public_key().fingerprint(HashAlg::Sha256);
    if cert.validate_at(now, [&ca_fp]).is_err() {
        return bad("certificate not signed by twokey's CA, or outside its validity");
    }
    if cert.cert_type() != russh::keys::ssh_key::certificate::CertType::User {
        return bad("not a user certificate");
    }
    if let Some(opt) = cert
        .critical_options()
        .keys()
        .find(|k| !KNOWN_CRITICAL.contains(&k.as_str()))
    {
        return bad(&format!("unknown critical option {opt}"));
    }
    if let Some(allowed) = cert.critical_options().get("source-address") {
        let Some(peer) = peer else {
            return bad("source address unknown");
        };
        if !allowed
            .split(',')
            .any(|cidr| cidr_contains(cidr.trim(), peer.ip()))
        {
            return bad(&format!(
                "not from a permitted source address ({})",
                peer.ip()
            ));
        }
    }
    // twokey:<grant id>:<email>
    let mut parts = cert.key_id().splitn(3, ':');
    let (Some("twokey"), Some(grant_id), Some(_)) = (parts.next(), parts.next(), parts.next())
    else {
        return bad("not a twokey certificate");
    };
    Ok(Presented {
        grant_id: grant_id.to_string(),
        serial: cert.serial(),
        key_id: cert.key_id().to_string(),
        peer,
    })
}

/// SSH admission: [`check_certificate`], then the shared [`admission::authorize`], then
/// the certificate's principals.
pub async fn authorize(
    state: &AppState,
    resource: &str,
    cert: &Certificate,
    peer: Option<SocketAddr>,
) -> std::result::Result<Admitted, Refusal> {
    let presented = check_certificate(state, cert, peer)?;
    let (admitted, role) = admission::authorize(state, resource, presented).await?;
    // The certificate must carry every principal the grant's role logs in as: one
    // minted for another role (or by hand with the CA key for other users) names its
    // own, and is not a pass to this role's logins.
    let held = cert.valid_principals();
    if role.principals.is_empty() || !role.principals.iter().all(|p| held.contains(p)) {
        return Err(Refusal::Credential(
            "the certificate's principals are not the role's".into(),
        ));
    }
    // The role's source addresses as they are now: a reload may have narrowed them
    // since the certificate (which carries the old ones) was minted.
    if !role.source_address.is_empty()
        && !peer.is_some_and(|p| role.source_address.iter().any(|c| cidr_contains(c, p.ip())))
    {
        return Err(Refusal::Credential(
            "not from a source address the role permits".into(),
        ));
    }
    Ok(admitted)
}

/// Whether `ip` is in `cidr` (`10.0.0.0/8`, `::1`, `127.0.0.1`).
pub fn cidr_contains(cidr: &str, ip: std::net::IpAddr) -> bool {
    let (addr, bits) = match cidr.split_once('/') {
        Some((a, b)) => (a, b.parse::<u32>().ok()),
        None => (cidr, None),
    };
    let Ok(net) = addr.parse::<std::net::IpAddr>() else {
        return false;
    };
    match (net, ip) {
        (std::net::IpAddr::V4(n), std::net::IpAddr::V4(i)) => {
            let bits = bits.unwrap_or(32).min(32);
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (std::net::IpAddr::V6(n), std::net::IpAddr::V6(i)) => {
            let bits = bits.unwrap_or(128).min(128);
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let ip = |s: &str| s.parse().unwrap();
        assert!(cidr_contains("127.0.0.0/8", ip("127.0.0.1")));
        assert!(!cidr_contains("10.0.0.0/8", ip("127.0.0.1")));
        assert!(cidr_contains("127.0.0.1", ip("127.0.0.1")));
        assert!(cidr_contains("::1/128", ip("::1")));
        assert!(!cidr_contains("10.0.0.0/8", ip("::1")));
        assert!(cidr_contains("0.0.0.0/0", ip("8.8.8.8")));
    }
}
