//! The `twokey` binary itself: config checking, tokens, audit verify and export —
//! including a chain tampered with directly in the database file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use sqlx::{Connection, SqliteConnection};

fn twokey(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_twokey"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("TWOKEY_LOG", "warn")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A data dir (holding its config too) with a few audited decisions made through
/// the real server, which is stopped before the binary touches the database.
async fn populated() -> (tempfile::TempDir, std::path::PathBuf) {
    let app = common::start().await;
    let alice = app.api("alice@example.com").await;
    let bob = app.api("bob@example.com").await;
    for _ in 0..3 {
        let id = alice.file("demo-db", "read", "1h", None).await;
        bob.act(&id, "approve").await;
    }
    let common::TestApp { server, dir, .. } = app;
    server.stop().await;
    let config = dir.path().join("twokey.toml");
    std::fs::write(
        &config,
        twokey::config::demo_config_toml("127.0.0.1:0", dir.path()),
    )
    .unwrap();
    (dir, config)
}

fn db_path(config: &Path) -> String {
    format!(
        "sqlite://{}",
        config.parent().unwrap().join("twokey.db").display()
    )
}

/// Runs SQL as an attacker with write access to the file: triggers dropped first.
async fn tamper(config: &Path, sql: &str) {
    let mut conn = SqliteConnection::connect(&db_path(config)).await.unwrap();
    sqlx::query("DROP TRIGGER IF EXISTS audit_events_no_update")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("DROP TRIGGER IF EXISTS audit_events_no_delete")
        .execute(&mut conn)
        .await
        .unwrap();
    for stmt in sql.split(';').filter(|s| !s.trim().is_empty()) {
        sqlx::query(stmt).execute(&mut conn).await.unwrap();
    }
    conn.close().await.unwrap();
}

/// Each tamper case gets its own copy of the data dir.
fn copy_setup(from: &Path) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "twokey.db",
        "twokey.db-wal",
        "twokey.db-shm",
        "audit_signing_key",
    ] {
        let src = from.parent().unwrap().join(f);
        if src.exists() {
            std::fs::copy(&src, dir.path().join(f)).unwrap();
        }
    }
    let config = dir.path().join("twokey.toml");
    std::fs::write(
        &config,
        twokey::config::demo_config_toml("127.0.0.1:0", dir.path()),
    )
    .unwrap();
    (dir, config)
}

#[tokio::test]
async fn audit_verify_reports_ok_then_the_first_bad_row() {
    let (_keep, config) = populated().await;
    let out = twokey(&config, &["audit", "verify"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    // 2 tokens + 3 × (created, approval, approved, grant.started)
    assert!(
        stdout(&out).starts_with("OK: 14 events"),
        "{}",
        stdout(&out)
    );

    // The table refuses edits outright while its triggers stand.
    let mut conn = SqliteConnection::connect(&db_path(&config)).await.unwrap();
    let err = sqlx::query("UPDATE audit_events SET actor = 'x' WHERE seq = 1")
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
    let err = sqlx::query("DELETE FROM audit_events WHERE seq = 1")
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
    conn.close().await.unwrap();

    let cases = [
        (
            "UPDATE audit_events SET details = '{\"reason\":\"edited\"}' WHERE seq = 5",
            5,
        ),
        ("DELETE FROM audit_events WHERE seq = 7", 7),
        // Swap rows 9 and 10 by exchanging their sequence numbers.
        (
            "UPDATE audit_events SET seq = -1 WHERE seq = 9; UPDATE audit_events SET seq = 9 WHERE seq = 10; UPDATE audit_events SET seq = 10 WHERE seq = -1",
            9,
        ),
        (
            "UPDATE audit_events SET actor = 'mallory@example.com' WHERE seq = 3",
            3,
        ),
        // The newest events deleted: the shorter chain verifies, the head does not.
        ("DELETE FROM audit_events WHERE seq >= 12", 12),
    ];
    for (sql, bad) in cases {
        let (_dir, copy) = copy_setup(&config);
        tamper(&copy, sql).await;
        let out = twokey(&copy, &["audit", "verify"]);
        assert!(!out.status.success(), "{sql}: tampering went unnoticed");
        assert!(
            stdout(&out).starts_with(&format!("FAIL: first bad event is seq {bad}:")),
            "{sql}: {}",
            stdout(&out)
        );
    }
}

#[tokio::test]
async fn audit_export_verifies_offline_and_detects_a_tampered_file() {
    let (keep, config) = populated().await;
    let export = keep.path().join("audit.jsonl");
    let out = twokey(
        &config,
        &[
            "audit",
            "export",
            "--format",
            "jsonl",
            "--output",
            export.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&export).unwrap();
    // 14 events, the export's checkpoint event, its signed checkpoint, the closing line.
    assert_eq!(text.lines().count(), 17);
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    for key in [
        "seq",
        "ts",
        "time",
        "actor",
        "action",
        "subject",
        "details",
        "prev_hash",
        "hash",
    ] {
        assert!(first.get(key).is_some(), "export lacks {key}");
    }
    // Stdout export is the same.
    let out = twokey(&config, &["audit", "export"]);
    assert_eq!(stdout(&out), text);

    let out = twokey(
        &config,
        &["audit", "verify", "--file", export.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stdout(&out));

    let tampered = keep.path().join("tampered.jsonl");
    std::fs::write(
        &tampered,
        text.replacen("bob@example.com", "carol@example.com", 1),
    )
    .unwrap();
    let out = twokey(
        &config,
        &["audit", "verify", "--file", tampered.to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(
        stdout(&out).starts_with("FAIL: first bad event is seq"),
        "{}",
        stdout(&out)
    );

    let garbage = keep.path().join("garbage.jsonl");
    std::fs::write(&garbage, "not json\n").unwrap();
    let out = twokey(
        &config,
        &["audit", "verify", "--file", garbage.to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("line 1"), "{}", stderr(&out));
}

#[test]
fn check_config_accepts_the_example_and_names_bad_keys() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("twokey.example.toml");
    let out = twokey(&example, &["check-config"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("OK (2 resources, 3 roles)"),
        "{}",
        stdout(&out)
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(&example).unwrap().replacen(
        "min_approvals = 1",
        "min_approvals = 0",
        1,
    );
    std::fs::write(&bad, text).unwrap();
    let out = twokey(&bad, &["check-config"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("resources[0].roles[0].min_approvals: must be at least 1"),
        "{}",
        stderr(&out)
    );

    std::fs::write(&bad, "[server]\nlisten = \"127.0.0.1:1\"\ntypo = true\n").unwrap();
    let out = twokey(&bad, &["check-config"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("typo"), "{}", stderr(&out));

    let out = twokey(&dir.path().join("missing.toml"), &["check-config"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot read"), "{}", stderr(&out));
}

#[tokio::test]
async fn token_create_prints_a_working_token_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("twokey.toml");
    std::fs::write(
        &config,
        twokey::config::demo_config_toml("127.0.0.1:0", &dir.path().join("data")),
    )
    .unwrap();
    let out = twokey(&config, &["token", "create", "--user", "alice@example.com"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token = stdout(&out).trim().to_string();
    assert!(token.starts_with("tk_") && token.len() > 40);
    let db = std::fs::read(dir.path().join("data/twokey.db")).unwrap();
    assert!(
        !String::from_utf8_lossy(&db).contains(&token[3..]),
        "token stored in clear"
    );

    let out = twokey(
        &config,
        &["token", "create", "--user", "nobody@example.com"],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("must sign in once first"),
        "{}",
        stderr(&out)
    );

    // Scopes and life: what was asked is stored; bad values are refused by name.
    let out = twokey(
        &config,
        &[
            "token",
            "create",
            "--user",
            "bob@example.com",
            "--label",
            "ci",
            "--scope",
            "approve",
            "--ttl",
            "2h",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mut conn = SqliteConnection::connect(&format!(
        "sqlite://{}",
        dir.path().join("data/twokey.db").display()
    ))
    .await
    .unwrap();
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT label, scopes, expires_at - created_at FROM api_tokens ORDER BY created_at",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            ("cli".into(), "requests".into(), 7 * 86_400_000),
            ("ci".into(), "approve".into(), 7_200_000)
        ]
    );
    for (flag, value, says) in [
        ("--scope", "admin", "--scope: unknown scope \"admin\""),
        ("--ttl", "forever", "--ttl"),
        ("--ttl", "8d", "auth.token_ttl"),
    ] {
        let out = twokey(
            &config,
            &["token", "create", "--user", "bob@example.com", flag, value],
        );
        assert!(!out.status.success(), "{flag} {value}");
        assert!(
            stderr(&out).contains(says),
            "{flag} {value}: {}",
            stderr(&out)
        );
    }
}

/// The first line a child prints, waiting at most 30 s (a server stuck while starting
/// fails the test instead of hanging it).
fn first_line(stdout: std::process::ChildStdout) -> String {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let line = std::io::BufReader::new(stdout).lines().next();
        let _ = tx.send(line);
    });
    match rx.recv_timeout(std::time::Duration::from_secs(30)) {
        Ok(Some(Ok(line))) => line,
        other => panic!("no first line within 30 s: {other:?}"),
    }
}

/// Kills the child process when the test ends, pass or fail.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `twokey demo` on a free loopback port with its data in `data`, logging at `log`;
/// its stdout piped (the first line says where it serves).
fn demo(data: &Path, log: &str, stderr: std::process::Stdio) -> Running {
    Running(
        Command::new(env!("CARGO_BIN_EXE_twokey"))
            .args(["demo", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .env("TWOKEY_LOG", log)
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap(),
    )
}

#[tokio::test]
async fn demo_writes_its_config_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let mut child = demo(&data, "warn", std::process::Stdio::null());
    let first = first_line(child.0.stdout.take().unwrap());
    let url = first
        .strip_prefix("twokey is serving at ")
        .expect(&first)
        .to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    let resp = reqwest::get(format!("{url}/healthz")).await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    let login = reqwest::get(format!("{url}/login"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(login.contains("Demo sign-in is on"));
    for user in [
        "alice@example.com",
        "bob@example.com",
        "carol@example.com",
        "dave@example.com",
    ] {
        assert!(login.contains(user), "{user} missing from demo sign-in");
    }

    let config = data.join("twokey.toml");
    let parsed = twokey::config::Config::load(&config).unwrap();
    assert!(parsed.auth.dev_login);
    assert!(data.join("twokey.db").exists());
    let out = twokey(&config, &["check-config"]);
    assert!(out.status.success(), "{}", stderr(&out));
    drop(child);
}

#[tokio::test]
async fn secrets_never_reach_the_logs_or_pages() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let mut child = demo(&data, "trace", std::process::Stdio::piped());
    // Trace logging fills a pipe buffer in seconds: read stderr from the start, or the
    // server blocks writing its logs and stops answering.
    let mut stderr = child.0.stderr.take().unwrap();
    let logs = std::thread::spawn(move || {
        let mut logs = String::new();
        let _ = stderr.read_to_string(&mut logs);
        logs
    });
    let first = first_line(child.0.stdout.take().unwrap());
    let url = first
        .strip_prefix("twokey is serving at ")
        .unwrap()
        .to_string();
    let config = data.join("twokey.toml");
    let mint = |user: &str| {
        stdout_of(&twokey(
            &config,
            &[
                "token",
                "create",
                "--user",
                user,
                "--scope",
                "requests,approve",
            ],
        ))
    };
    let (alice, bob) = (mint("alice@example.com"), mint("bob@example.com"));
    let http = common::http();
    let created: serde_json::Value = http
        .post(format!("{url}/api/v1/requests"))
        .bearer_auth(alice.trim())
        .json(&serde_json::json!({"resource": "demo-db", "role": "read", "duration": "1h", "reason": "log check"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap();
    let mut bodies = String::new();
    for (token, path) in [
        (bob.trim(), "approve"),
        (alice.trim(), "approve"),
        ("tk_wrong", "approve"),
    ] {
        let resp = http
            .post(format!("{url}/api/v1/requests/{id}/{path}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        bodies.push_str(&resp.text().await.unwrap());
    }
    let _ = child.0.kill();
    let _ = child.0.wait();
    let logs = logs.join().unwrap();
    assert!(
        logs.contains("decision recorded"),
        "the server logged at trace: {logs}"
    );
    for token in [alice.trim(), bob.trim()] {
        let secret = &token["tk_".len()..];
        assert!(!logs.contains(secret), "a token reached the logs");
        assert!(!bodies.contains(secret), "a token reached a response");
    }
    // Nor the audit signing key (the demo's worker signs checkpoints as it runs).
    let key = std::fs::read_to_string(data.join("audit_signing_key")).unwrap();
    for line in key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!logs.contains(line), "the audit key reached the logs");
        assert!(!bodies.contains(line), "the audit key reached a response");
    }
}

fn stdout_of(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test]
async fn ca_commands_print_the_servers_ca_and_write_its_krl() {
    // A server that minted and revoked, then stopped; the binary reads the same store.
    let app = common::start().await;
    let served_ca = reqwest::get(app.url("/api/v1/ca/ssh"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let served_krl = reqwest::get(app.url("/api/v1/ca/krl"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let common::TestApp { server, dir, .. } = app;
    server.stop().await;
    let config = dir.path().join("twokey.toml");
    std::fs::write(
        &config,
        twokey::config::demo_config_toml("127.0.0.1:0", dir.path()),
    )
    .unwrap();

    let out = twokey(&config, &["ca", "public-key"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), served_ca);
    assert!(stdout(&out).starts_with("ssh-ed25519 "));
    assert!(!stdout(&out).contains("PRIVATE"));

    let krl = dir.path().join("revoked_keys");
    let out = twokey(&config, &["ca", "krl", "--output", krl.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let written = std::fs::read(&krl).unwrap();
    assert_eq!(&written[..8], b"SSHKRL\n\0");
    // Same content as served, but for the generation time (bytes 20..28).
    assert_eq!(written.len(), served_krl.len());
    assert_eq!(&written[..20], &served_krl[..20]);
    assert_eq!(&written[28..], &served_krl[28..]);
    // OpenSSH reads it.
    let out = Command::new("ssh-keygen")
        .args(["-Q", "-l", "-f"])
        .arg(&krl)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("# KRL version"), "{}", stdout(&out));
}

/// Runs `twokey CMD`, which must exit by itself within 30 s: a server that starts
/// when it should have refused is killed and fails the test rather than hanging it.
fn bounded(config: &Path, cmd: &str) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_twokey"))
        .arg("--config")
        .arg(config)
        .arg(cmd)
        .env("TWOKEY_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(30)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("twokey {cmd} did not exit within 30 s: it is serving");
        }
    }
}

/// A config with demo sign-in on, listening on `listen`, optionally published at `url`.
fn dev_login_config(dir: &Path, listen: &str, public_url: Option<&str>) -> std::path::PathBuf {
    let mut toml = twokey::config::demo_config_toml(listen, dir);
    if let Some(url) = public_url {
        toml = toml.replacen(
            "[server]\n",
            &format!("[server]\npublic_url = \"{url}\"\n"),
            1,
        );
    }
    let path = dir.join("twokey.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

#[tokio::test]
async fn serve_refuses_demo_sign_in_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    for (listen, url, why) in [
        ("0.0.0.0:0", None, "server.listen = \"0.0.0.0:0\""),
        ("192.0.2.10:8080", None, "not a loopback address"),
        ("[::]:0", None, "not a loopback address"),
        (
            "127.0.0.1:0",
            Some("https://twokey.example.com"),
            "server.public_url = \"https://twokey.example.com\"",
        ),
    ] {
        let config = dev_login_config(dir.path(), listen, url);
        for cmd in ["serve", "check-config"] {
            let out = bounded(&config, cmd);
            assert!(
                !out.status.success(),
                "{cmd} {listen} {url:?}: {}",
                stdout(&out)
            );
            let err = stderr(&out);
            assert!(
                err.contains("auth.dev_login: demo sign-in lets anyone sign in as anyone")
                    && err.contains(why),
                "{cmd} {listen} {url:?}: {err}"
            );
        }
    }
    // Turned off, the same address is fine.
    let config = dev_login_config(dir.path(), "0.0.0.0:0", Some("https://twokey.example.com"));
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("dev_login = true", "dev_login = false")
        .replace(
            "dev_mailbox = true",
            "dev_mailbox = false\nsmtp_host = \"127.0.0.1\"",
        );
    std::fs::write(&config, text).unwrap();
    let out = twokey(&config, &["check-config"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // On loopback, published on loopback, serve runs.
    let config = dev_login_config(dir.path(), "127.0.0.1:0", Some("http://localhost:8080"));
    let out = twokey(&config, &["check-config"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut child = Running(
        Command::new(env!("CARGO_BIN_EXE_twokey"))
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env("TWOKEY_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let first = first_line(child.0.stdout.take().unwrap());
    assert!(
        first.starts_with("twokey is serving at http://127.0.0.1:"),
        "{first}"
    );
}

/// Durations in the file: `"50ms"` is a duration like any other, and one that is not a
/// duration (or is zero where that means nothing) is refused by `check-config` with its
/// key named, never replaced by a default.
#[test]
fn check_config_takes_milliseconds_and_names_a_bad_duration() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("twokey.toml");
    let demo = twokey::config::demo_config_toml("127.0.0.1:0", dir.path());
    let with = |line: &str| demo.replacen("[server]", &format!("[server]\n{line}"), 1);
    std::fs::write(&config, with("outbox_interval = \"50ms\"")).unwrap();
    let out = twokey(&config, &["check-config"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for (line, want) in [
        (
            "outbox_interval = \"2 seconds\"",
            "server.outbox_interval: \"2 seconds\" is not a duration",
        ),
        (
            "sweep_interval = \"100us\"",
            "server.sweep_interval: \"100us\" is not a duration",
        ),
        (
            "reconcile_interval = \"400d\"",
            "server.reconcile_interval: \"400d\" is longer than a year",
        ),
    ] {
        std::fs::write(&config, with(line)).unwrap();
        let out = twokey(&config, &["check-config"]);
        assert!(!out.status.success(), "{line}");
        assert!(stderr(&out).contains(want), "{line}: {}", stderr(&out));
    }
    std::fs::write(
        &config,
        demo.replacen("max_duration = \"4h\"", "max_duration = \"4 hours\"", 1),
    )
    .unwrap();
    let out = twokey(&config, &["check-config"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("resources[0].roles[0].max_duration: \"4 hours\" is not a duration"),
        "{}",
        stderr(&out)
    );
    std::fs::write(
        &config,
        demo.replacen("[auth]", "[auth]\nsession_lifetime = \"0ms\"", 1),
    )
    .unwrap();
    let out = twokey(&config, &["check-config"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("auth.session_lifetime: must be longer than zero"),
        "{}",
        stderr(&out)
    );
}

/// SIGHUP reads the file again: a role's change applies to the next request, a file
/// that does not check changes nothing (and says why), and the server keeps serving.
#[tokio::test]
async fn sighup_reloads_the_policy_and_a_bad_file_changes_nothing() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let mut child = demo(&data, "warn", std::process::Stdio::piped());
    let (tx, lines) = std::sync::mpsc::channel();
    let stderr = child.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let next_starting = |prefix: &str| loop {
        match lines.recv_timeout(std::time::Duration::from_secs(30)) {
            Ok(l) if l.starts_with(prefix) => return l,
            Ok(_) => {}
            Err(e) => panic!("no stderr line starting {prefix:?} within 30 s: {e}"),
        }
    };
    let url = first_line(child.0.stdout.take().unwrap())
        .strip_prefix("twokey is serving at ")
        .unwrap()
        .to_string();
    let config = data.join("twokey.toml");
    let alice = stdout_of(&twokey(
        &config,
        &[
            "token",
            "create",
            "--user",
            "alice@example.com",
            "--scope",
            "requests",
        ],
    ));
    let ask = async |duration: &str| {
        common::http()
            .post(format!("{url}/api/v1/requests"))
            .bearer_auth(alice.trim())
            .json(&serde_json::json!({"resource": "demo-db", "role": "read", "duration": duration, "reason": "reload check"}))
            .send()
            .await
            .unwrap()
    };
    let hup = || {
        let ok = Command::new("kill")
            .args(["-HUP", &child.0.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    assert_eq!(ask("3h").await.status(), reqwest::StatusCode::CREATED);

    let text = std::fs::read_to_string(&config).unwrap();
    let shorter = text.replacen("max_duration = \"4h\"", "max_duration = \"2h\"", 1);
    assert_ne!(shorter, text, "the demo's read role lasts 4h at most");
    std::fs::write(&config, &shorter).unwrap();
    hup();
    let line = next_starting("Reloaded: ");
    assert!(line.contains("roles changed: demo-db/read"), "{line}");
    let refused = ask("3h").await;
    assert_eq!(refused.status(), reqwest::StatusCode::UNPROCESSABLE_ENTITY);
    assert!(refused.text().await.unwrap().contains("2h"));

    std::fs::write(
        &config,
        shorter.replacen("max_duration = \"2h\"", "max_duration = \"two hours\"", 1),
    )
    .unwrap();
    hup();
    let line = next_starting("Reload refused, nothing changed: ");
    assert!(line.contains("max_duration"), "{line}");
    assert_eq!(ask("1h").await.status(), reqwest::StatusCode::CREATED);
    assert_eq!(
        ask("3h").await.status(),
        reqwest::StatusCode::UNPROCESSABLE_ENTITY
    );
}
