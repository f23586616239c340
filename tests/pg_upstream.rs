//! The PostgreSQL relay's way to its target, against a real throwaway cluster: TLS as
//! the resource's `tls` says (verify-full with the CA, to the right name; require
//! without it; prefer and disable against a server without TLS), then a full
//! SCRAM-SHA-256 login with the relay's own client side as a real role the
//! non-superuser admin made, spoken by hand (startup, 'R' messages, 'p' responses).
//! Each runs on PostgreSQL 15 and 17 (`name::pg15`, `name::pg17`).
//!
//! And the other way round: real `psql` (libpq's SCRAM and TLS) logging in to the
//! relay's server side ([`ServerExchange`] with the relay's own certificate), served by
//! a one-connection server here that answers one query.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::postgres::{Cluster, TWOKEY_ADMIN, TWOKEY_ADMIN_PASSWORD, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use twokey::config::ResourceConfig;
use twokey::relay::postgres::scram::{ClientExchange, MECHANISM};
use twokey::relay::postgres::tls::{PgStream, UpstreamTls, connect_upstream};

/// Runs each test on PostgreSQL 15 and on 17.
macro_rules! on_15_and_17 {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pg15() {
                super::$name(super::Version::Pg15).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pg17() {
                super::$name(super::Version::Pg17).await
            }
        }
    )*};
}

on_15_and_17!(
    a_real_role_logs_in_with_scram_over_verify_full,
    verify_full_refuses_what_it_cannot_trust_and_require_encrypts_anyway,
    disable_and_prefer_speak_plain_to_a_server_without_tls,
);

const ROLE: &str = "relay_probe";
const ROLE_PASSWORD: &str = "Zq8pW2rT5yU7iO9pA1sD3fG4hJ6kL8xC";

/// A resource as an operator writes it, with `extra` settings.
fn resource(port: u16, extra: &str) -> ResourceConfig {
    toml::from_str(&format!(
        "name = \"db\"\nkind = \"postgres\"\naddress = \"127.0.0.1:{port}\"\ndatabase = \"app\"\n{extra}"
    ))
    .unwrap()
}

fn with_ca(cluster: &Cluster) -> String {
    format!(
        "tls_ca_file = {:?}",
        cluster.ca_file().display().to_string()
    )
}

/// Makes the login role through twokey's non-superuser admin, its password given as
/// the SCRAM verifier (as twokey gives the grants' roles theirs).
fn make_role(cluster: &Cluster) {
    let verifier = twokey::dbcreds::scram_verifier(ROLE_PASSWORD, b"0123456789abcdef", 4096);
    let out = cluster.psql(
        TWOKEY_ADMIN,
        TWOKEY_ADMIN_PASSWORD,
        "postgres",
        &format!("CREATE ROLE {ROLE} LOGIN PASSWORD '{verifier}'"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One backend message: its type and body.
async fn read_message(s: &mut PgStream) -> (u8, Vec<u8>) {
    let kind = s.read_u8().await.unwrap();
    let len = s.read_u32().await.unwrap() as usize;
    assert!((4..1 << 20).contains(&len), "message length {len}");
    let mut body = vec![0; len - 4];
    s.read_exact(&mut body).await.unwrap();
    (kind, body)
}

async fn send(s: &mut PgStream, kind: u8, body: &[u8]) {
    let mut m = vec![kind];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    s.write_all(&m).await.unwrap();
    s.flush().await.unwrap();
}

/// An ErrorResponse's `SQLSTATE: message`.
fn error_words(body: &[u8]) -> String {
    let mut code = String::new();
    let mut msg = String::new();
    for field in body.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let text = String::from_utf8_lossy(&field[1..]).to_string();
        match field[0] {
            b'C' => code = text,
            b'M' => msg = text,
            _ => {}
        }
    }
    format!("{code}: {msg}")
}

/// Logs in as `user` to `database` with `password`, by hand: the startup message, then
/// SCRAM with [`ClientExchange`], up to ReadyForQuery. Err: the server's error, or
/// the SCRAM client's refusal.
async fn login(s: &mut PgStream, user: &str, database: &str, password: &str) -> Result<(), String> {
    let mut body = 196608u32.to_be_bytes().to_vec();
    for p in [
        "user",
        user,
        "database",
        database,
        "application_name",
        "pg_upstream",
    ] {
        body.extend_from_slice(p.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut startup = (body.len() as u32 + 4).to_be_bytes().to_vec();
    startup.extend_from_slice(&body);
    s.write_all(&startup).await.unwrap();
    let mut scram: Option<ClientExchange> = None;
    loop {
        let (kind, body) = read_message(s).await;
        match kind {
            b'R' => {
                let code = u32::from_be_bytes(body[..4].try_into().unwrap());
                let data = &body[4..];
                match code {
                    10 => {
                        let mechanisms: Vec<&[u8]> =
                            data.split(|b| *b == 0).filter(|m| !m.is_empty()).collect();
                        assert!(mechanisms.contains(&MECHANISM.as_bytes()));
                        let (c, first) = ClientExchange::new(password);
                        let mut p = MECHANISM.as_bytes().to_vec();
                        p.push(0);
                        p.extend_from_slice(&(first.len() as u32).to_be_bytes());
                        p.extend_from_slice(&first);
                        send(s, b'p', &p).await;
                        scram = Some(c);
                    }
                    11 => {
                        let fin = scram
                            .as_mut()
                            .unwrap()
                            .server_first(data)
                            .map_err(|e| e.to_string())?;
                        send(s, b'p', &fin).await;
                    }
                    12 => scram
                        .as_ref()
                        .unwrap()
                        .server_final(data)
                        .map_err(|e| e.to_string())?,
                    0 => assert!(scram.is_some(), "AuthenticationOk without SCRAM"),
                    other => panic!("authentication request {other}"),
                }
            }
            b'E' => return Err(error_words(&body)),
            b'Z' => return Ok(()),
            // ParameterStatus, BackendKeyData, notices.
            b'S' | b'K' | b'N' => {}
            other => panic!("unexpected message {:?}", other as char),
        }
    }
}

/// One simple query's single value.
async fn query_one(s: &mut PgStream, sql: &str) -> String {
    let mut q = sql.as_bytes().to_vec();
    q.push(0);
    send(s, b'Q', &q).await;
    let mut value = None;
    loop {
        let (kind, body) = read_message(s).await;
        match kind {
            b'D' => {
                let len = i32::from_be_bytes(body[2..6].try_into().unwrap()) as usize;
                value = Some(String::from_utf8(body[6..6 + len].to_vec()).unwrap());
            }
            b'E' => panic!("{sql}: {}", error_words(&body)),
            b'Z' => return value.unwrap(),
            _ => {}
        }
    }
}

/// Connects as `extra` says, logs in as the role, and says whether the backend sees TLS.
async fn login_and_see_tls(host: &str, port: u16, extra: &str) -> Result<bool, String> {
    let tls = UpstreamTls::of(&resource(port, extra)).unwrap();
    let mut s = connect_upstream(host, port, &tls).await?;
    login(&mut s, ROLE, "app", ROLE_PASSWORD).await?;
    assert_eq!(query_one(&mut s, "SELECT current_user").await, ROLE);
    let ssl = query_one(
        &mut s,
        "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .await;
    assert_eq!(
        ssl == "true",
        s.is_tls(),
        "the backend and the stream agree"
    );
    send(&mut s, b'X', &[]).await;
    Ok(s.is_tls())
}

async fn a_real_role_logs_in_with_scram_over_verify_full(v: Version) {
    let cluster = Cluster::start_with(v, true);
    make_role(&cluster);
    let port = cluster.port;
    // verify-full (the default) with the CA, by address and by name.
    for host in ["127.0.0.1", "localhost"] {
        assert_eq!(
            login_and_see_tls(host, port, &with_ca(&cluster)).await,
            Ok(true)
        );
    }
    // A wrong password: the server's refusal, word for word.
    let tls = UpstreamTls::of(&resource(port, &with_ca(&cluster))).unwrap();
    let mut s = connect_upstream("127.0.0.1", port, &tls).await.unwrap();
    assert_eq!(
        login(&mut s, ROLE, "app", "not-the-password").await,
        Err(format!(
            "28P01: password authentication failed for user \"{ROLE}\""
        ))
    );
    // A role that does not exist fails the same way.
    let mut s = connect_upstream("127.0.0.1", port, &tls).await.unwrap();
    assert_eq!(
        login(&mut s, "nobody_here", "app", ROLE_PASSWORD).await,
        Err("28P01: password authentication failed for user \"nobody_here\"".into())
    );
}

async fn verify_full_refuses_what_it_cannot_trust_and_require_encrypts_anyway(v: Version) {
    let cluster = Cluster::start_with(v, true);
    make_role(&cluster);
    let port = cluster.port;
    // No tls_ca_file: the cluster's CA is not among the public ones.
    assert_eq!(
        login_and_see_tls("127.0.0.1", port, "").await,
        Err(format!(
            "TLS to the database at 127.0.0.1:{port} failed (tls = \"verify-full\"): its \
             certificate is not trusted: not signed by a CA twokey trusts (tls_ca_file = the \
             CA's PEM file, not set)"
        ))
    );
    // require and prefer take it unverified, but encrypted.
    assert_eq!(
        login_and_see_tls("127.0.0.1", port, "tls = \"require\"").await,
        Ok(true)
    );
    assert_eq!(
        login_and_see_tls("127.0.0.1", port, "tls = \"prefer\"").await,
        Ok(true)
    );
    // disable against a server that takes only TLS (hostssl): the server refuses.
    let refused = login_and_see_tls("127.0.0.1", port, "tls = \"disable\"")
        .await
        .unwrap_err();
    assert!(
        refused.starts_with("28000: no pg_hba.conf entry for host \"127.0.0.1\""),
        "{refused}"
    );

    // The same CA, a certificate for another name: refused by name.
    cluster.server_certificate("DNS:db.example.com");
    cluster.reload();
    let want = format!(
        "TLS to the database at 127.0.0.1:{port} failed (tls = \"verify-full\"): its \
         certificate does not name 127.0.0.1"
    );
    // The postmaster reloads on its own time: a bounded wait for the new certificate.
    let mut got = Ok(true);
    for _ in 0..50 {
        got = login_and_see_tls("127.0.0.1", port, &with_ca(&cluster)).await;
        if got.as_ref().err() == Some(&want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(got, Err(want));
    assert_eq!(
        login_and_see_tls("127.0.0.1", port, "tls = \"require\"").await,
        Ok(true),
        "require does not check the name"
    );
}

async fn disable_and_prefer_speak_plain_to_a_server_without_tls(v: Version) {
    let cluster = Cluster::start_with(v, false);
    make_role(&cluster);
    let port = cluster.port;
    assert_eq!(
        login_and_see_tls("127.0.0.1", port, "tls = \"disable\"").await,
        Ok(false)
    );
    assert_eq!(
        login_and_see_tls("127.0.0.1", port, "tls = \"prefer\"").await,
        Ok(false),
        "prefer falls back to plain on 'N'"
    );
    for mode in ["require", "verify-full"] {
        assert_eq!(
            login_and_see_tls("127.0.0.1", port, &format!("tls = {mode:?}")).await,
            Err(format!(
                "the database at 127.0.0.1:{port} refused TLS (tls = {mode:?} needs it; the \
                 server has ssl = off)"
            ))
        );
    }
}

// The relay's server side (ServerExchange, ServerTls) against real psql (libpq's SCRAM
// client): a one-connection server in the test speaks startup, SCRAM and one query.

const ENGINEER: &str = "alice@example.com";
const RELAY_PASSWORD: &str = "relay-pw-Xk3mQ9vT2bN7cR4w";

/// What the one-connection server saw.
#[derive(Debug, PartialEq)]
enum Seen {
    /// Logged in and answered the query, over TLS or not, the client's gs2 flag.
    Served { user: String, tls: bool, flag: char },
    /// Refused the login with this error.
    Refused(String),
    /// The client went away before finishing.
    Gone,
}

/// An ErrorResponse, FATAL, with `code` and `message`.
fn fatal(code: &str, message: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for (f, v) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', code),
        (b'M', message),
    ] {
        b.push(f);
        b.extend_from_slice(v.as_bytes());
        b.push(0);
    }
    b.push(0);
    b
}

fn auth(code: u32, data: &[u8]) -> Vec<u8> {
    let mut b = code.to_be_bytes().to_vec();
    b.extend_from_slice(data);
    b
}

/// A startup-phase message (no type byte): its body.
async fn read_startup(s: &mut PgStream) -> Option<Vec<u8>> {
    let len = s.read_u32().await.ok()? as usize;
    assert!((8..10_000).contains(&len));
    let mut body = vec![0; len - 4];
    s.read_exact(&mut body).await.ok()?;
    Some(body)
}

/// Serves one connection on `listener` as the relay's front would: SSLRequest answered
/// with `tls` (or 'N'), GSSENCRequest declined, SCRAM against `verifier`, then one
/// simple query answered with `42`.
async fn serve_one(
    listener: tokio::net::TcpListener,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    verifier: Option<twokey::relay::postgres::scram::Verifier>,
) -> Seen {
    use twokey::relay::postgres::scram::ServerExchange;
    let (tcp, _) = listener.accept().await.unwrap();
    let mut s = PgStream::Plain(tcp);
    let startup = loop {
        let Some(body) = read_startup(&mut s).await else {
            return Seen::Gone;
        };
        match u32::from_be_bytes(body[..4].try_into().unwrap()) {
            80877103 => {
                let PgStream::Plain(mut tcp) = s else {
                    panic!("SSLRequest twice")
                };
                if let Some(cfg) = &tls {
                    tcp.write_all(b"S").await.unwrap();
                    let acceptor = tokio_rustls::TlsAcceptor::from(cfg.clone());
                    match acceptor.accept(tcp).await {
                        Ok(t) => s = PgStream::Server(Box::new(t)),
                        Err(_) => return Seen::Gone,
                    }
                } else {
                    tcp.write_all(b"N").await.unwrap();
                    s = PgStream::Plain(tcp);
                }
            }
            80877104 => s.write_all(b"N").await.unwrap(),
            196608 => break body,
            other => panic!("startup code {other}"),
        }
    };
    let params: Vec<String> = startup[4..]
        .split(|b| *b == 0)
        .map(|p| String::from_utf8_lossy(p).to_string())
        .collect();
    let user = params
        .chunks(2)
        .find(|kv| kv[0] == "user")
        .map(|kv| kv[1].clone())
        .unwrap();
    send(
        &mut s,
        b'R',
        &auth(10, format!("{MECHANISM}\0\0").as_bytes()),
    )
    .await;
    // SASLInitialResponse: mechanism, length, client-first.
    let Some((b'p', body)) = read_or_gone(&mut s).await else {
        return Seen::Gone;
    };
    let nul = body.iter().position(|b| *b == 0).unwrap();
    assert_eq!(&body[..nul], MECHANISM.as_bytes());
    let first = &body[nul + 5..];
    let flag = first.first().copied().unwrap_or(b'?') as char;
    let refuse = |e: twokey::relay::postgres::scram::ScramError| {
        let code = if e == twokey::relay::postgres::scram::ScramError::AuthFailed {
            "28P01"
        } else {
            "28000"
        };
        let msg = if code == "28P01" {
            format!("password authentication failed for user \"{user}\"")
        } else {
            e.to_string()
        };
        (fatal(code, &msg), msg)
    };
    let (exchange, server_first) = match ServerExchange::start(verifier.as_ref(), first) {
        Ok(x) => x,
        Err(e) => {
            let (body, msg) = refuse(e);
            send(&mut s, b'E', &body).await;
            return Seen::Refused(msg);
        }
    };
    send(&mut s, b'R', &auth(11, &server_first)).await;
    let Some((b'p', body)) = read_or_gone(&mut s).await else {
        return Seen::Gone;
    };
    match exchange.finish(&body) {
        Ok(fin) => send(&mut s, b'R', &auth(12, &fin)).await,
        Err(e) => {
            let (body, msg) = refuse(e);
            send(&mut s, b'E', &body).await;
            return Seen::Refused(msg);
        }
    }
    send(&mut s, b'R', &auth(0, &[])).await;
    for (k, v) in [
        ("server_version", "15.0"),
        ("client_encoding", "UTF8"),
        ("server_encoding", "UTF8"),
        ("standard_conforming_strings", "on"),
        ("integer_datetimes", "on"),
    ] {
        send(&mut s, b'S', format!("{k}\0{v}\0").as_bytes()).await;
    }
    send(&mut s, b'K', &[0, 0, 0, 1, 0, 0, 0, 2]).await;
    send(&mut s, b'Z', b"I").await;
    let Some((b'Q', _)) = read_or_gone(&mut s).await else {
        return Seen::Gone;
    };
    // One text column `answer` (type 25), one row `42`.
    let mut t = 1u16.to_be_bytes().to_vec();
    t.extend_from_slice(b"answer\0");
    t.extend_from_slice(&[
        0, 0, 0, 0, 0, 0, 0, 0, 0, 25, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0,
    ]);
    send(&mut s, b'T', &t).await;
    send(&mut s, b'D', &[0, 1, 0, 0, 0, 2, b'4', b'2']).await;
    send(&mut s, b'C', b"SELECT 1\0").await;
    send(&mut s, b'Z', b"I").await;
    Seen::Served {
        user,
        tls: s.is_tls(),
        flag,
    }
}

async fn read_or_gone(s: &mut PgStream) -> Option<(u8, Vec<u8>)> {
    let kind = s.read_u8().await.ok()?;
    let len = s.read_u32().await.ok()? as usize;
    assert!((4..10_000).contains(&len));
    let mut body = vec![0; len - 4];
    s.read_exact(&mut body).await.ok()?;
    Some((kind, body))
}

/// Runs `psql` with `conninfo` and `password` against a one-connection server; what
/// psql printed (stdout, stderr) and what the server saw.
async fn psql_against(
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    verifier: Option<twokey::relay::postgres::scram::Verifier>,
    conninfo: &str,
    password: &str,
) -> (String, String, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(serve_one(listener, tls, verifier));
    let out = tokio::process::Command::new("psql")
        .args(["-X", "-A", "-t", "-c", "SELECT 42"])
        .arg(format!(
            "port={port} user={ENGINEER} dbname=prod-db {conninfo}"
        ))
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGSSLMODE")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server finished")
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
        seen,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_logs_in_to_the_relays_scram_server_with_the_right_password_only() {
    use twokey::relay::postgres::scram::Verifier;
    let dir = tempfile::tempdir().unwrap();
    let relay_tls = twokey::relay::postgres::tls::ServerTls::load_or_create(
        &twokey::config::RelayPostgresConfig {
            listen: "127.0.0.1:0".into(),
            public_address: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_names: vec![],
            allow_plaintext: false,
            max_message_bytes: twokey::config::DEFAULT_MAX_PG_MESSAGE_BYTES,
        },
        dir.path(),
        &twokey::relay::postgres::tls::default_names(None, &[]),
    )
    .unwrap();
    let pem = dir.path().join("relay.pem");
    std::fs::write(&pem, &relay_tls.cert_pem).unwrap();
    let verify_full = format!(
        "host=localhost sslmode=verify-full sslrootcert={}",
        pem.display()
    );
    let verifier = || {
        Some(
            Verifier::parse(&twokey::dbcreds::scram_verifier(
                RELAY_PASSWORD,
                b"fedcba9876543210",
                4096,
            ))
            .unwrap(),
        )
    };
    let tls = || Some(relay_tls.config.clone());

    // Over TLS, libpq verifying the relay's certificate by its PEM alone; libpq says
    // `y` (it could bind, the server does not offer -PLUS).
    let (out, err, seen) = psql_against(tls(), verifier(), &verify_full, RELAY_PASSWORD).await;
    assert_eq!((out.as_str(), err.as_str()), ("42", ""));
    assert_eq!(
        seen,
        Seen::Served {
            user: ENGINEER.into(),
            tls: true,
            flag: 'y'
        }
    );
    // In the clear (`n`), when the relay is configured to allow it.
    let (out, _, seen) = psql_against(
        None,
        verifier(),
        "host=127.0.0.1 sslmode=disable",
        RELAY_PASSWORD,
    )
    .await;
    assert_eq!(out, "42");
    assert_eq!(
        seen,
        Seen::Served {
            user: ENGINEER.into(),
            tls: false,
            flag: 'n'
        }
    );

    // A wrong password, and no login at all: the same refusal, word for word.
    let want = format!("password authentication failed for user \"{ENGINEER}\"");
    for (v, password) in [(verifier(), "relay-pw-wrong"), (None, RELAY_PASSWORD)] {
        let (out, err, seen) = psql_against(tls(), v, &verify_full, password).await;
        assert_eq!(out, "");
        assert!(err.contains(&format!("FATAL:  {want}")), "{err}");
        assert_eq!(seen, Seen::Refused(want.clone()));
    }

    // libpq insisting on channel binding gives up itself: the relay offers none.
    let (out, err, seen) = psql_against(
        tls(),
        verifier(),
        &format!("{verify_full} channel_binding=require"),
        RELAY_PASSWORD,
    )
    .await;
    assert_eq!(out, "");
    assert!(
        err.contains("channel binding is required, but server did not offer"),
        "{err}"
    );
    assert_eq!(seen, Seen::Gone);

    // verify-full to a name the relay's certificate does not carry: psql refuses.
    let (_, err, seen) = psql_against(
        tls(),
        verifier(),
        &format!(
            "host=relay.invalid hostaddr=127.0.0.1 sslmode=verify-full sslrootcert={}",
            pem.display()
        ),
        RELAY_PASSWORD,
    )
    .await;
    assert!(
        err.contains("does not match host name \"relay.invalid\""),
        "{err}"
    );
    assert_eq!(seen, Seen::Gone);
}
