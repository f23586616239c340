//! The relay's side of a session toward the target: TLS as the resource says
//! (verify-full by default), a StartupMessage as the grant's own role, SCRAM-SHA-256
//! with the password only the relay holds, then the server's ParameterStatus and
//! BackendKeyData up to its first ReadyForQuery.
//!
//! The grant's login is made (or re-keyed) on first use and held in memory only
//! ([`Upstreams`]); a target that refuses the held password (another twokey re-keyed it)
//! gets a re-keyed login once. Nothing here is ever shown to the engineer but the
//! target's own refusals, and those never hold the password.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::scram::ClientExchange;
use super::tls::{PgStream, UpstreamTls, connect_upstream};
use super::wire;
use crate::config::{ResourceConfig, RoleConfig};
use crate::dbcreds::UpstreamLogin;
use crate::state::AppState;
use crate::store::GrantRow;

/// What the relay keeps in memory to reach targets: the grants' upstream logins, and
/// each resource's TLS client settings, made once (a root store and a resumption cache
/// per connection would be some 20 KiB of every idle session, and work at every login).
#[derive(Default)]
pub struct Upstreams {
    logins: Mutex<HashMap<String, (Arc<UpstreamLogin>, i64)>>,
    tls: Mutex<HashMap<String, Arc<UpstreamTls>>>,
}

impl Upstreams {
    fn get(&self, grant_id: &str) -> Option<Arc<UpstreamLogin>> {
        self.logins
            .lock()
            .ok()?
            .get(grant_id)
            .map(|(l, _)| l.clone())
    }

    /// The resource's TLS settings: read from its config on first use (a bad CA file is
    /// told at every attempt, not kept).
    fn tls(&self, resource: &ResourceConfig) -> Result<Arc<UpstreamTls>, Failed> {
        if let Some(t) = self
            .tls
            .lock()
            .ok()
            .and_then(|m| m.get(&resource.name).cloned())
        {
            return Ok(t);
        }
        let t = Arc::new(UpstreamTls::of(resource).map_err(|e| failed("08000", e.to_string()))?);
        if let Ok(mut m) = self.tls.lock() {
            m.insert(resource.name.clone(), t.clone());
        }
        Ok(t)
    }

    fn put(&self, grant: &GrantRow, login: Arc<UpstreamLogin>, now: i64) {
        if let Ok(mut m) = self.logins.lock() {
            // Logins of grants that are over are forgotten as new ones come.
            m.retain(|_, (_, ends)| *ends > now);
            m.insert(grant.id.clone(), (login, grant.ends_at));
        }
    }

    fn forget(&self, grant_id: &str) {
        if let Ok(mut m) = self.logins.lock() {
            m.remove(grant_id);
        }
    }
}

/// A logged-in upstream connection, ready for queries.
pub struct Connected {
    pub stream: PgStream,
    /// Bytes read past the first ReadyForQuery (none, from a well-behaved server).
    pub buf: BytesMut,
    /// The server's ParameterStatus and notices, to pass on to the client.
    pub greeting: Vec<u8>,
    /// The backend's real key, kept for cancels.
    pub pid: i32,
    pub secret: Vec<u8>,
    pub host: String,
    pub port: u16,
    pub database: String,
    pub role: String,
    /// The rows of the relay's own catalog query, run before the client is let in.
    pub catalog: Vec<Vec<Option<String>>>,
}

/// Why the target could not be reached or logged in to, in words for the engineer.
pub struct Failed {
    pub text: String,
    /// The SQLSTATE to send the client.
    pub code: String,
}

fn failed(code: &str, text: impl Into<String>) -> Failed {
    Failed {
        code: code.into(),
        text: text.into(),
    }
}

/// Connects to the target as the grant's role, making or re-keying its login if the
/// relay holds none (or the target refuses the one it holds).
pub async fn connect(
    state: &AppState,
    upstreams: &Upstreams,
    grant: &GrantRow,
    resource: &ResourceConfig,
    role: &RoleConfig,
    passed: &[(String, String)],
    max_message: usize,
) -> Result<Connected, Failed> {
    let tls = upstreams.tls(resource)?;
    for attempt in 0..2 {
        let login = match upstreams.get(&grant.id) {
            Some(l) if attempt == 0 => l,
            _ => {
                let l = crate::dbcreds::relay_upstream_login(state, grant, resource, role)
                    .await
                    .map_err(|e| {
                        failed(
                            "08000",
                            format!("twokey could not make your login on the target: {e}"),
                        )
                    })?;
                let l = Arc::new(l);
                upstreams.put(grant, l.clone(), state.now_ms());
                l
            }
        };
        match login_once(&login, &tls, passed, max_message).await {
            Ok(c) => return Ok(c),
            // The held password no longer works (re-keyed elsewhere): once more, fresh.
            Err(f) if f.code == "28P01" && attempt == 0 => upstreams.forget(&grant.id),
            Err(f) => return Err(f),
        }
    }
    Err(failed("28P01", "the target refused the grant's login"))
}

async fn login_once(
    login: &UpstreamLogin,
    tls: &UpstreamTls,
    passed: &[(String, String)],
    max_message: usize,
) -> Result<Connected, Failed> {
    let mut s = connect_upstream(&login.host, login.port, tls)
        .await
        .map_err(|e| failed("08001", e))?;
    let io =
        |e: std::io::Error| failed("08006", format!("the connection to the target failed: {e}"));
    let mut params: Vec<(&str, &str)> = vec![("user", &login.role), ("database", &login.database)];
    params.extend(passed.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    if !passed.iter().any(|(k, _)| k == "application_name") {
        params.push(("application_name", "twokey relay"));
    }
    s.write_all(&wire::startup_message(&params))
        .await
        .map_err(io)?;
    let mut buf = BytesMut::with_capacity(8192);
    let mut scram: Option<ClientExchange> = None;
    let mut greeting = Vec::new();
    let mut key = None;
    loop {
        let (t, body) = wire::read_message(&mut s, &mut buf, max_message)
            .await
            .map_err(|e| failed("08006", format!("the target's answer: {e}")))?;
        match t {
            b'R' => {
                let mut f = wire::Fields::new(&body);
                let code = f.u32().map_err(|e| failed("08P01", e.to_string()))?;
                match code {
                    0 => {}
                    10 => {
                        let (c, first) = ClientExchange::new(login.password.expose());
                        let mut m = BytesMut::new();
                        m.extend_from_slice(b"SCRAM-SHA-256\0");
                        m.extend_from_slice(&(first.len() as i32).to_be_bytes());
                        m.extend_from_slice(&first);
                        s.write_all(&wire::message(b'p', &m)).await.map_err(io)?;
                        scram = Some(c);
                    }
                    11 => {
                        let mut c = scram
                            .take()
                            .ok_or_else(|| failed("08P01", "SCRAM out of order"))?;
                        // PBKDF2 with the target's iteration count (up to 10M): off the
                        // async workers.
                        let msg = f.rest().to_vec();
                        let (c, fin) = tokio::task::spawn_blocking(move || {
                            let fin = c.server_first(&msg);
                            (c, fin)
                        })
                        .await
                        .map_err(|_| failed("XX000", "SCRAM with the target failed"))?;
                        let fin = fin
                            .map_err(|e| failed("28000", format!("SCRAM with the target: {e}")))?;
                        scram = Some(c);
                        s.write_all(&wire::message(b'p', &fin)).await.map_err(io)?;
                    }
                    12 => {
                        let c = scram
                            .as_ref()
                            .ok_or_else(|| failed("08P01", "SCRAM out of order"))?;
                        c.server_final(f.rest()).map_err(|e| {
                            failed("28000", format!("the target did not prove itself: {e}"))
                        })?;
                    }
                    3 if s.is_tls() => {
                        let mut m = login.password.expose().as_bytes().to_vec();
                        m.push(0);
                        s.write_all(&wire::message(b'p', &m)).await.map_err(io)?;
                    }
                    other => {
                        return Err(failed(
                            "28000",
                            format!(
                                "the target asks for authentication method {other}; twokey logs in with SCRAM-SHA-256 (or a password over TLS)"
                            ),
                        ));
                    }
                }
            }
            b'S' | b'N' => greeting.extend_from_slice(&wire::message(t, &body)),
            b'K' => {
                let mut f = wire::Fields::new(&body);
                let pid = f.i32().map_err(|e| failed("08P01", e.to_string()))?;
                key = Some((pid, f.rest().to_vec()));
            }
            b'E' => {
                let (_, code, message) = wire::error_fields(&body);
                return Err(failed(&code, format!("the target refused: {message}")));
            }
            b'Z' => {
                let (pid, secret) = key.unwrap_or((0, Vec::new()));
                return Ok(Connected {
                    stream: s,
                    buf,
                    greeting,
                    pid,
                    secret,
                    host: login.host.clone(),
                    port: login.port,
                    database: login.database.clone(),
                    role: login.role.clone(),
                    catalog: Vec::new(),
                });
            }
            b'v' => {}
            other => {
                return Err(failed(
                    "08P01",
                    format!(
                        "the target sent an unexpected message {:?} at startup",
                        other as char
                    ),
                ));
            }
        }
    }
}

/// Runs the relay's own query on a fresh login, before the client is let in: its
/// rows as text. Any error fails the session (fail closed: the client is told).
pub async fn catalog_rows(
    c: &mut Connected,
    query: &str,
    max_message: usize,
) -> Result<Vec<Vec<Option<String>>>, Failed> {
    let mut q = query.as_bytes().to_vec();
    q.push(0);
    c.stream
        .write_all(&wire::message(b'Q', &q))
        .await
        .map_err(|e| failed("08006", format!("the connection to the target failed: {e}")))?;
    let mut rows = Vec::new();
    let mut error = None;
    loop {
        let (t, body) = wire::read_message(&mut c.stream, &mut c.buf, max_message)
            .await
            .map_err(|e| failed("08006", format!("the target's answer: {e}")))?;
        match t {
            b'D' => {
                let mut f = wire::Fields::new(&body);
                let n = f.i16().map_err(|e| failed("08P01", e.to_string()))?;
                let mut row = Vec::new();
                for _ in 0..n {
                    let v = f.value().map_err(|e| failed("08P01", e.to_string()))?;
                    row.push(v.map(|v| String::from_utf8_lossy(v).to_string()));
                }
                rows.push(row);
            }
            b'E' => error = Some(wire::error_fields(&body).2),
            b'S' => c.greeting.extend_from_slice(&wire::message(t, &body)),
            b'Z' => break,
            _ => {}
        }
    }
    match error {
        Some(e) => Err(failed(
            "58000",
            format!("twokey could not read which columns this role masks: {e}"),
        )),
        None => Ok(rows),
    }
}

/// Asks the target to cancel what a backend is running (a plain-TCP CancelRequest, as
/// libpq sends it).
pub async fn cancel(host: &str, port: u16, pid: i32, secret: &[u8]) {
    let go = async {
        let mut s = tokio::net::TcpStream::connect((host, port)).await?;
        s.write_all(&wire::cancel_request(pid, secret)).await?;
        s.flush().await?;
        // The server closes the connection once it has the request.
        let mut b = [0u8; 1];
        let _ = tokio::io::AsyncReadExt::read(&mut s, &mut b).await;
        Ok::<_, std::io::Error>(())
    };
    if let Err(e) = tokio::time::timeout(std::time::Duration::from_secs(5), go)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    {
        tracing::warn!(error = %e, "relay: a cancel could not be sent to the target");
    }
}
