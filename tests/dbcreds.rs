//! Database logins against a real PostgreSQL cluster: what a grant's login can read,
//! that it vanishes at revocation, at the natural end and after a crash, and that bad
//! targets and hostile names leave nothing behind. twokey administers each cluster as a
//! role made exactly as the README says (no superuser), and each test runs on
//! PostgreSQL 15 and 17 (`name::pg15`, `name::pg17`): 16 changed what CREATEROLE means.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::postgres::{self, Cluster, Version};
use common::psql::{ok, refused};
use reqwest::StatusCode;
use serde_json::{Value, json};

const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";

/// Runs each test on PostgreSQL 15 and on 17: `name::pg15`, `name::pg17`.
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
    a_grant_login_reads_what_the_role_allows_and_vanishes_at_revocation,
    a_hundred_grants_ended_by_the_clock_leave_no_role_behind,
    a_bad_target_shows_a_clear_error_and_creates_nothing,
    only_the_holder_of_a_live_grant_gets_a_login_and_names_cannot_inject,
    a_crash_never_leaves_a_login_behind,
    twokey_psql_connects_with_the_grant_login,
    a_failing_grant_statement_rolls_the_whole_login_back,
    revocation_drops_the_login_at_once_and_owned_objects_follow_the_config,
    without_reassign_what_the_login_made_is_dropped_with_it,
    a_pass_never_drops_a_login_issued_while_it_runs,
    the_admin_privileges_are_checked_against_the_live_target,
    the_admin_connection_verifies_the_server_by_default,
);

/// Points the demo's `demo-db` at the cluster (as twokey's README-made admin, no TLS);
/// its `read` role joins `db_roles`.
fn target(c: &mut twokey::config::Config, port: u16, dir: &std::path::Path, db_roles: &[&str]) {
    let pw = dir.join("pg-admin-password");
    std::fs::write(&pw, format!("{}\n", postgres::TWOKEY_ADMIN_PASSWORD)).unwrap();
    let db = c
        .resources
        .iter_mut()
        .find(|r| r.name == "demo-db")
        .unwrap();
    db.address = Some(format!("127.0.0.1:{port}"));
    db.database = Some("app".into());
    db.admin_user = Some(postgres::TWOKEY_ADMIN.into());
    db.admin_password_file = Some(pw);
    db.tls = Some("disable".into());
    db.reassign_owned_to = None;
    db.roles[0].db_roles = db_roles.iter().map(|s| s.to_string()).collect();
}

async fn start(cluster: &Cluster, db_roles: &[&str]) -> (common::TestApp, tempfile::TempDir) {
    start_at(cluster.port, db_roles).await
}

/// The same, with the target at `port` (a [`Gate`] in front of the cluster).
async fn start_at(port: u16, db_roles: &[&str]) -> (common::TestApp, tempfile::TempDir) {
    let secrets = tempfile::tempdir().unwrap();
    let dir = secrets.path().to_path_buf();
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

async fn a_grant_login_reads_what_the_role_allows_and_vanishes_at_revocation(v: Version) {
    let cluster = Cluster::start_version(v);
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
    let events = twokey::audit::page(&app.state().db, 0, 1000).await.unwrap();
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

async fn a_hundred_grants_ended_by_the_clock_leave_no_role_behind(v: Version) {
    let cluster = Cluster::start_version(v);
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

async fn a_bad_target_shows_a_clear_error_and_creates_nothing(v: Version) {
    let cluster = Cluster::start_version(v);
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
    let pw_file = app.state().config().resources[0]
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

async fn only_the_holder_of_a_live_grant_gets_a_login_and_names_cannot_inject(v: Version) {
    let cluster = Cluster::start_version(v);
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
async fn a_crash_never_leaves_a_login_behind(v: Version) {
    use sqlx::Connection;
    let cluster = Cluster::start_version(v);
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pg-admin-password");
    std::fs::write(&pw, postgres::TWOKEY_ADMIN_PASSWORD).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let toml = twokey::config::demo_config_toml(&format!("127.0.0.1:{port}"), dir.path())
        .replace(
            "description = \"Demo PostgreSQL database\"",
            &format!(
                "description = \"Demo PostgreSQL database\"\naddress = \"127.0.0.1:{}\"\ndatabase = \"app\"\nadmin_user = \"twokey\"\nadmin_password_file = {:?}\ntls = \"disable\"",
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

async fn twokey_psql_connects_with_the_grant_login(v: Version) {
    let cluster = Cluster::start_version(v);
    let (app, _s) = start(&cluster, &["readonly"]).await;
    let cli = common::psql::Cli::new();
    let token = twokey::auth::create_api_token(app.state(), ALICE, "t")
        .await
        .unwrap();
    let out = cli
        .run(
            &["login", "--server", &app.server.url(), "--token-stdin"],
            Some(format!("{token}\n")),
        )
        .await;
    assert!(ok(&out).contains("as alice@example.com"));
    let out = cli
        .run(
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
    let out = cli
        .run(
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

async fn a_failing_grant_statement_rolls_the_whole_login_back(v: Version) {
    let cluster = Cluster::start_version(v);
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

async fn revocation_drops_the_login_at_once_and_owned_objects_follow_the_config(v: Version) {
    let cluster = Cluster::start_version(v);
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

async fn without_reassign_what_the_login_made_is_dropped_with_it(v: Version) {
    let cluster = Cluster::start_version(v);
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

/// A TCP relay in front of the cluster that can hold the next connection until the test
/// releases it: the test decides when a reconciler pass reaches the target.
struct Gate {
    port: u16,
    next: Arc<Mutex<Option<Held>>>,
}

/// (told when the held connection arrives, released when this fires)
type Held = (
    tokio::sync::oneshot::Sender<()>,
    tokio::sync::oneshot::Receiver<()>,
);

impl Gate {
    async fn start(to: u16) -> Gate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let next: Arc<Mutex<Option<Held>>> = Arc::new(Mutex::new(None));
        let slot = next.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let held = slot.lock().unwrap().take();
                tokio::spawn(async move {
                    if let Some((reached, release)) = held {
                        let _ = reached.send(());
                        let _ = release.await;
                    }
                    let mut out = tokio::net::TcpStream::connect(("127.0.0.1", to))
                        .await
                        .unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                });
            }
        });
        Gate { port, next }
    }

    /// Holds the next connection: `reached` fires when it arrives; it goes on to the
    /// cluster when `release` is sent (or dropped).
    fn hold_next(
        &self,
    ) -> (
        tokio::sync::oneshot::Receiver<()>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (reached_tx, reached) = tokio::sync::oneshot::channel();
        let (release, release_rx) = tokio::sync::oneshot::channel();
        *self.next.lock().unwrap() = Some((reached_tx, release_rx));
        (reached, release)
    }
}

/// Issue 12 item 2: a pass that had read the store before a login was made, and listed
/// the target after, dropped a login whose grant was live (right after its password
/// was handed out). Here the pass is held at its connection to the target while the
/// login is made: it must leave the login alone.
async fn a_pass_never_drops_a_login_issued_while_it_runs(v: Version) {
    let cluster = Cluster::start_version(v);
    let gate = Gate::start(cluster.port).await;
    let (app, _s) = start_at(gate.port, &["readonly"]).await;
    let id = granted(&app).await;

    let (reached, release) = gate.hold_next();
    let state = app.state().clone();
    let pass = tokio::spawn(async move { twokey::dbcreds::reconcile(&state).await.unwrap() });
    tokio::time::timeout(Duration::from_secs(20), reached)
        .await
        .expect("the pass never reached the target")
        .unwrap();
    let (s, c) = credentials(&app, ALICE, &id).await;
    assert_eq!(s, StatusCode::CREATED, "{c}");
    let (user, pw) = (
        c["username"].as_str().unwrap().to_string(),
        c["password"].as_str().unwrap().to_string(),
    );
    release.send(()).unwrap();
    assert_eq!(
        pass.await.unwrap(),
        twokey::dbcreds::Reconciled::default(),
        "the pass dropped a live grant's login"
    );
    assert_eq!(cluster.twokey_roles(), std::slice::from_ref(&user));
    assert_eq!(ok(&cluster.psql(&user, &pw, "app", "SELECT 1")), "1");

    // A login whose last attempt failed (and may be retried at any moment) is its live
    // grant's too: only the grant's end lets a pass drop it.
    sqlx::query("UPDATE db_credentials SET status = 'error', last_error = 'timed out'")
        .execute(&app.state().db)
        .await
        .unwrap();
    assert_eq!(
        twokey::dbcreds::reconcile(app.state()).await.unwrap(),
        twokey::dbcreds::Reconciled::default()
    );
    assert_eq!(cluster.twokey_roles(), std::slice::from_ref(&user));

    // Once the grant is over, the next pass drops it.
    app.api(BOB).await.act(&id, "revoke").await;
    assert_eq!(
        twokey::dbcreds::reconcile(app.state())
            .await
            .unwrap()
            .dropped,
        1
    );
    assert!(cluster.twokey_roles().is_empty());
}

/// A config file for `twokey check-config` / `serve` with `demo-db` on the cluster as
/// `admin` (password `admin_pw`), no TLS, `reassign_owned_to = "keeper"`.
fn config_file(
    dir: &std::path::Path,
    port: u16,
    admin: &str,
    admin_pw: &str,
) -> std::path::PathBuf {
    let pw = dir.join("pg-admin-password");
    std::fs::write(&pw, admin_pw).unwrap();
    let toml = twokey::config::demo_config_toml("127.0.0.1:0", dir)
        .replace(
            "description = \"Demo PostgreSQL database\"",
            &format!(
                "description = \"Demo PostgreSQL database\"\naddress = \"127.0.0.1:{port}\"\ndatabase = \"app\"\nadmin_user = \"{admin}\"\nadmin_password_file = {:?}\ntls = \"disable\"\nreassign_owned_to = \"keeper\"",
                pw.display().to_string()
            ),
        )
        .replace("max_duration = \"4h\"", "max_duration = \"4h\"\ndb_roles = [\"readonly\"]");
    let config = dir.join("twokey.toml");
    std::fs::write(&config, toml).unwrap();
    config
}

fn check_config(config: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_twokey"))
        .args(["--config", config.to_str().unwrap(), "check-config"])
        .env("TWOKEY_LOG", "off")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The SQL after "fix: " in a problem line, up to its semicolon.
fn fix_in(problem: &str) -> String {
    let at = problem
        .find("fix: ")
        .unwrap_or_else(|| panic!("no fix in {problem}"))
        + 5;
    let end = problem[at..].find(';').unwrap() + at;
    problem[at..=end].to_string()
}

/// Issue 12 item 1: `check-config` and start-up check the admin's privileges on the live
/// target, naming what is missing and the SQL that fixes it; `serve` refuses to start
/// while the admin could not end a login. Each fix printed is applied as printed.
async fn the_admin_privileges_are_checked_against_the_live_target(v: Version) {
    let cluster = Cluster::start_version(v);
    cluster.admin("postgres", "CREATE ROLE weak LOGIN PASSWORD 'weak-pw'");
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), cluster.port, "weak", "weak-pw");
    let refused_start = |want: String| {
        let config = twokey::config::Config::load(&config).unwrap();
        async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let clock = Arc::new(twokey::clock::ManualClock::new(chrono::Utc::now()));
            match twokey::server::start(config, clock, listener).await {
                Ok(_) => panic!("serve started without {want}"),
                Err(e) => assert!(e.to_string().contains(&want), "{e}"),
            }
        }
    };
    let step = |want: &str| {
        let out = check_config(&config);
        let err = refused(&out);
        let line = err
            .lines()
            .find(|l| l.contains(want))
            .unwrap_or_else(|| panic!("{want} not in: {err}"))
            .to_string();
        assert!(
            line.starts_with("twokey: resource demo-db: ")
                || line.starts_with("resource demo-db: "),
            "{line}"
        );
        line
    };

    // No CREATEROLE: nothing works.
    let line = step("admin_user \"weak\" lacks CREATEROLE");
    assert_eq!(fix_in(&line), "ALTER ROLE \"weak\" CREATEROLE;");
    refused_start("lacks CREATEROLE".into()).await;
    cluster.admin("postgres", &fix_in(&line));

    // Not allowed to hand what the login made to keeper.
    let line = step("lacks the privileges of \"keeper\", which REASSIGN OWNED needs");
    let fix = fix_in(&line);
    match v {
        Version::Pg15 => assert_eq!(fix, "GRANT \"keeper\" TO \"weak\";"),
        Version::Pg17 => assert_eq!(
            fix,
            "GRANT \"keeper\" TO \"weak\" WITH INHERIT TRUE, SET FALSE;"
        ),
    }
    refused_start("lacks the privileges of \"keeper\"".into()).await;
    cluster.admin("postgres", &fix);

    match v {
        Version::Pg15 => {
            // On 15 the admin must inherit the login it joins to end it.
            cluster.admin("postgres", "ALTER ROLE weak NOINHERIT");
            let line = step("is NOINHERIT");
            assert_eq!(fix_in(&line), "ALTER ROLE \"weak\" INHERIT;");
            refused_start("is NOINHERIT".into()).await;
            cluster.admin("postgres", &fix_in(&line));
        }
        Version::Pg17 => {
            // On 16+ CREATEROLE needs ADMIN on a role to make logins its members. That
            // only breaks issuing: twokey starts (and says so in its log).
            let line = step("lacks ADMIN on \"readonly\"");
            assert_eq!(
                fix_in(&line),
                "GRANT \"readonly\" TO \"weak\" WITH ADMIN OPTION, INHERIT FALSE, SET FALSE;"
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let clock = Arc::new(twokey::clock::ManualClock::new(chrono::Utc::now()));
            let server = twokey::server::start(
                twokey::config::Config::load(&config).unwrap(),
                clock,
                listener,
            )
            .await
            .unwrap();
            server.stop().await;
            cluster.admin("postgres", &fix_in(&line));
        }
    }

    // Now all is there: check-config says so, and the rehearsal left nothing behind.
    let out = check_config(&config);
    let said = ok(&out);
    assert!(
        said.contains(&format!(
            "resource demo-db: admin_user can create and drop logins (PostgreSQL {}.",
            match v {
                Version::Pg15 => 15,
                Version::Pg17 => 17,
            }
        )),
        "{said}"
    );
    assert!(
        cluster.twokey_roles().is_empty(),
        "{:?}",
        cluster.twokey_roles()
    );

    // A db_grants privilege the admin does not hold is named too.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "db_roles = [\"readonly\"]",
        "db_roles = [\"readonly\"]\ndb_grants = [\"GRANT SELECT ON secrets TO {role}\"]",
    );
    std::fs::write(&config, text).unwrap();
    let line = step("role read: admin_user \"weak\" cannot make its login");
    assert!(
        line.contains("permission denied for table secrets"),
        "{line}"
    );
    assert!(line.contains("WITH GRANT OPTION"), "{line}");

    // A target that cannot be reached fails check-config (serve only logs it).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = config_file(dir.path(), closed, "weak", "weak-pw");
    let err = refused(&check_config(&config));
    assert!(
        err.contains("resource demo-db: cannot reach the database at 127.0.0.1"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_twokey"))
        .args([
            "--config",
            config.to_str().unwrap(),
            "check-config",
            "--offline",
        ])
        .output()
        .unwrap();
    assert!(ok(&out).contains("OK"));
}

/// Issue 12 item 15: the admin connection verifies the server by default (verify-full):
/// a certificate from a CA twokey does not trust is refused with a clear error and
/// nothing is made; `tls_ca_file` makes it work; a certificate for another name is
/// refused even from that CA.
async fn the_admin_connection_verifies_the_server_by_default(v: Version) {
    let cluster = Cluster::start_with(v, true);
    let port = cluster.port;
    let tls_app = |ca: Option<std::path::PathBuf>| async move {
        let secrets = tempfile::tempdir().unwrap();
        let dir = secrets.path().to_path_buf();
        let app = common::start_with(move |c| {
            target(c, port, &dir, &["readonly"]);
            // What an operator gets without saying anything about TLS.
            c.resources[0].tls = None;
            c.resources[0].tls_ca_file = ca;
            c.validate().unwrap();
        })
        .await;
        app.clock.set(chrono::Utc::now());
        (app, secrets)
    };

    let (app, _s) = tls_app(None).await;
    let id = granted(&app).await;
    let (s, r) = credentials(&app, ALICE, &id).await;
    assert_eq!(s, StatusCode::CONFLICT, "{r}");
    let msg = r["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!(
            "TLS to the database at 127.0.0.1:{port} failed (tls = \"verify-full\")"
        )) && msg.contains("UnknownIssuer")
            && msg.contains("tls_ca_file = the CA's PEM file, not set"),
        "{msg}"
    );
    assert!(cluster.twokey_roles().is_empty());
    let err = twokey::dbcreds::check_target(&app.state().config().resources[0])
        .await
        .unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
    drop(app);

    // The CA configured: it works (and the server takes only TLS: hostssl alone).
    let (app, _s) = tls_app(Some(cluster.ca_file())).await;
    let id = granted(&app).await;
    let (s, c) = credentials(&app, ALICE, &id).await;
    assert_eq!(s, StatusCode::CREATED, "{c}");
    assert!(
        c["psql_url"]
            .as_str()
            .unwrap()
            .ends_with("/app?sslmode=verify-full"),
        "{c}"
    );
    let (user, pw) = (
        c["username"].as_str().unwrap(),
        c["password"].as_str().unwrap(),
    );
    assert_eq!(
        ok(&cluster.psql(
            user,
            pw,
            "app",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )),
        "t"
    );
    assert!(
        twokey::dbcreds::check_target(&app.state().config().resources[0])
            .await
            .unwrap()
            .is_ok()
    );

    // The same CA, a certificate for another host: refused, the login stays until
    // twokey can verify the target again.
    cluster.server_certificate("DNS:db.example.com");
    cluster.reload();
    app.api(BOB).await.act(&id, "revoke").await;
    assert_eq!(
        twokey::dbcreds::reconcile(app.state()).await.unwrap(),
        twokey::dbcreds::Reconciled {
            dropped: 0,
            failed: 1
        }
    );
    let err = twokey::dbcreds::check_target(&app.state().config().resources[0])
        .await
        .unwrap_err();
    assert!(
        err.contains("certificate not valid for name \"127.0.0.1\""),
        "{err}"
    );
    cluster.server_certificate("IP:127.0.0.1");
    cluster.reload();
    assert_eq!(
        twokey::dbcreds::reconcile(app.state())
            .await
            .unwrap()
            .dropped,
        1
    );
    assert!(cluster.twokey_roles().is_empty());
}

/// The README's SQL for the admin is what the tests make the admin with.
#[test]
fn the_readme_gives_the_admin_sql_the_tests_use() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for sql in [postgres::README_ADMIN_SQL_16, postgres::README_ADMIN_SQL_15] {
        assert!(readme.contains(sql), "README.md lacks:\n{sql}");
    }
}
