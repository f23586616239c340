//! Relay passwords for PostgreSQL resources reached through twokey's relay: the API
//! hands the grant's holder one (kept only as a SCRAM verifier that a real PostgreSQL
//! accepts), a second replaces the first, every other caller and state is refused, the
//! direct route refuses relay resources, `twokey db-login` and `twokey psql` use it
//! (psql really connects to the relay's address, the password only in its environment),
//! and the request page's button shows it once in headless Chromium.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{Value, json};

const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";
const DAVE: &str = "dave@example.com";

/// The relay's address as clients are told it (nothing listens there unless a test
/// binds it first).
fn relay_config(public_address: String) -> twokey::config::RelayConfig {
    twokey::config::RelayConfig {
        listen: "127.0.0.1:0".into(),
        postgres: Some(twokey::config::RelayPostgresConfig {
            listen: "127.0.0.1:0".into(),
            public_address: Some(public_address),
            tls_cert_file: None,
            tls_key_file: None,
            tls_names: Vec::new(),
            allow_plaintext: false,
            max_message_bytes: twokey::config::DEFAULT_MAX_PG_MESSAGE_BYTES,
        }),
        ..Default::default()
    }
}

/// twokey with the PostgreSQL relay on (clients told `public_address`): `demo-db`
/// reached through it (the default then), `direct-db` reached directly. No relay
/// password touches the target, which is a closed port.
async fn start(public_address: &str) -> common::TestApp {
    let public_address = public_address.to_string();
    let app = common::start_with(move |c| {
        let pw = c.server.data_dir.join("pg-admin-password");
        std::fs::create_dir_all(&c.server.data_dir).unwrap();
        std::fs::write(&pw, "unused\n").unwrap();
        c.relay = Some(relay_config(public_address));
        let db = c
            .resources
            .iter_mut()
            .find(|r| r.name == "demo-db")
            .unwrap();
        db.address = Some("127.0.0.1:1".into());
        db.database = Some("app".into());
        db.admin_user = Some("twokey".into());
        db.admin_password_file = Some(pw);
        db.tls = Some("disable".into());
        let mut direct = db.clone();
        direct.name = "direct-db".into();
        direct.access = Some(twokey::config::DbAccess::Direct);
        c.resources.push(direct);
        c.validate().unwrap();
    })
    .await;
    app.clock.set(chrono::Utc::now());
    app
}

/// alice's request on `resource`, approved by bob.
async fn granted(app: &common::TestApp, resource: &str) -> String {
    let id = app
        .api(ALICE)
        .await
        .file(resource, "read", "1h", None)
        .await;
    let (s, r) = app.api(BOB).await.act(&id, "approve").await;
    assert_eq!(s, StatusCode::OK, "{r}");
    id
}

async fn relay_login(app: &common::TestApp, who: &str, id: &str) -> (StatusCode, Value) {
    app.api(who)
        .await
        .post(&format!("/requests/{id}/relay-login"), json!({}))
        .await
}

/// What the store holds for alice on `demo-db` now: (grant id, verifier).
async fn stored(app: &common::TestApp) -> Option<(String, String)> {
    twokey::store::relay_db_login_for(&app.state().db, ALICE, "demo-db", app.state().now_ms())
        .await
        .unwrap()
}

async fn rows(app: &common::TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM relay_db_logins")
        .fetch_one(&app.state().db)
        .await
        .unwrap()
}

/// Whether `password` is the one `verifier` was made from (same salt and iterations).
fn verifies(verifier: &str, password: &str) -> bool {
    let rest = verifier.strip_prefix("SCRAM-SHA-256$").unwrap();
    let (params, _) = rest.split_once('$').unwrap();
    let (iterations, salt) = params.split_once(':').unwrap();
    let salt = base64::engine::general_purpose::STANDARD
        .decode(salt)
        .unwrap();
    twokey::dbcreds::scram_verifier(password, &salt, iterations.parse().unwrap()) == verifier
}

/// Every byte under the data dir (the SQLite file, its WAL, everything else).
fn data_dir_bytes(dir: &std::path::Path) -> Vec<u8> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(data_dir_bytes(&p));
        } else if let Ok(b) = std::fs::read(&p) {
            out.extend(b);
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_password_is_kept_only_as_a_verifier_and_a_second_replaces_the_first() {
    let app = start("localhost:16432").await;
    let id = granted(&app, "demo-db").await;
    let (_, r) = app.api(ALICE).await.get(&format!("/requests/{id}")).await;
    assert_eq!(r["db_access"], "relay");
    let grant_id = r["grant"]["id"].as_str().unwrap().to_string();
    let tls = app.state().relay_pg.clone().unwrap();

    let (s, l) = relay_login(&app, ALICE, &id).await;
    assert_eq!(s, StatusCode::CREATED, "{l}");
    let pw = l["password"].as_str().unwrap().to_string();
    assert_eq!(pw.len(), 32);
    assert!(pw.chars().all(|c| c.is_ascii_alphanumeric()), "{pw}");
    assert_eq!(l["user"], ALICE);
    assert_eq!(
        (l["host"].as_str(), l["port"].as_u64()),
        (Some("localhost"), Some(16432))
    );
    assert_eq!(l["database"], "demo-db");
    assert_eq!(l["sslmode"], "verify-full");
    assert_eq!(l["sslrootcert_pem"], tls.cert_pem.as_str());
    assert!(tls.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(l["fingerprint"], tls.fingerprint.as_str());
    assert_eq!(l["expires_at"], r["grant"]["ends_at"]);
    assert_eq!(
        l["conninfo"],
        "host=localhost port=16432 dbname=demo-db user=alice@example.com sslmode=verify-full \
         sslrootcert=twokey-relay.pem"
    );
    assert!(!l["conninfo"].as_str().unwrap().contains(&pw));

    // The store holds a verifier of it, for this grant, and nothing readable.
    let (g, verifier) = stored(&app).await.unwrap();
    assert_eq!(g, grant_id);
    assert!(verifier.starts_with("SCRAM-SHA-256$4096:"), "{verifier}");
    assert!(verifies(&verifier, &pw));
    assert!(!verifies(&verifier, "not-the-password"));
    let salt = verifier.split(['$', ':']).nth(2).unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(salt)
            .unwrap()
            .len(),
        16
    );
    // Matched case-insensitively, as the relay gets the user from the client.
    let upper = twokey::store::relay_db_login_for(
        &app.state().db,
        "ALICE@example.com",
        "demo-db",
        app.state().now_ms(),
    )
    .await
    .unwrap();
    assert_eq!(upper.map(|(g, _)| g), Some(grant_id.clone()));
    // A real PostgreSQL takes the stored verifier as a role's password and lets the
    // relay password in with it: it is SCRAM-SHA-256 as the relay will check it.
    let cluster = common::postgres::Cluster::start();
    cluster.admin(
        "postgres",
        &format!("CREATE ROLE relay_check LOGIN PASSWORD '{verifier}'"),
    );
    let out = cluster.psql("relay_check", &pw, "app", "SELECT 1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cluster.psql("relay_check", "wrong", "app", "SELECT 1");
    assert!(!out.status.success());

    // Audited in the same step, with neither the password nor the verifier.
    let events = twokey::audit::page(&app.state().db, 0, 100_000)
        .await
        .unwrap();
    let issued: Vec<_> = events
        .iter()
        .filter(|e| e.action == "relay_password.issued")
        .collect();
    assert_eq!(issued.len(), 1);
    assert_eq!(issued[0].subject, grant_id);
    assert_eq!(issued[0].actor, ALICE);
    let details: Value = serde_json::from_str(&issued[0].details).unwrap();
    assert_eq!(details["request_id"], id.as_str());
    assert_eq!(details["resource"], "demo-db");
    assert_eq!(details["by"]["email"], ALICE);
    assert!(
        !issued[0].details.contains(&pw) && !issued[0].details.contains(&verifier[..30]),
        "{}",
        issued[0].details
    );

    // A second replaces the first: one row, the old password no longer verifies.
    let (s, l2) = relay_login(&app, ALICE, &id).await;
    assert_eq!(s, StatusCode::CREATED, "{l2}");
    let pw2 = l2["password"].as_str().unwrap().to_string();
    assert_ne!(pw, pw2);
    let (_, verifier2) = stored(&app).await.unwrap();
    assert_ne!(verifier, verifier2, "a fresh salt each time");
    assert!(verifies(&verifier2, &pw2));
    assert!(!verifies(&verifier2, &pw));
    assert_eq!(rows(&app).await, 1);
    assert_eq!(
        app.audit_actions()
            .await
            .iter()
            .filter(|a| *a == "relay_password.issued")
            .count(),
        2
    );

    // No password anywhere in twokey's files: the database, its WAL, the audit log.
    app.state().db.close().await;
    let bytes = data_dir_bytes(app.dir.path());
    assert!(
        contains(&bytes, &verifier2[..30]),
        "the scan reads the database"
    );
    for p in [&pw, &pw2] {
        assert!(
            !contains(&bytes, p),
            "a relay password is stored in the data dir"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_certificate_is_public_and_absent_without_the_relay() {
    let app = start("localhost:16432").await;
    let resp = common::http()
        .get(app.url("/api/v1/relay/pg-cert"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/x-pem-file");
    assert_eq!(
        resp.text().await.unwrap(),
        app.state().relay_pg.as_ref().unwrap().cert_pem
    );

    let off = common::start().await;
    let resp = common::http()
        .get(off.url("/api/v1/relay/pg-cert"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    // Without the relay, a database is reached directly; an SSH resource has no access.
    let id = off
        .api(ALICE)
        .await
        .file("demo-db", "read", "1h", None)
        .await;
    let (_, r) = off.api(ALICE).await.get(&format!("/requests/{id}")).await;
    assert_eq!(r["db_access"], "direct");
    let id = off
        .api(ALICE)
        .await
        .file("demo-ssh", "admin", "30m", Some("INC-1"))
        .await;
    let (_, r) = off.api(ALICE).await.get(&format!("/requests/{id}")).await;
    assert_eq!(r["db_access"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_holder_of_a_live_grant_on_a_relay_resource_gets_a_relay_password() {
    let app = start("localhost:16432").await;
    let refused = |(s, b): (StatusCode, Value), want: StatusCode, words: &str| {
        assert_eq!(s, want, "{b}");
        let msg = b["message"].as_str().unwrap_or_default();
        assert!(msg.contains(words), "{msg:?} lacks {words:?}");
    };

    // Still pending.
    let pending = app
        .api(ALICE)
        .await
        .file("demo-db", "read", "1h", None)
        .await;
    refused(
        relay_login(&app, ALICE, &pending).await,
        StatusCode::CONFLICT,
        "still pending",
    );
    // Unknown request.
    refused(
        relay_login(&app, ALICE, "no-such-request").await,
        StatusCode::NOT_FOUND,
        "not found",
    );

    let id = granted(&app, "demo-db").await;
    // Not the holder: the approver, and an admin.
    for who in [BOB, DAVE] {
        refused(
            relay_login(&app, who, &id).await,
            StatusCode::FORBIDDEN,
            "only the grant's holder",
        );
    }
    // A token without the `requests` scope.
    let approve_only = app
        .api_with(
            ALICE,
            &twokey::auth::scopes::Scopes::parse("approve").unwrap(),
        )
        .await;
    let (s, _) = approve_only
        .post(&format!("/requests/{id}/relay-login"), json!({}))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // A database reached directly, and an SSH resource.
    let direct = granted(&app, "direct-db").await;
    refused(
        relay_login(&app, ALICE, &direct).await,
        StatusCode::CONFLICT,
        "direct-db is reached directly, not through twokey's relay: use \"Get database credentials\"",
    );
    let ssh = app
        .api(ALICE)
        .await
        .file("demo-ssh", "admin", "30m", Some("INC-1"))
        .await;
    for approver in [BOB, "carol@example.com"] {
        let (s, r) = app.api(approver).await.act(&ssh, "approve").await;
        assert_eq!(s, StatusCode::OK, "{r}");
    }
    refused(
        relay_login(&app, ALICE, &ssh).await,
        StatusCode::CONFLICT,
        "demo-ssh is not a database",
    );
    assert_eq!(rows(&app).await, 0, "no refusal stored anything");

    // Revoked: refused, and the password issued before is worth nothing.
    let (s, _) = relay_login(&app, ALICE, &id).await;
    assert_eq!(s, StatusCode::CREATED);
    assert!(stored(&app).await.is_some());
    let (s, _) = app.api(BOB).await.act(&id, "revoke").await;
    assert_eq!(s, StatusCode::OK);
    refused(
        relay_login(&app, ALICE, &id).await,
        StatusCode::CONFLICT,
        "been revoked",
    );
    assert!(
        stored(&app).await.is_none(),
        "a revoked grant's password is dead"
    );

    // Ended by the clock.
    let id = granted(&app, "demo-db").await;
    let (s, _) = relay_login(&app, ALICE, &id).await;
    assert_eq!(s, StatusCode::CREATED);
    app.clock.advance(chrono::Duration::minutes(61));
    refused(
        relay_login(&app, ALICE, &id).await,
        StatusCode::CONFLICT,
        "ended",
    );
    assert!(
        stored(&app).await.is_none(),
        "an ended grant's password is dead"
    );
    assert_eq!(
        app.audit_actions()
            .await
            .iter()
            .filter(|a| *a == "relay_password.issued")
            .count(),
        2
    );
    app.assert_chain_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_direct_route_refuses_a_relay_resource_and_says_what_to_do() {
    let app = start("localhost:16432").await;
    let id = granted(&app, "demo-db").await;
    let (s, b) = app
        .api(ALICE)
        .await
        .post(&format!("/requests/{id}/db-credentials"), json!({}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert_eq!(
        b["message"],
        "demo-db is reached only through twokey's relay: run `twokey psql demo-db`, or get a \
         relay password on the request page"
    );
    // Nothing was started towards the target.
    let (_, r) = app.api(ALICE).await.get(&format!("/requests/{id}")).await;
    let mut conn = app.state().db.acquire().await.unwrap();
    let row = twokey::store::db_credential(&mut conn, r["grant"]["id"].as_str().unwrap())
        .await
        .unwrap();
    assert!(row.is_none(), "a login was recorded for a relay resource");
    // The browser form for the direct route is refused the same way.
    let b = app.browser(ALICE).await;
    let csrf = b.csrf(&format!("/requests/{id}")).await;
    let resp = b
        .post(
            &format!("/requests/{id}/db-credentials"),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    assert!(
        resp.text()
            .await
            .unwrap()
            .contains("reached only through twokey")
    );
}

/// Runs the twokey binary with its own config dir under `home`.
fn twokey(home: &std::path::Path, args: &[&str], stdin: Option<String>) -> std::process::Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_twokey"));
    cmd.args(args)
        .env("TWOKEY_HOME", home.join("twokey"))
        .env("HOME", home)
        .env("TWOKEY_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(s) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    child
}

async fn run(home: &std::path::Path, args: &[&str], stdin: Option<String>) -> std::process::Output {
    let child = twokey(home, args, stdin);
    tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap()
}

async fn cli_login(app: &common::TestApp, home: &std::path::Path) {
    let token = twokey::auth::create_api_token(app.state(), ALICE, "t")
        .await
        .unwrap();
    let out = run(
        home,
        &["login", "--server", &app.server.url(), "--token-stdin"],
        Some(format!("{token}\n")),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twokey_db_login_prints_the_password_once_and_saves_the_relay_certificate() {
    let app = start("localhost:16432").await;
    let home = tempfile::tempdir().unwrap();
    cli_login(&app, home.path()).await;
    let out = run(home.path(), &["db-login", "demo-db"], None).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no live grant for demo-db"), "{err}");

    granted(&app, "demo-db").await;
    let out = run(
        home.path(),
        &["db-login", "demo-db", "--role", "read"],
        None,
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pw = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("password"))
        .map(|p| p.trim().to_string())
        .unwrap();
    let (_, verifier) = stored(&app).await.unwrap();
    assert!(
        verifies(&verifier, &pw),
        "the printed password is the stored one"
    );
    assert_eq!(
        stdout.matches(pw.as_str()).count(),
        1,
        "shown once: {stdout}"
    );
    // The certificate, public (0644), beside twokey's other files.
    let cert = home.path().join("twokey/twokey-relay-localhost.pem");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&cert).unwrap().permissions().mode() & 0o777,
        0o644
    );
    assert_eq!(
        std::fs::read_to_string(&cert).unwrap(),
        app.state().relay_pg.as_ref().unwrap().cert_pem
    );
    let line = format!(
        "psql \"host=localhost port=16432 dbname=demo-db user=alice@example.com \
         sslmode=verify-full sslrootcert={}\"",
        cert.display()
    );
    assert!(stdout.contains(&line), "{stdout}");
    assert!(
        stdout.contains(&format!("saved at {}", cert.display())),
        "{stdout}"
    );

    // A resource reached directly says what to run instead.
    granted(&app, "direct-db").await;
    let out = run(home.path(), &["db-login", "direct-db"], None).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "direct-db is reached directly, not through twokey's relay: run twokey psql direct-db"
        ),
        "{err}"
    );
}

/// `twokey psql` on a relay resource runs the real psql against the relay's address
/// with verify-full: a listener standing in for the relay sees psql's SSLRequest, reads
/// the process's command line and environment, and declines TLS, which psql (as
/// verify-full demands) refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twokey_psql_on_a_relay_resource_connects_to_the_relay_with_the_password_in_its_env() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = relay.local_addr().unwrap().port();
    let app = start(&format!("127.0.0.1:{port}")).await;
    let home = tempfile::tempdir().unwrap();
    cli_login(&app, home.path()).await;
    granted(&app, "demo-db").await;

    let child = twokey(
        home.path(),
        &["psql", "demo-db", "--", "-c", "select 1"],
        None,
    );
    let pid = child.id();
    let (mut sock, _) = tokio::time::timeout(std::time::Duration::from_secs(30), relay.accept())
        .await
        .expect("psql never connected to the relay's address")
        .unwrap();
    let mut ssl_request = [0u8; 8];
    sock.read_exact(&mut ssl_request).await.unwrap();
    assert_eq!(
        ssl_request,
        [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f],
        "an SSLRequest"
    );
    // twokey exec'd psql: the same process, psql's arguments, the password in its env.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).to_string())
        .collect();
    let cert = home.path().join("twokey/twokey-relay-127.0.0.1.pem");
    // (Debian's psql is a wrapper that execs the real one in the same process.)
    assert!(args[0].ends_with("psql"), "{args:?}");
    assert_eq!(
        args[1],
        format!(
            "host=127.0.0.1 port={port} dbname=demo-db user=alice@example.com \
             sslmode=verify-full sslrootcert={}",
            cert.display()
        )
    );
    assert_eq!(&args[2..4], ["-c", "select 1"]);
    let pw = environ
        .split(|b| *b == 0)
        .find_map(|v| v.strip_prefix(b"PGPASSWORD="))
        .map(|v| String::from_utf8_lossy(v).to_string())
        .expect("PGPASSWORD in psql's environment");
    let (_, verifier) = stored(&app).await.unwrap();
    assert!(verifies(&verifier, &pw));
    assert!(
        !args.iter().any(|a| a.contains(&pw)),
        "the password is on the command line"
    );
    assert_eq!(
        std::fs::read_to_string(&cert).unwrap(),
        app.state().relay_pg.as_ref().unwrap().cert_pem
    );
    // No TLS here: psql must refuse to go on.
    sock.write_all(b"N").await.unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("through twokey's relay"), "{err}");
    assert!(err.contains("server does not support SSL"), "{err}");
}

async fn sign_in(b: &common::webdriver::Browser, base: &str, email: &str) {
    b.goto(&format!("{base}/login")).await;
    b.click_and_wait(&format!("button[id='login-{email}']"))
        .await;
    assert!(b.url().await.ends_with("/requests"), "signed in as {email}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_page_gets_a_relay_password_once_and_a_direct_resource_keeps_its_button() {
    let app = start("localhost:16432").await;
    let base = app.server.url();
    let id = granted(&app, "demo-db").await;
    let direct = granted(&app, "direct-db").await;
    let b = common::webdriver::Browser::start().await;
    sign_in(&b, &base, ALICE).await;

    b.goto(&format!("{base}/requests/{direct}")).await;
    assert!(b.exists("#get-db-credentials").await);
    assert!(!b.exists("#get-relay-password").await);

    b.goto(&format!("{base}/requests/{id}")).await;
    assert!(
        !b.exists("#get-db-credentials").await,
        "no target login for a relay resource"
    );
    b.click_and_wait("#get-relay-password").await;
    assert!(
        b.url()
            .await
            .ends_with(&format!("/requests/{id}/relay-login"))
    );
    let pw = b.text("#relay-password").await;
    let (_, verifier) = stored(&app).await.unwrap();
    assert!(
        verifies(&verifier, &pw),
        "the page shows the stored password: {pw:?}"
    );
    assert_eq!(
        b.text("#relay-psql").await,
        "psql \"host=localhost port=16432 dbname=demo-db user=alice@example.com \
         sslmode=verify-full sslrootcert=twokey-relay.pem\""
    );
    assert_eq!(b.text("#relay-user").await, ALICE);
    assert_eq!(b.text("#relay-one-step").await, "twokey psql demo-db");
    let (_, r) = app.api(ALICE).await.get(&format!("/requests/{id}")).await;
    assert_eq!(
        b.text("#relay-expires").await,
        r["grant"]["ends_at"].as_str().unwrap()
    );
    let href = b
        .script("return document.querySelector('#relay-cert-link').href;")
        .await;
    assert_eq!(href, format!("{base}/api/v1/relay/pg-cert"));
    let pem = common::http()
        .get(href.as_str().unwrap())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(pem, app.state().relay_pg.as_ref().unwrap().cert_pem);
    let source = b.source().await;
    assert!(
        !source.contains(&verifier),
        "the verifier is not on the page"
    );
    b.quit().await;

    // The page is never cached, and the form needs the session's CSRF token.
    let c = app.browser(ALICE).await;
    let csrf = c.csrf(&format!("/requests/{id}")).await;
    let resp = c
        .post(&format!("/requests/{id}/relay-login"), &[("csrf", &csrf)])
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let resp = c
        .post(
            &format!("/requests/{id}/relay-login"),
            &[("csrf", "forged")],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // Another user gets no button and is refused by the form.
    let bob = app.browser(BOB).await;
    let (_, page) = bob.get(&format!("/requests/{id}")).await;
    assert!(!page.contains("get-relay-password"));
    let csrf = bob.csrf(&format!("/requests/{id}")).await;
    let resp = bob
        .post(&format!("/requests/{id}/relay-login"), &[("csrf", &csrf)])
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        app.audit_actions()
            .await
            .iter()
            .filter(|a| *a == "relay_password.issued")
            .count(),
        2
    );
    app.assert_chain_ok().await;
}
