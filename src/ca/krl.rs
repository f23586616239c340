//! OpenSSH key revocation lists, in the binary format of OpenSSH's `PROTOCOL.krl`:
//! a header, then one certificates section for twokey's CA listing revoked serials.
//! `sshd` reads it through `RevokedKeys`; `ssh-keygen -Q -f KRL CERT` checks a
//! certificate against it (the tests do exactly that).
//!
//! The KRL is public (served to every target), so it revokes by serial only: never by
//! key id, which names the holder (`twokey:<grant>:<email>`) and would publish who held
//! access to what. Every twokey certificate has a random non-zero serial.

use ssh_key::PublicKey;

const MAGIC: &[u8; 8] = b"SSHKRL\n\0";
const FORMAT_VERSION: u32 = 1;
const SECTION_CERTIFICATES: u8 = 1;
const CERT_SERIAL_LIST: u8 = 0x20;

/// What a KRL revokes, for one CA: certificate serials.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Revoked {
    pub serials: Vec<u64>,
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    // Lengths are bounded by what twokey puts in: key blobs and key ids.
    put_u32(out, u32::try_from(bytes.len()).unwrap_or(u32::MAX));
    out.extend_from_slice(bytes);
}

/// Encodes a KRL. `version` must grow whenever the content changes; `generated` is
/// seconds since the epoch.
pub fn encode(
    ca: &PublicKey,
    revoked: &Revoked,
    version: u64,
    generated: u64,
) -> crate::Result<Vec<u8>> {
    // The key's wire encoding, as in an authorized_keys line once base64-decoded.
    let ca_blob = ca
        .to_bytes()
        .map_err(|e| crate::Error::Internal(format!("krl: encoding the CA key: {e}")))?;
    let mut out = Vec::with_capacity(64 + revoked.serials.len() * 8);
    out.extend_from_slice(MAGIC);
    put_u32(&mut out, FORMAT_VERSION);
    put_u64(&mut out, version);
    put_u64(&mut out, generated);
    put_u64(&mut out, 0); // flags
    put_string(&mut out, b""); // reserved
    put_string(&mut out, b"twokey");
    if revoked.serials.iter().all(|s| *s == 0) {
        return Ok(out);
    }

    let mut section = Vec::new();
    put_string(&mut section, &ca_blob);
    put_string(&mut section, b""); // reserved
    let mut serials: Vec<u64> = revoked
        .serials
        .iter()
        .copied()
        .filter(|s| *s != 0)
        .collect();
    serials.sort_unstable();
    serials.dedup();
    if !serials.is_empty() {
        let mut list = Vec::with_capacity(serials.len() * 8);
        for s in serials {
            put_u64(&mut list, s);
        }
        section.push(CERT_SERIAL_LIST);
        put_string(&mut section, &list);
    }
    out.push(SECTION_CERTIFICATES);
    put_string(&mut out, &section);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssh_key::getrandom::SysRng;
    use ssh_key::rand_core::UnwrapErr;
    use ssh_key::{Algorithm, PrivateKey};

    #[test]
    fn layout_follows_protocol_krl() {
        let ca = PrivateKey::random(&mut UnwrapErr(SysRng), Algorithm::Ed25519).unwrap();
        let empty = encode(ca.public_key(), &Revoked::default(), 7, 1_700_000_000).unwrap();
        assert_eq!(&empty[..8], b"SSHKRL\n\0");
        assert_eq!(&empty[8..12], &1u32.to_be_bytes());
        assert_eq!(&empty[12..20], &7u64.to_be_bytes());
        assert_eq!(&empty[20..28], &1_700_000_000u64.to_be_bytes());
        assert_eq!(empty.len(), 8 + 4 + 8 + 8 + 8 + 4 + 4 + 6);

        let krl = encode(
            ca.public_key(),
            &Revoked {
                serials: vec![9, 3, 9, 0],
            },
            8,
            1,
        )
        .unwrap();
        let rest = &krl[empty.len()..];
        assert_eq!(rest[0], SECTION_CERTIFICATES);
        let blob = ca.public_key().to_bytes().unwrap();
        // section length, then the CA blob as a string, then an empty reserved string.
        assert_eq!(&rest[5..9], &(blob.len() as u32).to_be_bytes());
        assert_eq!(&rest[9..9 + blob.len()], &blob[..]);
        let after = &rest[9 + blob.len() + 4..];
        // Serial 0 cannot be revoked by serial; the rest sorted and deduplicated.
        assert_eq!(after[0], CERT_SERIAL_LIST);
        assert_eq!(&after[1..5], &16u32.to_be_bytes());
        assert_eq!(&after[5..13], &3u64.to_be_bytes());
        assert_eq!(&after[13..21], &9u64.to_be_bytes());
        // Nothing after the serials: no key ids, which would name the holders.
        assert_eq!(after.len(), 21);
    }
}
