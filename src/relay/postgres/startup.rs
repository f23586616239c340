//! A connection's first steps, before any message of the engineer's reaches a target:
//! the TLS dance (SSLRequest answered with the relay's certificate, GSSENCRequest
//! declined, plaintext refused unless configured), the StartupMessage, the relay
//! password checked with SCRAM-SHA-256 against its stored verifier, and then the
//! shared admission. A CancelRequest arriving here is judged in [`super::cancel`].
//!
//! Every refusal is a FATAL ErrorResponse the engineer can act on, sent before the
//! connection closes; what it says about a password never tells a stranger whether the
//! user or the grant exists.

use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::scram::{ServerExchange, Verifier};
use super::tls::PgStream;
use super::wire::{self, WireError};
use crate::state::AppState;

/// What a client asked for in its StartupMessage.
pub struct Startup {
    pub stream: PgStream,
    /// The email the engineer gave as `user`.
    pub user: String,
    /// The resource, given as `dbname`.
    pub resource: String,
    /// Parameters passed on to the target (application_name, client_encoding…).
    pub passed: Vec<(String, String)>,
}

/// How a connection's start ended, short of a session.
pub enum Begun {
    Startup(Box<Startup>),
    /// A CancelRequest: (pid, secret).
    Cancel(i32, Vec<u8>),
    /// Refused and told why (the reason is for the log and the audit).
    Refused(String),
}

/// Startup parameters passed through to the target. Anything that could change who
/// the session is or how the server treats it (`options`, `replication`, a
/// `session_authorization` or `role`) never is.
const PASSED: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "extra_float_digits",
    "search_path",
];

/// Reads the connection's first packets: TLS if asked for, then the StartupMessage (or
/// a CancelRequest). The bare socket is read exactly packet by packet, so nothing sent
/// before the TLS handshake can be taken as sent inside it.
pub async fn begin(
    state: &AppState,
    mut socket: TcpStream,
    allow_plaintext: bool,
) -> Result<Begun, WireError> {
    for _ in 0..3 {
        let packet = wire::read_untyped(&mut socket).await?;
        match packet.code {
            wire::SSL_REQUEST => {
                let Some(cert) = state.relay_pg.as_ref() else {
                    socket.write_all(b"N").await?;
                    continue;
                };
                socket.write_all(b"S").await?;
                let acceptor = tokio_rustls::TlsAcceptor::from(cert.config.clone());
                let mut s = PgStream::Server(Box::new(acceptor.accept(socket).await?));
                let packet = wire::read_untyped(&mut s).await?;
                return after(s, packet, allow_plaintext, true).await;
            }
            // No GSSAPI here: 'N' tells the client to go on without it.
            wire::GSSENC_REQUEST => socket.write_all(b"N").await?,
            _ => return after(PgStream::Plain(socket), packet, allow_plaintext, false).await,
        }
    }
    Err(WireError::Invalid(
        "too many requests before startup".into(),
    ))
}

async fn after(
    mut s: PgStream,
    packet: wire::Untyped,
    allow_plaintext: bool,
    tls: bool,
) -> Result<Begun, WireError> {
    if packet.code == wire::CANCEL_REQUEST {
        let mut f = wire::Fields::new(&packet.body);
        let pid = f.i32()?;
        return Ok(Begun::Cancel(pid, f.rest().to_vec()));
    }
    Ok(match startup(&mut s, packet, allow_plaintext, tls).await? {
        Ok((user, resource, passed)) => Begun::Startup(Box::new(Startup {
            stream: s,
            user,
            resource,
            passed,
        })),
        Err(why) => Begun::Refused(why),
    })
}

/// The StartupMessage: (user, resource, passed parameters), or refused and told.
async fn startup(
    s: &mut PgStream,
    packet: wire::Untyped,
    allow_plaintext: bool,
    tls: bool,
) -> Result<Result<(String, String, Vec<(String, String)>), String>, WireError> {
    let major = packet.code >> 16;
    if major != 3 {
        let why = format!("protocol {major} is not supported: twokey speaks protocol 3");
        fatal(s, "0A000", &why, None).await;
        return Ok(Err(why));
    }
    if !tls && !allow_plaintext {
        let why = "the relay requires TLS".to_string();
        fatal(
            s,
            "28000",
            "twokey's relay requires TLS",
            Some("connect with sslmode=verify-full (twokey psql does), or sslmode=require"),
        )
        .await;
        return Ok(Err(why));
    }
    let params = wire::startup_params(&packet.body)?;
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let user = get("user").unwrap_or_default();
    let resource = get("database").unwrap_or_default();
    if user.is_empty() || resource.is_empty() {
        let why = "user and dbname are required".to_string();
        fatal(
            s,
            "28000",
            "say who you are and which resource: user=YOUR_EMAIL dbname=RESOURCE",
            None,
        )
        .await;
        return Ok(Err(why));
    }
    for refused in ["replication", "options"] {
        if get(refused).is_some_and(|v| !v.is_empty()) {
            let why = format!("the startup parameter {refused} is not allowed through the relay");
            fatal(s, "28000", &why, None).await;
            return Ok(Err(why));
        }
    }
    // An encoding whose multi-byte characters can hold a quote or backslash byte would
    // have the server read a statement otherwise than the relay judged it.
    if let Some(enc) = get("client_encoding")
        && !crate::policy::sql::safe_client_encoding(&enc)
    {
        let why = format!("the client encoding {enc:?} is not allowed through the relay");
        fatal(s, "22023", &why, Some("use UTF8")).await;
        return Ok(Err(why));
    }
    // Protocol options (`_pq_.…`) and a minor version past 3.0: the relay speaks 3.0
    // and says so, as a server does.
    let unknown: Vec<String> = params
        .iter()
        .filter(|(k, _)| k.starts_with("_pq_."))
        .map(|(k, _)| k.clone())
        .collect();
    if (packet.code & 0xffff) != 0 || !unknown.is_empty() {
        s.write_all(&wire::negotiate_protocol_version(&unknown))
            .await?;
    }
    let passed = params
        .into_iter()
        .filter(|(k, _)| PASSED.contains(&k.as_str()))
        .collect();
    Ok(Ok((user, resource, passed)))
}

/// Checks the relay password with SCRAM-SHA-256 against `verifier` (None: the user
/// has none here; the exchange runs the same and fails). On success the client has
/// been sent the server's final message, not yet AuthenticationOk.
pub async fn authenticate(
    s: &mut PgStream,
    buf: &mut BytesMut,
    verifier: Option<&Verifier>,
) -> Result<bool, WireError> {
    const MAX_AUTH: usize = 4096;
    s.write_all(&wire::authentication(10, b"SCRAM-SHA-256\0\0"))
        .await?;
    let (t, body) = wire::read_message(s, buf, MAX_AUTH).await?;
    if t != b'p' {
        return Err(WireError::Invalid("expected a SASL response".into()));
    }
    let mut f = wire::Fields::new(&body);
    let mechanism = f.cstr()?;
    if mechanism != "SCRAM-SHA-256" {
        return Err(WireError::Invalid(format!(
            "the mechanism {mechanism:?} is not offered"
        )));
    }
    let first = f.value()?.unwrap_or_default();
    let Ok((exchange, server_first)) = ServerExchange::start(verifier, first) else {
        return Ok(false);
    };
    s.write_all(&wire::authentication(11, &server_first))
        .await?;
    let (t, body) = wire::read_message(s, buf, MAX_AUTH).await?;
    if t != b'p' {
        return Err(WireError::Invalid("expected a SASL response".into()));
    }
    match exchange.finish(&body) {
        Ok(server_final) => {
            s.write_all(&wire::authentication(12, &server_final))
                .await?;
            Ok(true)
        }
        Err(_) => Ok(false),
    }
}

/// Sends a FATAL ErrorResponse and flushes it; the connection is closed after.
pub async fn fatal<W: AsyncWrite + Unpin>(w: &mut W, code: &str, text: &str, hint: Option<&str>) {
    let _ = w
        .write_all(&wire::error_response("FATAL", code, text, hint))
        .await;
    let _ = w.flush().await;
}

/// The address a peer is counted and logged under.
pub fn peer_ip(peer: SocketAddr) -> String {
    peer.ip().to_string()
}

/// Refuses a connection over a limit with a FATAL (53300) the client shows, without
/// reading what it sent: before TLS, as a server over its limit does.
pub async fn turn_away(mut socket: TcpStream, why: &str) {
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        fatal(&mut socket, "53300", why, None),
    )
    .await;
}
