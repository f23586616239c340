//! Database logins against a real PostgreSQL cluster: what a grant's login can read,
//! that it vanishes at revocation, at the natural end and after a crash, and that bad
//! targets and hostile names leave nothing behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::postgres::{self, Cluster};
use reqwest::StatusCode;
use serde_json::{Value, json};

const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";

/// Points the demo's `demo-db` at the cluster; its `read` role joins `db_roles`.
fn target(c: &mut twokey::config::Config, port: u16, dir: &std::path::Path, db_roles: &[&str]) {
    let pw = dir.join("pg-admin-password");
    std::fs::write(&pw, format!("{}\n", postgres::ADMIN_PASSWORD)).unwrap();
    let db = c
        .resources
        .iter_mut()
        .find(|r| r.name == "demo-db")
        .unwrap();
    db.address = Some(format!("127.0.0.1:{port}"));
    db.database = Some("app".into());
    db.admin_user = Some("postgres".into());
    db.admin_password_file = Some(pw);
    db.tls = Some("disable".into());
    db.reassign_owned_to = None;
    db.roles[0].db_roles = db_roles.iter().map(|s| s.to_string()).collect();
}

async fn start(cluster: &Cluster, db_roles: &[&str]) -> (common::TestApp, tempfile::TempDir) {
    let secrets = tempfile::tempdir().unwrap();
    let (port, dir) = (cluster.port, secrets.path().to_path_buf());
    let roles: Vec<String> = db_roles.iter().map(|s| s.to_string()).collect();
    let app = common::start_with(move |c| {
        let roles: Vec<&str> = roles.iter().map(String::as_str).collect();
        target(c, port, &dir, &roles);
        c.validate().unwrap();
    })
    .await;
    // VALID UNTIL is checked by PostgreSQL against the wall clock.
    app.clock.set(chrono::Utc::now());
    (app, secrets)
}

async fn granted(app: &common::TestApp) -> String {
    let id = app
        .api(ALICE)
        .await
        .file("demo-db", "read", "1h", None)
        .await;
    let (s, r) = app.api(BOB).await.act(&id, "approve").await;
    assert_eq!(s, StatusCode::OK, "{r}");
    id
}

async fn credentials(app: &common::TestApp, who: &str, id: &str) -> (StatusCode, Value) {
    app.api(who)
        .await
        .post(&format!("/requests/{id}/db-credentials"), json!({}))
        .await
}

fn ok(o: &std::process::Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn refused(o: &std::process::Output) -> String {
    assert!(
        !o.status.success(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_login_reads_what_the_role_allows_and_vanishes_at_revocation() {
    let cluster = Cluster::start();
    let (app, _s) = start(&cluster, &["readonly"]).await;
    let id = granted(&app).await;
    let (s, c) = credentials(&app, ALICE, &id).await;
    assert_eq!(s, StatusCode::CREATED, "{c}");
    let user = c["username"].as_str().unwrap().to_string();
    let pw = c["password"].as_str().unwrap().to_string();
    assert!(user.starts_with("twokey_"), "{user}");
    assert_eq!(c["database"], "app");
    assert_eq!(
        c["psql_url"],
        format!(
            "postgresql://{user}:{pw}@127.0.0.1:{}/app?sslmode=disable",
            cluster.port
        )
    );

    // What the role allows, and no more.
    assert_eq!(
        ok(&cluster.psql(&user, &pw, "app", "SELECT count(*) FROM items")),
        "3"
    );
    let err = refused(&cluster.psql(&user, &pw, "app", "SELECT * FROM secrets"));
    assert!(err.contains("permission denied for table secrets"), "{err}");
    let err = refused(&cluster.psql(&user, &pw, "app", "CREATE TABLE mine (x int)"));
    assert!(err.contains("permission denied for schema public"), "{err}");
    // VALID UNTIL the grant's end, the connection limit, no special powers.
    let (_, r) = app.api(ALICE).await.get(&format!("/requests/{id}")).await;
    let ends =
        chrono::DateTime::parse_from_rfc3339(r["grant"]["ends_at"].as_str().unwrap()).unwrap();
    let row = cluster.admin(
        "postgres",
        &format!("SELECT extract(epoch from rolvaliduntil)::bigint, rolconnlimit, rolsuper, rolcreaterole FROM pg_roles WHERE rolname = '{user}'"),
    );
    assert_eq!(row, format!("{}|5|f|f", ends.timestamp()));
    // The target never saw the password: its statement log has only the SCRAM verifier.
    let log = cluster.log();
    assert!(
        log.contains("CREATE ROLE") && log.contains("SCRAM-SHA-256$4096:"),
        "statement logging is on"
    );
    assert!(
        !log.contains(&pw),
        "the password reached the database's log"
    );

    // Asking again re-keys the login: the old password stops working.
    let (s, c2) = credentials(&app, ALICE, &id).await;
    assert_eq!(s, StatusCode::CREATED);
    let pw2 = c2["password"].as_str().unwrap().to_string();
    assert_eq!(c2["username"], user.as_str());
    assert_ne!(pw, pw2);
    assert!(
        refused(&cluster.psql(&user, &pw, "app", "SELECT 1"))
            .contains("password authentication failed")
    );
    assert_eq!(ok(&cluster.psql(&user, &pw2, "app", "SELECT 1")), "1");

    // A session left open through the revocation.
    let mut open = cluster
        .psql_cmd(&user, &pw2, "app", "SELECT pg_sleep(60)")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.admin(
        "postgres",
        &format!("SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}'"),
    ) != "1"
    {
        assert!(Instant::now() < deadline, "the session never started");
        std::thread::sleep(Duration::from_millis(20));
    }

    let (s, _) = app.api(BOB).await.act(&id, "revoke").await;
    assert_eq!(s, StatusCode::OK);
    let pass = twokey::dbcreds::reconcile(app.state()).await.unwrap();
    assert_eq!(
        pass,
        twokey::dbcreds::Reconciled {
            dropped: 1,
            failed: 0
        }
    );
    let status = open.wait().unwrap();
    assert!(!status.success(), "the open session was cut");
    assert!(
        cluster.twokey_roles().is_empty(),
        "{:?}",
        cluster.twokey_roles()
    );
    let err = refused(&cluster.psql(&user, &pw2, "app", "SELECT 1"));
    assert!(
        err.contains("password authentication failed") || err.contains("does not exist"),
        "{err}"
    );
    // And no new credentials for the revoked grant.
    let (s, _) = credentials(&app, ALICE, &id).await;
    assert_eq!(s, StatusCode::CONFLICT);

    // Each step is in the audit log; no password is.
    let events = twokey::store::audit_page(&app.state().db, 0, 1000)
        .await
        .unwrap();
    let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    for a in [
        "db_role.created",
        "db_credentials.issued",
        "grant.revoked",
        "db_role.dropped",
    ] {
        assert!(actions.contains(&a), "{a} missing: {actions:?}");
    }
    let dropped = events
        .iter()
        .find(|e| e.action == "db_role.dropped")
        .unwrap();
    assert!(
        dropped.details.contains("1 session(s) terminated"),
        "{}",
        dropped.details
    );
    assert!(
        dropped.details.contains("role dropped"),
        "{}",
        dropped.details
    );
    for e in &events {
        assert!(
            !e.details.contains(&pw) && !e.details.contains(&pw2),
            "{}",
            e.details
        );
    }
    // The request page tells the approver what happened to the login.
    let (_, page) = app.browser(BOB).await.get(&format!("/requests/{id}")).await;
    assert!(page.contains(&format!("login {user} dropped")), "{page}");
    app.assert_chain_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_grants_ended_by_the_clock_leave_no_role_behind() {
    let cluster = Cluster::start();
    let (app, _s) = start(&cluster, &["readonly"]).await;
    let alice = app.api(ALICE).await;
    let bob = app.api(BOB).await;
    for _ in 0..100 {
        let id = alice.file("demo-db", "read", "1h", None).await;
        bob.act(&id, "approve").await;
        let (s, c) = alice
            .post(&format!("/requests/{id}/db-credentials"), json!({}))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{c}");
    }
    assert_eq!(cluster.twokey_roles().len(), 100);
    // Nothing to do while the grants are live.
    assert_eq!(
        twokey::dbcreds::reconcile(app.state())
            .await
            .unwrap()
            .dropped,
        0
    );
    app.clock.advance(chrono::Duration::minutes(61));
    twokey::access::sweep(app.state()).await.unwrap();
    let pass = twokey::dbcreds::reconcile(app.state()).await.unwrap();
    let role = cluster.twokey_roles().pop().unwrap_or_default();
    let why = twokey::store::db_credential_by_role(&app.state().db, &role)
        .await
        .unwrap();
    assert_eq!(
        pass,
        twokey::dbcreds::Reconciled {
            dropped: 100,
            failed: 0
        },
        "{why:?}"
    );
    assert!(cluster.twokey_roles().is_empty());
    assert_eq!(
        twokey::dbcreds::reconcile(app.state()).await.unwrap(),
        Default::default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_target_shows_a_clear_error_and_creates_nothing() {
    let cluster = Cluster::start();
    // A membership that does not exist makes CREATE ROLE fail half-way: nothing stays.
    let (app, _secrets) = start(&cluster, &["readonly", "no_such_role"]).await;
    let id = granted(&app).await;
    let (s, r) = credentials(&app, ALICE, &id).await;
    assert_eq!(s, StatusCode::CONFLICT, "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("role \"no_such_role\" does not exist"),
        "{r}"
    );
    assert!(cluster.twokey_roles().is_empty());
    // The requester and the approvers see why on the request page.
    for who in [ALICE, BOB] {
        let (_, page) = app.browser(who).await.get(&format!("/requests/{id}")).await;
        assert!(
            page.contains("Database login: <span class=\"muted\">error: the database refused"),
            "{who}: {page}"
        );
    }
    drop(app);

    // Wrong admin password.
    let (app, _s2) = start(&cluster, &["readonly"]).await;
    // (The password file is read on each use: a rotated secret needs no restart.)
    let pw_file = app.state().config.resources[0]
        .admin_password_file
        .clone()
        .unwrap();
    std::fs::write(&pw_file, "wrong").unwrap();
    let id = granted(&app).await;
    let (s, r) = credentials(&app, ALICE, &id).await;
    assert_eq!(s, StatusCode::CONFLICT, "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("refused twokey's admin credential"),
        "{r}"
    );
    assert!(!r.to_string().contains("wrong"), "{r}");
    drop(app);

    // Unreachable: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = common::start_with(move |c| {
        let dir = tempfile::tempdir().unwrap().keep();
        target(c, closed, &dir, &["readonly"]);
    })
    .await;
    app.clock.set(chrono::Utc::now());
    let id = granted(&app).await;
    let (s, r) = credentials(&app, ALICE, &id).await;
    assert_eq!(s, StatusCode::CONFLICT, "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("cannot reach the database at 127.0.0.1"),
        "{r}"
    );
    assert_eq!(
        twokey::dbcreds::reconcile(app.state())
            .await
            .unwrap()
            .failed,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_holder_of_a_live_grant_gets_a_login_and_names_cannot_inject() {
    let cluster = Cluster::start();
    // A role name full of quotes and SQL exists on the target and is joined safely.
    let (app, _s) = start(&cluster, &["read\"only; x"]).await;
    let id = app
        .api(ALICE)
        .await
        .post(
            "/requests",
            json!({"resource": "demo-db", "role": "read", "duration": "1h",
                   "reason": "'; DROP TABLE items; --", "ticket": "\"; DROP ROLE postgres; --"}),
        )
        .await
        .1["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, _) = credentials(&app, ALICE, &id).await;
    assert_eq!(s, StatusCode::CONFLICT, "pending");
    app.api(BOB).await.act(&id, "approve").await;
    for who in [BOB, "dave@example.com"] {
        let (s, r) = credentials(&app, who, &id).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{who}: {r}");
    }
    let (s, c) = credentials(&app, ALICE, &id).await;
    assert_eq!(s, StatusCode::CREATED, "{c}");
    let (user, pw) = (
        c["username"].as_str().unwrap(),
        c["password"].as_str().unwrap(),
    );
    assert_eq!(
        ok(&cluster.psql(user, pw, "app", "SELECT count(*) FROM items")),
        "3"
    );
    assert_eq!(
        cluster.admin("postgres", &format!("SELECT string_agg(b.rolname, ',') FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member JOIN pg_roles b ON b.oid = m.roleid WHERE r.rolname = '{user}'")),
        "read\"only; x"
    );
    assert_eq!(cluster.admin("app", "SELECT count(*) FROM items"), "3");
    assert_eq!(
        cluster.admin(
            "postgres",
            "SELECT count(*) FROM pg_roles WHERE rolname = 'postgres'"
        ),
        "1"
    );

    // An ssh resource has no database logins.
    let ssh = app
        .api(ALICE)
        .await
        .file("demo-ssh", "admin", "30m", Some("OPS-1"))
        .await;
    app.api(BOB).await.act(&ssh, "approve").await;
    app.api("carol@example.com")
        .await
        .act(&ssh, "approve")
        .await;
    let (s, r) = credentials(&app, ALICE, &ssh).await;
    assert_eq!(s, StatusCode::CONFLICT, "{r}");

    // Names with quotes or SQL are refused in config before anything runs.
    let mut config = common::test_config(tempfile::tempdir().unwrap().path());
    config.resources[0].name = "db\"; DROP ROLE postgres; --".into();
    let err = config.validate().unwrap_err().to_string();
    assert!(err.starts_with("resources[0].name"), "{err}");
}

/// Kills `twokey serve` with SIGKILL while a login exists, moves the grant's end into
/// the past (time passing while it is down), restarts it: the start-up reconcile drops
/// the role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_never_leaves_a_login_behind() {
    use sqlx::Connection;
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pg-admin-password");
    std::fs::write(&pw, postgres::ADMIN_PASSWORD).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let toml = twokey::config::demo_config_toml(&format!("127.0.0.1:{port}"), dir.path())
        .replace(
            "description = \"Demo PostgreSQL database\"",
            &format!(
                "description = \"Demo PostgreSQL database\"\naddress = \"127.0.0.1:{}\"\ndatabase = \"app\"\nadmin_user = \"postgres\"\nadmin_password_file = {:?}\ntls = \"disable\"",
                cluster.port,
                pw.display().to_string()
            ),
        )
        .replace("max_duration = \"4h\"", "max_duration = \"4h\"\ndb_roles = [\"readonly\"]");
    let config = dir.path().join("twokey.toml");
    std::fs::write(&config, toml).unwrap();
    let serve = || {
        Command::new(env!("CARGO_BIN_EXE_twokey"))
            .args(["--config", config.to_str().unwrap(), "serve"])
            .env("TWOKEY_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let base = format!("http://127.0.0.1:{port}");
    let up = |base: String| async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if common::http()
                .get(format!("{base}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("twokey did not come up within 30 s");
    };
    let token = |who: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_twokey"))
            .args([
                "--config",
                config.to_str().unwrap(),
                "token",
                "create",
                "--user",
                who,
                "--scope",
                "requests,approve",
            ])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let mut child = serve();
    up(base.clone()).await;
    let (a, b) = (token(ALICE), token(BOB));
    let http = common::http();
    let r: Value = http
        .post(format!("{base}/api/v1/requests"))
        .bearer_auth(&a)
        .json(&json!({"resource": "demo-db", "role": "read", "duration": "1h", "reason": "crash test"}))
        .send().await.unwrap().json().await.unwrap();
    let id = r["id"].as_str().unwrap().to_string();
    http.post(format!("{base}/api/v1/requests/{id}/approve"))
        .bearer_auth(&b)
        .send()
        .await
        .unwrap();
    let c: Value = http
        .post(format!("{base}/api/v1/requests/{id}/db-credentials"))
        .bearer_auth(&a)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let user = c["username"].as_str().unwrap().to_string();
    assert_eq!(cluster.twokey_roles(), std::slice::from_ref(&user));

    child.kill().unwrap(); // SIGKILL: no shutdown hooks run
    child.wait().unwrap();
    assert_eq!(
        cluster.twokey_roles(),
        std::slice::from_ref(&user),
        "the login outlived the crash"
    );
    // While twokey is down, the grant's end passes.
    let mut db = sqlx::SqliteConnection::connect(&format!(
        "sqlite://{}",
        dir.path().join("twokey.db").display()
    ))
    .await
    .unwrap();
    sqlx::query("UPDATE grants SET ends_at = ?")
        .bind(chrono::Utc::now().timestamp_millis() - 1000)
        .execute(&mut db)
        .await
        .unwrap();
    db.close().await.unwrap();

    let mut child = serve();
    up(base.clone()).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cluster.twokey_roles().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the restarted twokey did not drop {user}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twokey_psql_connects_with_the_grant_login() {
    let cluster = Cluster::start();
    let (app, _s) = start(&cluster, &["readonly"]).await;
    let home = tempfile::tempdir().unwrap();
    let twokey = |args: &[&str], stdin: Option<String>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_twokey"));
        cmd.args(args)
            .env("TWOKEY_HOME", home.path())
            .env("HOME", home.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        async move {
            tokio::task::spawn_blocking(move || {
                use std::io::Write;
                let mut child = cmd.spawn().unwrap();
                if let Some(s) = stdin {
                    child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
                }
                child.wait_with_output().unwrap()
            })
            .await
            .unwrap()
        }
    };
    let token = twokey::auth::create_api_token(app.state(), ALICE, "t")
        .await
        .unwrap();
    let out = twokey(
        &["login", "--server", &app.server.url(), "--token-stdin"],
        Some(format!("{token}\n")),
    )
    .await;
    assert!(ok(&out).contains("as alice@example.com"));
    let out = twokey(
        &[
            "psql",
            "demo-db",
            "--",
            "-tA",
            "-c",
            "select count(*) from items",
        ],
        None,
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success());
    assert!(err.contains("no live grant for demo-db"), "{err}");
    granted(&app).await;
    let out = twokey(
        &[
            "psql",
            "demo-db",
            "--",
            "-tA",
            "-c",
            "select count(*) from items",
        ],
        None,
    )
    .await;
    assert_eq!(ok(&out), "3");
    assert_eq!(cluster.twokey_roles().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_grant_statement_rolls_the_whole_login_back() {
    let cluster = Cluster::start();
    let secrets = tempfile::tempdir().unwrap();
    let (port, dir) = (cluster.port, secrets.path().to_path_buf());
    let app = common::start_with(move |c| {
        target(c, port, &dir, &["readonly"]);
        // CREATE ROLE succeeds, then this fails: nothing may stay.
        c.resources[0].roles[0].db_grants = vec!["GRANT SELECT ON no_such_table TO {role}".into()];
    })
    .await;
    app.clock.set(chrono::Utc::now());
    let id = granted(&app).await;
    let (s, r) = credentials(&app, ALICE, &id).await;
    assert_eq!(s, StatusCode::CONFLICT, "{r}");
    assert!(
        r["message"].as_str().unwrap().contains("no_such_table"),
        "{r}"
    );
    assert!(
        cluster.twokey_roles().is_empty(),
        "{:?}",
        cluster.twokey_roles()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_drops_the_login_at_once_and_owned_objects_follow_the_config() {
    let cluster = Cluster::start();
    // An admin's own role that merely looks like twokey's is never touched.
    cluster.admin("postgres", "CREATE ROLE twokey_admin_tool NOLOGIN");
    let secrets = tempfile::tempdir().unwrap();
    let (port, dir) = (cluster.port, secrets.path().to_path_buf());
    let app = common::start_with(move |c| {
        target(c, port, &dir, &["readonly"]);
        // The background reconciler runs (hourly), so only the revocation wakes it.
        c.server.reconcile_interval = Duration::from_secs(3600);
        c.resources[0].reassign_owned_to = Some("keeper".into());
        c.resources[0].roles[0].db_grants = vec!["GRANT CREATE ON SCHEMA public TO {role}".into()];
    })
    .await;
    app.clock.set(chrono::Utc::now());
    let id = granted(&app).await;
    let (_, c) = credentials(&app, ALICE, &id).await;
    let (user, pw) = (
        c["username"].as_str().unwrap().to_string(),
        c["password"].as_str().unwrap().to_string(),
    );
    ok(&cluster.psql(&user, &pw, "app", "CREATE TABLE made_during_grant (x int)"));

    app.api(BOB).await.act(&id, "revoke").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cluster
        .twokey_roles()
        .iter()
        .all(|r| r == "twokey_admin_tool")
    {
        assert!(
            Instant::now() < deadline,
            "the revocation did not drop {user}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(cluster.twokey_roles(), ["twokey_admin_tool"]);
    // What the login made now belongs to keeper.
    assert_eq!(
        cluster.admin(
            "app",
            "SELECT tableowner FROM pg_tables WHERE tablename = 'made_during_grant'"
        ),
        "keeper"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_reassign_what_the_login_made_is_dropped_with_it() {
    let cluster = Cluster::start();
    let secrets = tempfile::tempdir().unwrap();
    let (port, dir) = (cluster.port, secrets.path().to_path_buf());
    let app = common::start_with(move |c| {
        target(c, port, &dir, &["readonly"]);
        c.resources[0].roles[0].db_grants = vec!["GRANT CREATE ON SCHEMA public TO {role}".into()];
    })
    .await;
    app.clock.set(chrono::Utc::now());
    let id = granted(&app).await;
    let (_, c) = credentials(&app, ALICE, &id).await;
    let (user, pw) = (
        c["username"].as_str().unwrap(),
        c["password"].as_str().unwrap(),
    );
    ok(&cluster.psql(user, pw, "app", "CREATE TABLE scratch (x int)"));
    // The natural end this time.
    app.clock.advance(chrono::Duration::minutes(61));
    twokey::access::sweep(app.state()).await.unwrap();
    assert_eq!(
        twokey::dbcreds::reconcile(app.state())
            .await
            .unwrap()
            .dropped,
        1
    );
    assert!(cluster.twokey_roles().is_empty());
    assert_eq!(
        cluster.admin(
            "app",
            "SELECT count(*) FROM pg_tables WHERE tablename = 'scratch'"
        ),
        "0"
    );
}
