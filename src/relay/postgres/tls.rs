//! TLS for the PostgreSQL relay: the relay's own certificate, made at first start
//! under the data dir (or configured), that clients verify or pin.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::config::RelayPostgresConfig;
use crate::error::{Error, Result};

/// The certificate the relay answers SSLRequest with.
pub struct ServerTls {
    /// The server side of the TLS handshake.
    pub config: Arc<rustls::ServerConfig>,
    /// The certificate chain as PEM, which clients use as `sslrootcert` to pin it.
    pub cert_pem: String,
    /// SHA-256 of the leaf certificate (DER), as hex.
    pub fingerprint: String,
}

impl ServerTls {
    /// Loads the configured certificate and key, or the ones made under `data_dir`, or
    /// makes them (an ECDSA P-256 key, self-signed, naming `names`).
    pub fn load_or_create(
        cfg: &RelayPostgresConfig,
        data_dir: &Path,
        names: &[String],
    ) -> Result<ServerTls> {
        let (cert_file, key_file) = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => {
                let (c, k) = (
                    data_dir.join("relay_pg_cert.pem"),
                    data_dir.join("relay_pg_key.pem"),
                );
                if !c.exists() || !k.exists() {
                    make_self_signed(&c, &k, names)?;
                }
                (c, k)
            }
        };
        Self::load(&cert_file, &key_file)
    }

    fn load(cert_file: &PathBuf, key_file: &PathBuf) -> Result<ServerTls> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let who = "relay.postgres TLS";
        crate::keyfile::check_private_mode(who, key_file)?;
        let cert_pem = std::fs::read_to_string(cert_file)
            .map_err(|e| Error::Internal(format!("{who}: {}: {e}", cert_file.display())))?;
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| Error::Internal(format!("{who}: {}: {e}", cert_file.display())))?;
        let Some(leaf) = chain.first() else {
            return Err(Error::Internal(format!(
                "{who}: {} holds no certificate",
                cert_file.display()
            )));
        };
        let fingerprint = hex::encode(Sha256::digest(leaf.as_ref()));
        let key = PrivateKeyDer::from_pem_file(key_file)
            .map_err(|e| Error::Internal(format!("{who}: {}: {e}", key_file.display())))?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(format!("{who}: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| Error::Internal(format!("{who}: {e}")))?;
        Ok(ServerTls {
            config: Arc::new(config),
            cert_pem,
            fingerprint,
        })
    }
}

/// Makes a self-signed certificate naming `names` (DNS names and IP addresses), valid
/// for ten years, its key written with mode 0600.
fn make_self_signed(cert_file: &Path, key_file: &Path, names: &[String]) -> Result<()> {
    let fail = |e: rcgen::Error| Error::Internal(format!("relay.postgres TLS: {e}"));
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(fail)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "twokey PostgreSQL relay");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(fail)?;
    let cert = params.self_signed(&key).map_err(fail)?;
    crate::keyfile::write_private(
        "relay.postgres TLS key",
        key_file,
        key.serialize_pem().as_bytes(),
    )?;
    std::fs::write(cert_file, cert.pem()).map_err(|e| {
        Error::Internal(format!("relay.postgres TLS: {}: {e}", cert_file.display()))
    })?;
    Ok(())
}

/// The names a made certificate carries by default: the host clients are told to use,
/// `localhost` and `127.0.0.1`.
pub fn default_names(public_address: Option<&str>, configured: &[String]) -> Vec<String> {
    if !configured.is_empty() {
        return configured.to_vec();
    }
    let mut names = Vec::new();
    if let Some(host) = public_address
        .and_then(|a| a.rsplit_once(':'))
        .map(|(h, _)| h)
    {
        names.push(host.trim_matches(['[', ']']).to_string());
    }
    for n in ["localhost", "127.0.0.1"] {
        if !names.iter().any(|x| x == n) {
            names.push(n.to_string());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RelayPostgresConfig {
        RelayPostgresConfig {
            listen: "127.0.0.1:0".into(),
            public_address: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_names: vec![],
            allow_plaintext: false,
            max_message_bytes: crate::config::DEFAULT_MAX_PG_MESSAGE_BYTES,
        }
    }

    #[test]
    fn a_made_certificate_is_kept_and_loaded_again() {
        let dir = tempfile::tempdir().unwrap();
        let names = default_names(Some("relay.example.com:6432"), &[]);
        assert_eq!(names, ["relay.example.com", "localhost", "127.0.0.1"]);
        let a = ServerTls::load_or_create(&cfg(), dir.path(), &names).unwrap();
        let b = ServerTls::load_or_create(&cfg(), dir.path(), &names).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint, "made once, then loaded");
        assert!(a.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("relay_pg_key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_key_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        ServerTls::load_or_create(&cfg(), dir.path(), &default_names(None, &[])).unwrap();
        let key = dir.path().join("relay_pg_key.pem");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(ServerTls::load_or_create(&cfg(), dir.path(), &[]).is_err());
    }
}
