//! TLS for the PostgreSQL relay: the relay's own certificate, made at first start
//! under the data dir (or configured), that clients verify or pin; the client side of
//! TLS to the target, set by the resource's `tls` and `tls_ca_file` as for twokey's
//! admin connection (`verify-full` by default); and [`PgStream`], either kind of
//! connection, plain or encrypted, for the relay's pump.
//!
//! It must never skip checking the target's certificate unless the resource says
//! `require` or `prefer`, never fall back to plaintext unless it says `prefer`, and
//! never put a secret into an error.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{RelayPostgresConfig, ResourceConfig};
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

/// A connection of the relay, either side: plain TCP, TLS as the server (to a client),
/// or TLS as the client (to a target). Reads and writes go to whichever it is.
pub enum PgStream {
    /// Unencrypted: a client the relay allows plaintext, or a target with `tls =
    /// "disable"` (or `"prefer"` and no TLS on the server).
    Plain(TcpStream),
    /// TLS with the relay as the server ([`ServerTls`]), to psql or a driver.
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// TLS with the relay as the client ([`UpstreamTls`]), to a target.
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl PgStream {
    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        !matches!(self, PgStream::Plain(_))
    }

    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            PgStream::Plain(s) => s,
            PgStream::Server(s) => s.get_ref().0,
            PgStream::Client(s) => s.get_ref().0,
        }
    }
}

impl std::fmt::Debug for PgStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PgStream::Plain(_) => "PgStream::Plain",
            PgStream::Server(_) => "PgStream::Server",
            PgStream::Client(_) => "PgStream::Client",
        })
    }
}

/// One poll, delegated to whichever stream it is (all are Unpin).
macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            PgStream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            PgStream::Server($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
            PgStream::Client($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for PgStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for PgStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            PgStream::Plain(s) => s.is_write_vectored(),
            PgStream::Server(s) => s.is_write_vectored(),
            PgStream::Client(s) => s.is_write_vectored(),
        }
    }
}

/// How long reaching a target may take: TCP connect, SSLRequest and TLS handshake.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The SSLRequest: length 8, code 80877103 (1234 << 16 | 5679).
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// A resource's `tls` setting, as libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamMode {
    /// Plain TCP only.
    Disable,
    /// TLS if the server offers it (certificate not verified), else plain.
    Prefer,
    /// TLS, certificate not verified.
    Require,
    /// TLS, certificate signed by a trusted CA and naming the host.
    VerifyFull,
}

impl UpstreamMode {
    /// The setting's word.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamMode::Disable => "disable",
            UpstreamMode::Prefer => "prefer",
            UpstreamMode::Require => "require",
            UpstreamMode::VerifyFull => "verify-full",
        }
    }
}

/// How the relay reaches a target: the resource's TLS mode and the client side of TLS.
#[derive(Clone)]
pub struct UpstreamTls {
    mode: UpstreamMode,
    /// None only for `disable`.
    config: Option<Arc<rustls::ClientConfig>>,
    ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("mode", &self.mode)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// Reads the resource's `tls` (default [`crate::dbcreds::DEFAULT_TLS`]) and
    /// `tls_ca_file` (PEM CAs trusted beside the public web CAs).
    pub fn of(resource: &ResourceConfig) -> Result<UpstreamTls> {
        let bad = |what: &str| Error::Internal(format!("resource {}: {what}", resource.name));
        let mode = match resource
            .tls
            .as_deref()
            .unwrap_or(crate::dbcreds::DEFAULT_TLS)
        {
            "disable" => UpstreamMode::Disable,
            "prefer" => UpstreamMode::Prefer,
            "require" => UpstreamMode::Require,
            "verify-full" => UpstreamMode::VerifyFull,
            other => return Err(bad(&format!("tls = {other:?} is not a TLS mode"))),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&format!("TLS: {e}")))?;
        let config = match mode {
            UpstreamMode::Disable => None,
            UpstreamMode::Prefer | UpstreamMode::Require => Some(
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
                    .with_no_client_auth(),
            ),
            UpstreamMode::VerifyFull => {
                let mut roots = rustls::RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                };
                if let Some(ca) = &resource.tls_ca_file {
                    use rustls::pki_types::pem::PemObject;
                    let what = |e: &dyn std::fmt::Display| {
                        bad(&format!("tls_ca_file {}: {e}", ca.display()))
                    };
                    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
                        .map_err(|e| what(&e))?
                        .collect::<std::result::Result<_, _>>()
                        .map_err(|e| what(&e))?;
                    if certs.is_empty() {
                        return Err(what(&"holds no certificate"));
                    }
                    for c in certs {
                        roots.add(c).map_err(|e| what(&e))?;
                    }
                }
                Some(builder.with_root_certificates(roots).with_no_client_auth())
            }
        };
        Ok(UpstreamTls {
            mode,
            config: config.map(Arc::new),
            ca_file: resource.tls_ca_file.clone(),
        })
    }

    /// The TLS mode.
    pub fn mode(&self) -> UpstreamMode {
        self.mode
    }
}

/// `require` and `prefer`: the link is encrypted, but the server's certificate is taken
/// as it comes (libpq's `sslmode=require`). The handshake's signatures are still
/// checked, so the peer does hold the key of the certificate it shows.
#[derive(Debug)]
struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        // Why: the resource chose `require`, which by definition trusts any certificate;
        // verify-full is the default and the README says what `require` gives up.
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Connects to the target at `host:port` as `tls` says: TCP, then SSLRequest and the
/// TLS handshake naming `host` (unless `disable`). The error says, in words safe to
/// show an engineer, what failed: reaching it, the server refusing TLS, or its
/// certificate.
pub async fn connect_upstream(
    host: &str,
    port: u16,
    tls: &UpstreamTls,
) -> std::result::Result<PgStream, String> {
    tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, connect_inner(host, port, tls))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "cannot reach the database at {host}:{port} (timed out after {} s)",
                UPSTREAM_CONNECT_TIMEOUT.as_secs()
            ))
        })
}

async fn connect_inner(
    host: &str,
    port: u16,
    tls: &UpstreamTls,
) -> std::result::Result<PgStream, String> {
    let unreachable =
        |e: io::Error| format!("cannot reach the database at {host}:{port} ({})", e.kind());
    let mut tcp = TcpStream::connect((host, port))
        .await
        .map_err(unreachable)?;
    let _ = tcp.set_nodelay(true);
    let Some(config) = &tls.config else {
        return Ok(PgStream::Plain(tcp));
    };
    let mode = tls.mode.as_str();
    tcp.write_all(&SSL_REQUEST).await.map_err(unreachable)?;
    // Exactly one byte, read straight off the socket: anything the server sent after
    // it is then part of the TLS handshake (and fails it) rather than being taken as
    // protocol data that arrived before encryption (CVE-2021-23222).
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(unreachable)?;
    match answer[0] {
        b'S' => {}
        b'N' if tls.mode == UpstreamMode::Prefer => return Ok(PgStream::Plain(tcp)),
        b'N' => {
            return Err(format!(
                "the database at {host}:{port} refused TLS (tls = {mode:?} needs it; the \
                 server has ssl = off)"
            ));
        }
        _ => {
            return Err(format!(
                "the database at {host}:{port} did not answer the TLS request as PostgreSQL \
                 does"
            ));
        }
    }
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| format!("{host:?} is not a host name TLS can check"))?;
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    match connector.connect(name, tcp).await {
        Ok(s) => Ok(PgStream::Client(Box::new(s))),
        Err(e) => Err(tls_failure(host, port, tls, &e)),
    }
}

/// A failed handshake, in words: which check failed and what to set.
fn tls_failure(host: &str, port: u16, tls: &UpstreamTls, e: &io::Error) -> String {
    use rustls::CertificateError as C;
    let ca = match &tls.ca_file {
        Some(p) => format!("now {}", p.display()),
        None => "not set".to_string(),
    };
    let why = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(C::UnknownIssuer)) => format!(
            "its certificate is not trusted: not signed by a CA twokey trusts (tls_ca_file \
             = the CA's PEM file, {ca})"
        ),
        Some(rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        )) => format!("its certificate does not name {host}"),
        Some(rustls::Error::InvalidCertificate(C::BadSignature)) => {
            "its handshake signature does not match its certificate (the server does not \
             hold the certificate's key)"
                .to_string()
        }
        Some(rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. })) => {
            "its certificate has expired".to_string()
        }
        Some(rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. })) => {
            "its certificate is not valid yet".to_string()
        }
        Some(other) => other.to_string(),
        None => e.to_string(),
    };
    format!(
        "TLS to the database at {host}:{port} failed (tls = {:?}): {why}",
        tls.mode.as_str()
    )
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

    fn resource(extra: &str) -> ResourceConfig {
        toml::from_str(&format!(
            "name = \"db\"\nkind = \"postgres\"\naddress = \"127.0.0.1:5432\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn the_upstream_mode_is_read_as_for_the_admin_connection() {
        let mode = |extra: &str| UpstreamTls::of(&resource(extra)).map(|t| t.mode());
        assert_eq!(mode("").unwrap(), UpstreamMode::VerifyFull, "the default");
        assert_eq!(
            mode("tls = \"verify-full\"").unwrap(),
            UpstreamMode::VerifyFull
        );
        assert_eq!(mode("tls = \"require\"").unwrap(), UpstreamMode::Require);
        assert_eq!(mode("tls = \"prefer\"").unwrap(), UpstreamMode::Prefer);
        assert_eq!(mode("tls = \"disable\"").unwrap(), UpstreamMode::Disable);
        assert!(
            UpstreamTls::of(&resource("tls = \"disable\""))
                .unwrap()
                .config
                .is_none()
        );
        let e = mode("tls = \"verify-ca\"").unwrap_err().to_string();
        assert_eq!(
            e,
            "internal error: resource db: tls = \"verify-ca\" is not a TLS mode"
        );

        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = mode(&format!(
            "tls_ca_file = {:?}",
            missing.display().to_string()
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&format!("resource db: tls_ca_file {}", missing.display())),
            "{e}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = mode(&format!("tls_ca_file = {:?}", empty.display().to_string()))
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("holds no certificate"), "{e}");
    }

    /// A loopback server answering SSLRequest with `answer` and, on `S`, the TLS
    /// handshake with `tls`; it echoes one line back through a [`PgStream`].
    async fn loopback(
        tls: Arc<rustls::ServerConfig>,
        answer: u8,
    ) -> (u16, tokio::task::JoinHandle<io::Result<bool>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await?;
            let mut req = [0u8; 8];
            tcp.read_exact(&mut req).await?;
            assert_eq!(req, SSL_REQUEST);
            tcp.write_all(&[answer]).await?;
            let mut s = if answer == b'S' {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                PgStream::Server(Box::new(acceptor.accept(tcp).await?))
            } else {
                PgStream::Plain(tcp)
            };
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await?;
            s.write_all(&buf).await?;
            s.flush().await?;
            Ok(s.is_tls())
        });
        (port, task)
    }

    #[tokio::test]
    async fn the_relays_certificate_verifies_for_localhost_with_only_its_pem() {
        let dir = tempfile::tempdir().unwrap();
        let names = default_names(None, &[]);
        let server = ServerTls::load_or_create(&cfg(), dir.path(), &names).unwrap();

        // A rustls client that trusts nothing but the relay's PEM, as psql with
        // sslrootcert=<that file> and sslmode=verify-full.
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(server.cert_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let (port, task) = loopback(server.config.clone(), b'S').await;
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        tcp.write_all(&SSL_REQUEST).await.unwrap();
        let mut a = [0u8; 1];
        tcp.read_exact(&mut a).await.unwrap();
        assert_eq!(&a, b"S");
        let name = ServerName::try_from("localhost").unwrap();
        let mut s = PgStream::Client(Box::new(connector.connect(name, tcp).await.unwrap()));
        s.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hello");
        assert!(task.await.unwrap().unwrap(), "the server side was TLS");

        // The same through connect_upstream, verify-full with the PEM as tls_ca_file,
        // by name and by address.
        let pem = dir.path().join("relay.pem");
        std::fs::write(&pem, &server.cert_pem).unwrap();
        let up = UpstreamTls::of(&resource(&format!(
            "tls_ca_file = {:?}",
            pem.display().to_string()
        )))
        .unwrap();
        for host in ["localhost", "127.0.0.1"] {
            let (port, task) = loopback(server.config.clone(), b'S').await;
            let mut s = connect_upstream(host, port, &up).await.unwrap();
            assert!(matches!(s, PgStream::Client(_)));
            s.write_all(b"howdy").await.unwrap();
            s.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, b"howdy");
            assert!(task.await.unwrap().unwrap());
        }

        // Without the PEM the relay's self-signed certificate is not trusted.
        let (port, _task) = loopback(server.config.clone(), b'S').await;
        let e = connect_upstream("localhost", port, &UpstreamTls::of(&resource("")).unwrap())
            .await
            .unwrap_err();
        assert_eq!(
            e,
            format!(
                "TLS to the database at localhost:{port} failed (tls = \"verify-full\"): its \
                 certificate is not trusted: not signed by a CA twokey trusts (tls_ca_file = \
                 the CA's PEM file, not set)"
            )
        );
    }

    #[tokio::test]
    async fn a_server_that_refuses_tls_is_refused_unless_prefer() {
        let dir = tempfile::tempdir().unwrap();
        let server =
            ServerTls::load_or_create(&cfg(), dir.path(), &default_names(None, &[])).unwrap();
        for mode in ["require", "verify-full"] {
            let (port, _task) = loopback(server.config.clone(), b'N').await;
            let up = UpstreamTls::of(&resource(&format!("tls = {mode:?}"))).unwrap();
            let e = connect_upstream("127.0.0.1", port, &up).await.unwrap_err();
            assert_eq!(
                e,
                format!(
                    "the database at 127.0.0.1:{port} refused TLS (tls = {mode:?} needs it; \
                     the server has ssl = off)"
                )
            );
        }
        let (port, task) = loopback(server.config.clone(), b'N').await;
        let up = UpstreamTls::of(&resource("tls = \"prefer\"")).unwrap();
        let mut s = connect_upstream("127.0.0.1", port, &up).await.unwrap();
        assert!(!s.is_tls());
        s.write_all(b"plain").await.unwrap();
        let mut back = [0u8; 5];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"plain");
        assert!(!task.await.unwrap().unwrap());

        // Something that is not PostgreSQL.
        let (port, _task) = loopback(server.config.clone(), b'H').await;
        let e = connect_upstream("127.0.0.1", port, &up).await.unwrap_err();
        assert!(
            e.contains("did not answer the TLS request as PostgreSQL does"),
            "{e}"
        );

        // Nobody listening.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = connect_upstream("127.0.0.1", port, &up).await.unwrap_err();
        assert_eq!(
            e,
            format!("cannot reach the database at 127.0.0.1:{port} (connection refused)")
        );
    }

    /// A server that shows a certificate whose key it does not hold.
    #[derive(Debug)]
    struct Impostor(Arc<rustls::sign::CertifiedKey>);

    impl rustls::server::ResolvesServerCert for Impostor {
        fn resolve(
            &self,
            _: rustls::server::ClientHello<'_>,
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            Some(self.0.clone())
        }
    }

    #[tokio::test]
    async fn require_still_checks_the_server_holds_its_certificates_key() {
        let ring = || Arc::new(rustls::crypto::ring::default_provider());
        let p256 = || rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let owner = p256();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&owner)
            .unwrap();
        let serve_with = |key: &rcgen::KeyPair| {
            let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
            let signer = rustls::crypto::ring::sign::any_supported_type(&der).unwrap();
            let certified = rustls::sign::CertifiedKey::new(vec![cert.der().clone()], signer);
            Arc::new(
                rustls::ServerConfig::builder_with_provider(ring())
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_no_client_auth()
                    .with_cert_resolver(Arc::new(Impostor(Arc::new(certified)))),
            )
        };
        let require = UpstreamTls::of(&resource("tls = \"require\"")).unwrap();
        // The owner of the key: require takes its (unverified) certificate.
        let (port, task) = loopback(serve_with(&owner), b'S').await;
        let mut s = connect_upstream("localhost", port, &require).await.unwrap();
        s.write_all(b"12345").await.unwrap();
        let mut back = [0u8; 5];
        s.read_exact(&mut back).await.unwrap();
        assert!(task.await.unwrap().unwrap());
        // Someone replaying that certificate with another key: refused.
        let (port, _task) = loopback(serve_with(&p256()), b'S').await;
        let e = connect_upstream("localhost", port, &require)
            .await
            .unwrap_err();
        assert_eq!(
            e,
            format!(
                "TLS to the database at localhost:{port} failed (tls = \"require\"): its \
                 handshake signature does not match its certificate (the server does not hold \
                 the certificate's key)"
            )
        );
    }
}
