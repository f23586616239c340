//! The PostgreSQL relay against a real PostgreSQL cluster and real clients (psql,
//! pgbench, sqlx): TLS on both sides (the relay's own certificate pinned by the client,
//! the target verified with verify-full), the relay password checked with SCRAM, the
//! upstream login as the grant's own role made by twokey's README-made non-superuser
//! admin, the whole protocol relayed, every refusal told in one line, the transcript
//! hashed into the audit chain, and the cut at revocation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::postgres::{self, Version};
use common::psql::{self as client, eventually, ok, refused};
use common::webdriver::Browser;
use reqwest::StatusCode;
use serde_json::json;

use common::relay_pg::{ALICE, BOB, Setup, granted, relay_password, setup, setup_on, setup_with};

/// The details of every `relay.refused` event.
async fn refusals(s: &Setup) -> Vec<serde_json::Value> {
    twokey::audit::recent(&s.app.state().db, None, 500)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.action == "relay.refused")
        .map(|e| serde_json::from_str(&e.details).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_runs_as_the_grants_role_and_its_transcript_is_hashed_into_the_audit() {
    a_query_runs_and_is_transcribed(Version::Pg15).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_on_postgresql_17() {
    a_query_runs_and_is_transcribed(Version::Pg17).await
}

async fn a_query_runs_and_is_transcribed(version: Version) {
    let s = setup_on(version, |_| {}).await;
    let id = granted(&s.app).await;
    let pw = relay_password(&s.app, &id).await;
    let out = s
        .psql(
            &pw,
            "select current_user, count(*) from items; select name from items order by id",
        )
        .await;
    let text = ok(&out);
    let mut lines = text.lines();
    let first = lines.next().unwrap();
    assert!(
        first.starts_with("twokey_") && first.ends_with("|3"),
        "{text}"
    );
    assert_eq!(lines.collect::<Vec<_>>(), ["a", "b", "c"]);
    // The engineer never held the target's login: the role's password is not theirs.
    let role = first.split('|').next().unwrap().to_string();
    let direct = s.cluster.psql(&role, &pw, "app", "select 1");
    assert!(!direct.status.success());

    eventually("the session to close", async || {
        s.sessions().await.iter().any(|x| x.ended_at.is_some())
    })
    .await;
    let sessions = s.sessions().await;
    assert_eq!(sessions.len(), 1);
    let row = &sessions[0];
    assert_eq!(row.protocol, "postgres");
    assert_eq!(row.end_reason.as_deref(), Some("closed"));
    let (header, entries) =
        twokey::recording::transcript::read(std::path::Path::new(&row.recording)).unwrap();
    assert_eq!(header.user, ALICE);
    assert_eq!(header.database, "app");
    let statements: Vec<_> = entries
        .iter()
        .filter_map(|e| match e {
            twokey::recording::transcript::Entry::Statement(st) => Some(st),
            _ => None,
        })
        .collect();
    assert_eq!(statements.len(), 2, "{entries:?}");
    assert_eq!(statements[0].tag.as_deref(), Some("SELECT 1"));
    assert_eq!(statements[1].rows.len(), 3);
    assert_eq!(statements[1].rows[2], [Some("c".to_string())]);
    let (bytes, sha) = twokey::recording::hash_file(std::path::Path::new(&row.recording)).unwrap();
    assert_eq!(row.recording_sha256.as_deref(), Some(sha.as_str()));
    let events = twokey::audit::recent(&s.app.state().db, None, 100)
        .await
        .unwrap();
    let details = |e: &twokey::audit::AuditEvent| -> serde_json::Value {
        serde_json::from_str(&e.details).unwrap()
    };
    let ended = events.iter().find(|e| e.action == "session.ended").unwrap();
    let ended = details(ended);
    assert_eq!(ended["sha256"], sha);
    assert_eq!(ended["bytes"], bytes);
    assert!(
        events
            .iter()
            .any(|e| e.action == "session.started" && details(e)["protocol"] == "postgres")
    );
    // The holder reads it on the session's page, its hash checked against the audit.
    let browser = s.app.browser(ALICE).await;
    let (st, html) = browser.get(&format!("/sessions/{}", row.id)).await;
    assert_eq!(st, StatusCode::OK);
    assert!(
        html.contains("select name from items order by id"),
        "{html}"
    );
    assert!(html.contains("SELECT 3"), "{html}");
    let (st, list) = browser.get("/sessions").await;
    assert_eq!(st, StatusCode::OK);
    assert!(
        list.contains("PostgreSQL") && list.contains(&row.id),
        "{list}"
    );
    s.app.assert_chain_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_told_in_one_line_and_nothing_reaches_the_target() {
    let s = setup().await;
    // No grant, no relay password.
    let out = s.psql("not-a-password", "select 1").await;
    let err = refused(&out);
    assert!(
        err.contains("password authentication failed") && err.contains("twokey db-login demo-db"),
        "{err}"
    );
    let id = granted(&s.app).await;
    let pw = relay_password(&s.app, &id).await;
    // A wrong password; the target's real admin password; another user's name.
    for (user, password) in [
        (ALICE, "wrong-password"),
        (ALICE, postgres::TWOKEY_ADMIN_PASSWORD),
        (postgres::TWOKEY_ADMIN, postgres::TWOKEY_ADMIN_PASSWORD),
        (BOB, pw.as_str()),
    ] {
        let out = s
            .psql_as(user, "demo-db", "verify-full", password, "select 1")
            .await;
        assert!(
            refused(&out).contains("password authentication failed"),
            "{user}"
        );
    }
    // Each (user, resource, address, reason) is audited at most once a minute: alice's
    // three wrong passwords on demo-db, seconds apart, are one event.
    let wrong_for_alice = refusals(&s)
        .await
        .iter()
        .filter(|d| d["user"] == ALICE && d["reason"] == "password authentication failed")
        .count();
    assert_eq!(wrong_for_alice, 1);
    // Another resource: not a database behind the relay.
    let out = s
        .psql_as(ALICE, "demo-ssh", "verify-full", &pw, "select 1")
        .await;
    assert!(refused(&out).contains("password authentication failed"));
    // Plaintext, when TLS is required.
    let out = s
        .psql_as(ALICE, "demo-db", "disable", &pw, "select 1")
        .await;
    let err = refused(&out);
    assert!(
        err.contains("requires TLS") && err.contains("sslmode=verify-full"),
        "{err}"
    );
    // A client that does not trust the relay's certificate for this name stops itself.
    let out = client::output(client::command(
        &s.conninfo(ALICE, "demo-db", "verify-full")
            .replace("host=127.0.0.1", "host=relay.invalid hostaddr=127.0.0.1"),
        &pw,
        &["-c", "select 1"],
    ))
    .await;
    assert!(refused(&out).contains("certificate"), "the name is checked");
    // Nothing was relayed, no session opened, and only the grant's first login made.
    assert!(s.sessions().await.is_empty());
    assert!(
        s.cluster.twokey_roles().is_empty(),
        "no login made for refusals"
    );
    // Revoked: the right password is told why, and nothing is relayed.
    ok(&s.psql(&pw, "select 1").await);
    let (st, _) = s.app.api(BOB).await.act(&id, "revoke").await;
    assert_eq!(st, StatusCode::OK);
    let err = refused(&s.psql(&pw, "select 1").await);
    assert!(err.contains("was revoked"), "{err}");
    // Expired: a new grant, the clock moved past its end.
    let id = granted(&s.app).await;
    let pw = relay_password(&s.app, &id).await;
    s.app.clock.advance(chrono::Duration::hours(2));
    let err = refused(&s.psql(&pw, "select 1").await);
    assert!(
        err.contains("password authentication failed") || err.contains("has ended"),
        "{err}"
    );
    let refusals = refusals(&s).await;
    for reason in ["the relay requires TLS", "was revoked"] {
        assert!(
            refusals
                .iter()
                .any(|d| d["reason"].as_str().unwrap().contains(reason)),
            "{reason}: {refusals:?}"
        );
    }
    assert!(refusals.iter().any(|d| d["user"] == BOB), "{refusals:?}");
    s.app.assert_chain_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_cuts_a_running_query_within_a_second_and_leaves_no_backend() {
    let s = setup().await;
    let id = granted(&s.app).await;
    let pw = relay_password(&s.app, &id).await;
    let child = s
        .psql_cmd(&pw, &["-c", "select pg_sleep(30)"])
        .spawn()
        .unwrap();
    eventually("the query to run", async || {
        s.cluster
            .admin("postgres", "select count(*) from pg_stat_activity where usename like 'twokey\\_%' and query like '%pg_sleep%'")
            == "1"
    })
    .await;
    let (st, _) = s.app.api(BOB).await.act(&id, "revoke").await;
    assert_eq!(st, StatusCode::OK);
    let cut_at = Instant::now();
    let out = client::wait(child).await;
    let took = cut_at.elapsed();
    eprintln!("revocation to psql's exit: {took:?}");
    let err = refused(&out);
    assert!(err.contains("terminating connection: grant ended"), "{err}");
    assert!(took < Duration::from_secs(1), "cut after {took:?}");
    eventually("no backend left for the role", async || {
        s.cluster.admin(
            "postgres",
            "select count(*) from pg_stat_activity where usename like 'twokey\\_%'",
        ) == "0"
    })
    .await;
    eventually("the session to close", async || {
        s.sessions().await.iter().any(|x| x.ended_at.is_some())
    })
    .await;
    let row = &s.sessions().await[0];
    assert_eq!(row.end_reason.as_deref(), Some("grant ended"), "{row:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_come_through_and_are_transcribed() {
    let s = setup().await;
    let id = granted(&s.app).await;
    let pw = relay_password(&s.app, &id).await;
    let out = s
        .psql(&pw, "listen twokey_ch; notify twokey_ch, 'hello there'")
        .await;
    let text = format!("{}{}", ok(&out), String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("Asynchronous notification \"twokey_ch\" with payload \"hello there\""),
        "{text}"
    );
    eventually("the session to close", async || {
        s.sessions().await.iter().any(|x| x.ended_at.is_some())
    })
    .await;
    let row = &s.sessions().await[0];
    let (_, entries) =
        twokey::recording::transcript::read(std::path::Path::new(&row.recording)).unwrap();
    assert!(
        entries.iter().any(|e| matches!(e,
            twokey::recording::transcript::Entry::Notification { channel, payload, .. }
                if channel == "twokey_ch" && payload == "hello there")),
        "{entries:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_sessions_statements_reach_its_transcript_while_it_stays_open() {
    let s = setup().await;
    let id = granted(&s.app).await;
    let pw = relay_password(&s.app, &id).await;
    let opts = s.sqlx(&pw);
    let mut conn = sqlx::ConnectOptions::connect(&opts).await.unwrap();
    let v: String = sqlx::query_scalar("select 'still open'::text")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(v, "still open");
    // Nothing more is sent: the statement is written out by the relay's own clock
    // (at most a second later), not left in memory until the session ends.
    eventually(
        "the statement in the live session's transcript",
        async || {
            let rows = s.sessions().await;
            assert!(rows[0].ended_at.is_none(), "the session is still open");
            std::fs::read_to_string(&rows[0].recording)
                .is_ok_and(|t| t.contains("select 'still open'::text"))
        },
    )
    .await;
    let row = &s.sessions().await[0];
    let (_, entries) =
        twokey::recording::transcript::read(std::path::Path::new(&row.recording)).unwrap();
    assert!(
        entries.iter().any(|e| matches!(e,
            twokey::recording::transcript::Entry::Statement(st)
                if st.sql == "select 'still open'::text" && st.row_count == 1)),
        "{entries:?}"
    );
    sqlx::Connection::close(conn).await.unwrap();
    eventually("the session to close", async || {
        s.sessions().await[0].ended_at.is_some()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_only_its_own_backend() {
    let s = setup().await;
    let id = granted(&s.app).await;
    let pw = relay_password(&s.app, &id).await;
    let child = s
        .psql_cmd(&pw, &["-c", "select pg_sleep(30)"])
        .spawn()
        .unwrap();
    let running = "select count(*) from pg_stat_activity where usename like 'twokey\\_%' and state = 'active' and query like '%pg_sleep%'";
    eventually("the query to run", async || {
        s.cluster.admin("postgres", running) == "1"
    })
    .await;
    // Forged cancels (guessed keys; the target's own key) cancel nothing.
    let backend: Vec<i32> = s
        .cluster
        .admin(
            "postgres",
            "select pid from pg_stat_activity where usename like 'twokey\\_%'",
        )
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    for pid in [1, 12345, backend[0]] {
        let mut t = tokio::net::TcpStream::connect(s.pg).await.unwrap();
        let mut m = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
        m.extend_from_slice(&pid.to_be_bytes());
        m.extend_from_slice(&[1, 2, 3, 4]);
        tokio::io::AsyncWriteExt::write_all(&mut t, &m)
            .await
            .unwrap();
        let mut b = [0u8; 1];
        let _ = tokio::io::AsyncReadExt::read(&mut t, &mut b).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.cluster.admin("postgres", running), "1", "still running");
    // psql's own cancel (Ctrl-C) goes through the relay's key.
    let pid = child.id() as i32;
    Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    let out = client::wait(child).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("canceling statement due to user request"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_and_pipelines_run_through_with_a_driver_and_pgbench() {
    let s = setup().await;
    let id = granted(&s.app).await;
    let pw = relay_password(&s.app, &id).await;
    // sqlx: one prepared statement, reused 1,000 times.
    let opts = s.sqlx(&pw);
    let mut conn = sqlx::ConnectOptions::connect(&opts).await.unwrap();
    let mut sum = 0i64;
    for i in 0..1000i32 {
        let v: i32 = sqlx::query_scalar("select $1::int + (select count(*)::int from items)")
            .bind(i)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        sum += i64::from(v);
    }
    assert_eq!(sum, (0..1000).map(|i| i + 3).sum::<i64>());
    sqlx::Connection::close(conn).await.unwrap();
    // pgbench: a pipeline of prepared statements.
    let script = s.files.path().join("pipeline.sql");
    std::fs::write(
        &script,
        "\\startpipeline\nselect count(*) from items;\nselect 1;\nselect name from items where id = 2;\n\\endpipeline\n",
    )
    .unwrap();
    let mut c = Command::new("pgbench");
    c.args(["-n", "-M", "prepared", "-t", "200", "-c", "2", "-f"])
        .arg(&script)
        .arg(s.conninfo(ALICE, "demo-db", "verify-full"))
        .env("PGPASSWORD", &pw);
    let out = client::output(c).await;
    let text = ok(&out);
    assert!(
        text.contains("number of transactions actually processed: 400/400"),
        "{text}"
    );
    eventually("the sessions to close", async || {
        let all = s.sessions().await;
        // sqlx's, pgbench's two clients and its first look at the server.
        all.len() >= 3 && all.iter().all(|x| x.ended_at.is_some())
    })
    .await;
    // The driver's session: 1,000 executions of one statement, each with its parameter;
    // pgbench's: every statement of every pipeline.
    let mut runs = Vec::new();
    let mut piped = 0;
    for x in s.sessions().await {
        let (_, entries) =
            twokey::recording::transcript::read(std::path::Path::new(&x.recording)).unwrap();
        for e in entries {
            if let twokey::recording::transcript::Entry::Statement(st) = e {
                if st.sql.contains("$1::int") {
                    runs.push(st);
                } else if st.sql.contains("where id = 2") {
                    assert_eq!(st.rows, [[Some("b".to_string())]]);
                    piped += 1;
                }
            }
        }
    }
    assert_eq!(piped, 400);
    assert_eq!(runs.len(), 1000);
    assert_eq!(runs[999].params, [Some("999".to_string())]);
    assert_eq!(
        runs[999].rows,
        [[Some("1002".to_string())]],
        "{:?}",
        runs[999]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_of_a_hundred_megabytes_goes_in_and_out_intact() {
    let s = setup_with(|c| {
        let db = c
            .resources
            .iter_mut()
            .find(|r| r.name == "demo-db")
            .unwrap();
        db.roles[0].db_grants = vec!["GRANT CREATE ON SCHEMA public TO {role}".into()];
    })
    .await;
    let id = granted(&s.app).await;
    let pw = relay_password(&s.app, &id).await;
    let data = s.files.path().join("in.tsv");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&data).unwrap());
        let filler = "x".repeat(90);
        let mut n = 0u64;
        let mut i = 0u64;
        while n < 100 << 20 {
            let line = format!("{i}\t{filler}{i}\n");
            n += line.len() as u64;
            f.write_all(line.as_bytes()).unwrap();
            i += 1;
        }
    }
    let out_file = s.files.path().join("out.tsv");
    let sql = format!(
        "create table bulk (id bigint, v text); \\copy bulk from '{}'\n\\copy (select * from bulk order by id) to '{}'",
        data.display(),
        out_file.display()
    );
    let mut c = s.psql_cmd(&pw, &[]);
    c.stdin(Stdio::piped());
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = c.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(sql.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    ok(&out);
    let a = twokey::recording::hash_file(&data).unwrap();
    let b = twokey::recording::hash_file(&out_file).unwrap();
    assert_eq!(a, b, "what came out is what went in");
    assert!(a.0 >= 100 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_million_rows_stream_through_in_bounded_memory() {
    let s = setup().await;
    let id = granted(&s.app).await;
    let pw = relay_password(&s.app, &id).await;
    let rss = || -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    let before = rss();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(rss(), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // COPY out would stream anyway; this is a plain result of 10M rows, which psql
    // itself reads with a cursor (FETCH_COUNT) so that only the relay is measured.
    let c = s.psql_cmd(
        &pw,
        &[
            "-v",
            "FETCH_COUNT=100000",
            "-c",
            "select g, 'row ' || g from generate_series(1, 10000000) g",
            "-o",
            "/dev/null",
        ],
    );
    let out = client::output(c).await;
    ok(&out);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    let grew = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(before);
    // About 180 MB crossed the relay; it held at most a few buffers of it.
    assert!(grew < 48 << 20, "the relay grew by {} MiB", grew >> 20);
    eventually("the session to close", async || {
        s.sessions().await.iter().any(|x| x.ended_at.is_some())
    })
    .await;
    let row = &s.sessions().await[0];
    assert!(row.bytes_out > 150 << 20, "{}", row.bytes_out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twokey_psql_goes_through_the_relay_in_one_step() {
    let s = setup().await;
    let cli = client::Cli::new();
    let token = twokey::auth::create_api_token(s.app.state(), ALICE, "t")
        .await
        .unwrap();
    let login = ["login", "--server", &s.app.server.url(), "--token-stdin"];
    ok(&cli.run(&login, Some(format!("{token}\n"))).await);
    granted(&s.app).await;
    let args = [
        "psql",
        "demo-db",
        "--",
        "-tA",
        "-c",
        "select current_user, count(*) from items",
    ];
    let out = cli.run(&args, None).await;
    let text = ok(&out);
    assert!(
        text.starts_with("twokey_") && text.ends_with("|3"),
        "{text}"
    );
    let sessions = s.sessions().await;
    assert_eq!(sessions.len(), 1, "through the relay, recorded");
    assert_eq!(sessions[0].protocol, "postgres");
}

/// A connection to the relay that it admitted: asked for GSSAPI encryption, it
/// answered 'N' (one turned away gets a FATAL instead).
async fn admitted(pg: SocketAddr) -> Option<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut t = tokio::net::TcpStream::connect(pg).await.unwrap();
    t.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30])
        .await
        .unwrap();
    let mut a = [0u8; 1];
    (t.read_exact(&mut a).await.is_ok() && &a == b"N").then_some(t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_and_bad_input_gets_an_error_not_a_crash() {
    let s = setup_with(|c| {
        let r = c.relay.as_mut().unwrap();
        r.max_connections_per_ip = 2;
        r.login_grace_time = Duration::from_secs(1);
        r.idle_timeout = Duration::from_secs(1);
        r.postgres.as_mut().unwrap().max_message_bytes = 64 << 10;
    })
    .await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A peer that connects and says nothing is closed after the login grace time.
    let mut silent = tokio::net::TcpStream::connect(s.pg).await.unwrap();
    let mut b = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut b))
        .await
        .expect("closed by the relay");
    assert_eq!(n.unwrap(), 0);
    // GSSAPI encryption is declined ('N'), and the client may go on to TLS.
    let mut g = tokio::net::TcpStream::connect(s.pg).await.unwrap();
    g.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30])
        .await
        .unwrap();
    let mut answer = [0u8; 1];
    g.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"N");
    g.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    g.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"S", "then SSLRequest is accepted");
    drop(g);
    eventually("the slot to be given back", async || {
        let mut t = tokio::net::TcpStream::connect(s.pg).await.unwrap();
        t.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30])
            .await
            .unwrap();
        let mut a = [0u8; 1];
        t.read_exact(&mut a).await.is_ok() && &a == b"N"
    })
    .await;
    // Two open connections from one address; the third is told why. The two are
    // checked to be admitted (answered, not turned away): a connection's slot is given
    // back only once the relay has seen it close, so the probe's just above may still
    // be held, and a third admitted in its place once it goes.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (_a, _b) = loop {
        if let (Some(a), Some(b)) = (admitted(s.pg).await, admitted(s.pg).await) {
            break (a, b);
        }
        assert!(
            Instant::now() < deadline,
            "two connections were never admitted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut c = tokio::net::TcpStream::connect(s.pg).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("53300") && text.contains("too many connections from your address"),
        "{text}"
    );
    drop((_a, _b));
    // Malformed startup packets: closed, and the relay serves on.
    for bad in [
        &[0u8, 0, 0, 3][..],
        &[0, 0, 0x7f, 0xff, 0, 3, 0, 0],
        &[0, 0, 0, 9, 0, 3, 0, 0, 0xff],
    ] {
        eventually("a slot", async || {
            tokio::net::TcpStream::connect(s.pg).await.is_ok()
        })
        .await;
        let mut t = tokio::net::TcpStream::connect(s.pg).await.unwrap();
        t.write_all(bad).await.unwrap();
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), t.read_to_end(&mut sink)).await;
    }
    let id = granted(&s.app).await;
    let pw = relay_password(&s.app, &id).await;
    ok(&s.psql(&pw, "select 1").await);
    // A statement over the message bound ends the session with an error.
    let long = format!("select '{}'", "x".repeat(100_000));
    let err = refused(&s.psql(&pw, &long).await);
    assert!(
        err.contains("connection") || err.contains("closed"),
        "{err}"
    );
    // A session with nothing going on is closed after the idle timeout.
    let opts = s.sqlx(&pw);
    // The two sessions above hold their slots until the relay has closed them (their
    // records written): with two per address, wait for that, then connect (once more,
    // should a slot still be on its way back).
    eventually("the sessions so far to close", async || {
        let all = s.sessions().await;
        all.len() == 2 && all.iter().all(|x| x.ended_at.is_some())
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let _idle: sqlx::PgConnection = loop {
        match sqlx::ConnectOptions::connect(&opts).await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("the idle session's connect, retried: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the idle session could not connect: {e}"),
        }
    };
    eventually("the idle session to be closed", async || {
        s.sessions()
            .await
            .iter()
            .any(|x| x.end_reason.as_deref() == Some("idle for 1s"))
    })
    .await;
    let reasons: Vec<Option<String>> = s
        .sessions()
        .await
        .into_iter()
        .map(|x| x.end_reason)
        .collect();
    assert!(
        reasons.iter().any(|r| r
            .as_deref()
            .is_some_and(|r| r.contains("over the relay's bound"))),
        "{reasons:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_administrator_ends_a_live_database_session_from_its_page() {
    let s = setup().await;
    let id = granted(&s.app).await;
    let pw = relay_password(&s.app, &id).await;
    let child = s
        .psql_cmd(&pw, &["-c", "select pg_sleep(30)"])
        .spawn()
        .unwrap();
    eventually("the session to open", async || {
        !s.sessions().await.is_empty()
    })
    .await;
    let live = s.sessions().await[0].id.clone();
    let dave = s.app.browser("dave@example.com").await;
    let (_, page) = dave.get(&format!("/sessions/{live}")).await;
    assert!(page.contains("id=\"terminate\""), "{page}");
    let alice = s.app.browser(ALICE).await;
    let (_, apage) = alice.get(&format!("/sessions/{live}")).await;
    assert!(!apage.contains("id=\"terminate\""), "not for the holder");
    let csrf = common::csrf_in(&page).unwrap();
    let resp = dave
        .post(
            &format!("/sessions/{live}/terminate"),
            &[("csrf", csrf.as_str())],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let out = client::wait(child).await;
    let err = refused(&out);
    assert!(
        err.contains("terminating connection: terminated by an administrator"),
        "{err}"
    );
    eventually("the session to close", async || {
        s.sessions().await[0].ended_at.is_some()
    })
    .await;
    let actions = s.app.audit_actions().await;
    assert!(
        actions.iter().any(|a| a == "session.terminated"),
        "{actions:?}"
    );
}

/// "End this session now", clicked in Chromium by an admin on a live PostgreSQL
/// session's page: the running query's psql is cut with FATAL 57P01 and the reason, the
/// upstream backend goes, the page shows the session ended and why (no button left), and
/// the audit has who ended it and the session's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_administrator_ends_a_live_database_session_in_chromium() {
    const DAVE: &str = "dave@example.com";
    let s = setup().await;
    let id = granted(&s.app).await;
    let pw = relay_password(&s.app, &id).await;
    let child = s
        .psql_cmd(
            &pw,
            &["-v", "VERBOSITY=verbose", "-c", "select pg_sleep(30)"],
        )
        .spawn()
        .unwrap();
    let running = "select count(*) from pg_stat_activity where usename like 'twokey\\_%' and state = 'active' and query like '%pg_sleep%'";
    eventually("the query to run", async || {
        s.cluster.admin("postgres", running) == "1"
    })
    .await;
    let sessions = s.sessions().await;
    assert_eq!(sessions.len(), 1);
    let live = sessions[0].id.clone();

    let b = Browser::start().await;
    b.goto(&s.app.url("/login")).await;
    b.click_and_wait(&format!("button[id='login-{DAVE}']"))
        .await;
    b.goto(&s.app.url(&format!("/sessions/{live}"))).await;
    assert_eq!(b.text("#session-state").await, "live");
    b.click_and_wait("button[id='terminate']").await;
    // Back on the session's page, which already shows it ended and why: the button
    // waits for the session to close.
    assert!(
        b.url().await.ends_with(&format!("/sessions/{live}")),
        "{}",
        b.url().await
    );
    let state = b.text("#session-state").await;
    assert!(
        state.starts_with("ended: terminated by an administrator after "),
        "{state}"
    );
    assert!(!b.exists("button[id='terminate']").await);

    let err = refused(&client::wait(child).await);
    assert!(
        err.contains("FATAL:  57P01: terminating connection: terminated by an administrator"),
        "{err}"
    );
    eventually("no backend left for the role", async || {
        s.cluster.admin(
            "postgres",
            "select count(*) from pg_stat_activity where usename like 'twokey\\_%'",
        ) == "0"
    })
    .await;
    eventually("the session to close", async || {
        s.sessions().await[0].ended_at.is_some()
    })
    .await;
    let row = &s.sessions().await[0];
    assert_eq!(
        row.end_reason.as_deref(),
        Some("terminated by an administrator")
    );

    // The page, loaded again, says it ended and why; the button is gone.
    b.goto(&s.app.url(&format!("/sessions/{live}"))).await;
    let state = b.text("#session-state").await;
    assert!(
        state.starts_with("ended: terminated by an administrator after "),
        "{state}"
    );
    assert!(!b.exists("button[id='terminate']").await);
    b.quit().await;

    let events = twokey::audit::recent(&s.app.state().db, None, 500)
        .await
        .unwrap();
    let of = |action: &str| -> Vec<serde_json::Value> {
        events
            .iter()
            .filter(|e| e.action == action)
            .map(|e| serde_json::from_str(&e.details).unwrap())
            .collect()
    };
    let terminated = of("session.terminated");
    assert_eq!(terminated.len(), 1, "{terminated:?}");
    assert_eq!(terminated[0]["session_id"], live.as_str());
    assert_eq!(terminated[0]["by"]["email"], DAVE);
    let ended = of("session.ended");
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0]["session_id"], live.as_str());
    assert_eq!(ended[0]["reason"], "terminated by an administrator");
    assert_eq!(ended[0]["sha256"].as_str(), row.recording_sha256.as_deref());
    s.app.assert_chain_ok().await;
}

/// The details of every `action` event, oldest first.
async fn events_of(s: &Setup, action: &str) -> Vec<serde_json::Value> {
    let mut events = twokey::audit::recent(&s.app.state().db, None, 500)
        .await
        .unwrap();
    events.sort_by_key(|e| e.seq);
    events
        .iter()
        .filter(|e| e.action == action)
        .map(|e| serde_json::from_str(&e.details).unwrap())
        .collect()
}

/// The relay's upstream login is made by the same sequence as a direct login, and its
/// record says the relay made it: one `db_role.created` with `"by": "relay"` (a second
/// session uses the login the relay holds and makes no other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_upstream_login_is_audited_as_made_by_the_relay() {
    let s = setup().await;
    let id = granted(&s.app).await;
    let pw = relay_password(&s.app, &id).await;
    let role = ok(&s.psql(&pw, "select current_user").await);
    assert_eq!(ok(&s.psql(&pw, "select current_user").await), role);
    assert_eq!(s.cluster.twokey_roles(), std::slice::from_ref(&role));
    let created = events_of(&s, "db_role.created").await;
    assert_eq!(created.len(), 1, "{created:?}");
    let d = &created[0];
    assert_eq!(d["by"], "relay", "{d}");
    assert_eq!(d["role"], role.as_str());
    assert_eq!(d["resource"], "demo-db");
    assert_eq!(d["db_roles"], json!(["readonly"]));
    assert!(d.get("request_id").is_none(), "{d}");
    assert!(d["valid_until"].is_string() && d["connection_limit"].is_number());
    assert!(events_of(&s, "db_credentials.issued").await.is_empty());
    assert!(events_of(&s, "db_credentials.failed").await.is_empty());
    s.app.assert_chain_ok().await;
}

/// A target that refuses the role's grant statement: the engineer is told why in the
/// FATAL message, nothing is left on the target, and the failure is audited as the
/// relay's (`"by": "relay"`, the target's error, no password).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_refusing_the_relays_upstream_login_is_told_and_audited() {
    let s = setup_with(|c| {
        let db = c
            .resources
            .iter_mut()
            .find(|r| r.name == "demo-db")
            .unwrap();
        // CREATE ROLE succeeds, then this fails: nothing may stay.
        db.roles[0].db_grants = vec!["GRANT SELECT ON no_such_table TO {role}".into()];
    })
    .await;
    let id = granted(&s.app).await;
    let pw = relay_password(&s.app, &id).await;
    let err = refused(&s.psql(&pw, "select 1").await);
    assert!(
        err.contains("twokey could not make your login on the target")
            && err.contains("no_such_table"),
        "{err}"
    );
    assert!(
        s.cluster.twokey_roles().is_empty(),
        "{:?}",
        s.cluster.twokey_roles()
    );
    let failed = events_of(&s, "db_credentials.failed").await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    let d = &failed[0];
    assert_eq!(d["by"], "relay", "{d}");
    assert!(d["role"].as_str().unwrap().starts_with("twokey_"), "{d}");
    assert!(
        d["error"].as_str().unwrap().contains("no_such_table"),
        "{d}"
    );
    assert!(d.get("request_id").is_none(), "{d}");
    assert!(!d.to_string().contains(&pw), "no password in the audit");
    assert!(events_of(&s, "db_role.created").await.is_empty());
    s.app.assert_chain_ok().await;
}
