//! The PostgreSQL relay against a direct connection and PgBouncer (session mode) in
//! front of the same throwaway PostgreSQL 15 cluster, in one run on this machine:
//! pgbench tps for `-S`, `-S -M prepared` and TPC-B at 16 clients (default 10 s each,
//! `TWOKEY_BENCH_SECS`) at scale 20 (`TWOKEY_BENCH_SCALE`: pgbench's own guidance is a
//! scale above the client count, else TPC-B measures contention on its few branch
//! rows, and so how long each round trip holds their locks, more than the path); the latency of `select 1` over one connection (p50/p99); the
//! relay's memory with idle connections open (default 500, `TWOKEY_BENCH_IDLE`).
//!
//! Every leg is TLS from the client: direct (`sslmode=verify-full`, the cluster's CA),
//! PgBouncer (client TLS with the cluster's certificate, server TLS verify-full), the
//! relay (its own certificate pinned by the client, verify-full to the cluster).
//!
//! `cargo bench --bench pg_relay` (or `benches/run.sh`). Prints figures and ratios;
//! asserts nothing about time. Must never touch a cluster it did not start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/postgres.rs"]
mod postgres;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use tokio::net::TcpListener;
use twokey::clock::SystemClock;
use twokey::config::{Config, RelayConfig, RelayPostgresConfig, demo_config_toml};

const ALICE: &str = "alice@example.com";
/// The plain role direct and PgBouncer log in as (the relay logs in as the grant's).
const BENCH_ROLE: &str = "bench";
const BENCH_PASSWORD: &str = "bench-pw";
const TABLES: &str = "pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history";
/// The child mode: open this many connections with the options in the other
/// variables, say so on stdout, hold them until stdin closes.
const CHILD: &str = "TWOKEY_BENCH_PG_IDLE_CHILD";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().unwrap().stdout == b"0\n"
}

/// Runs a command to success; its stdout.
fn run(c: &mut Command) -> String {
    let out = c.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{c:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A leg: a libpq connection string and its password.
struct Leg {
    name: &'static str,
    conninfo: String,
    password: String,
    /// The same, for sqlx.
    opts: PgConnectOptions,
}

/// `pgbench -n -c 16 -j 2 -T secs` with `args` on a leg: its tps (without the initial
/// connection time).
fn pgbench(leg: &Leg, args: &[&str], secs: u64) -> f64 {
    let out = run(Command::new("pgbench")
        .args(["-n", "-c", "16", "-j", "2", "-T", &secs.to_string()])
        .args(args)
        .arg(&leg.conninfo)
        .env("PGPASSWORD", &leg.password));
    out.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench's output:\n{out}"))
}

/// A process's CPU time so far (user and system), in milliseconds.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    let tick: f64 = run(Command::new("getconf").arg("CLK_TCK"))
        .trim()
        .parse()
        .unwrap();
    (f[11] + f[12]) * 1000.0 / tick
}

/// `select 1` over one connection, `n` times after a warm-up: the sorted round trips.
async fn round_trips(opts: &PgConnectOptions, n: usize) -> Vec<Duration> {
    let mut conn = sqlx::ConnectOptions::connect(opts).await.unwrap();
    let mut out = Vec::with_capacity(n);
    for i in 0..n + 500 {
        let t = Instant::now();
        let v: i32 = sqlx::query_scalar("select 1")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(v, 1);
        if i >= 500 {
            out.push(t.elapsed());
        }
    }
    sqlx::Connection::close(conn).await.unwrap();
    out.sort();
    out
}

fn pct_us(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// Established TCP connections to a local port (from /proc/net/tcp).
fn count_established(port: u16) -> usize {
    let hex = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&hex) && f[3] == "01"
        })
        .count()
}

/// The child: opens the idle connections through the relay (in its own process, so
/// the bench's RSS is the relay's), then holds them until its stdin closes.
async fn child(n: usize) {
    let port: u16 = env_or("TWOKEY_BENCH_PG_PORT", 0);
    let opts = PgConnectOptions::new()
        .host("127.0.0.1")
        .port(port)
        .database("demo-db")
        .username(ALICE)
        .password(&std::env::var("TWOKEY_BENCH_PG_PASSWORD").unwrap())
        .ssl_mode(PgSslMode::VerifyFull)
        .ssl_root_cert(std::env::var("TWOKEY_BENCH_PG_CERT").unwrap());
    let mut conns = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(25) {
        let mut set = tokio::task::JoinSet::new();
        for _ in chunk {
            let o = opts.clone();
            set.spawn(async move { sqlx::ConnectOptions::connect(&o).await.unwrap() });
        }
        while let Some(c) = set.join_next().await {
            conns.push(c.unwrap());
        }
    }
    println!("open {}", conns.len());
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    drop(conns);
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    if let Ok(n) = std::env::var(CHILD) {
        child(n.parse().unwrap()).await;
        return;
    }
    let secs: u64 = env_or("TWOKEY_BENCH_SECS", 10);
    let scale: u32 = env_or("TWOKEY_BENCH_SCALE", 20);
    let idle: usize = env_or("TWOKEY_BENCH_IDLE", 500);
    let dir = tempfile::tempdir().unwrap();

    // The cluster: TLS only, room for the idle connections, no statement log (the
    // test helper logs every statement; that would weigh on every leg).
    let cluster = postgres::Cluster::start_with(postgres::Version::Pg15, true);
    cluster.admin(
        "postgres",
        &format!("ALTER SYSTEM SET max_connections = {}", idle + 200),
    );
    cluster.admin("postgres", "ALTER SYSTEM SET log_statement = 'none'");
    cluster.restart();
    let direct_base = format!(
        "host=127.0.0.1 port={} dbname=app sslmode=verify-full sslrootcert={} connect_timeout=10",
        cluster.port,
        cluster.ca_file().display()
    );
    println!(
        "pgbench -i -s {scale} on PostgreSQL {}",
        cluster.admin("postgres", "SHOW server_version")
    );
    run(Command::new("pgbench")
        .args(["-i", "-s", &scale.to_string(), "-q"])
        .arg(format!("{direct_base} user=postgres"))
        .env("PGPASSWORD", postgres::ADMIN_PASSWORD));
    cluster.admin(
        "postgres",
        &format!("CREATE ROLE {BENCH_ROLE} LOGIN PASSWORD '{BENCH_PASSWORD}'"),
    );
    // What pgbench needs, to the plain role and (grantable) to twokey's admin, which
    // passes it on to each grant's role through db_grants.
    cluster.admin(
        "app",
        &format!(
            "GRANT SELECT, INSERT, UPDATE ON {TABLES} TO {BENCH_ROLE};
             GRANT SELECT, INSERT, UPDATE ON {TABLES} TO {} WITH GRANT OPTION;",
            postgres::TWOKEY_ADMIN
        ),
    );

    // twokey with the PostgreSQL relay in front of the cluster.
    let admin_pw = dir.path().join("pg-admin-password");
    std::fs::write(&admin_pw, format!("{}\n", postgres::TWOKEY_ADMIN_PASSWORD)).unwrap();
    let mut config = Config::parse(&demo_config_toml("127.0.0.1:0", dir.path()), "bench").unwrap();
    config.server.sweep_interval = Duration::ZERO;
    config.relay = Some(RelayConfig {
        listen: "127.0.0.1:0".into(),
        max_connections: idle + 100,
        // Every client here is on 127.0.0.1.
        max_connections_per_ip: idle + 100,
        postgres: Some(RelayPostgresConfig {
            listen: "127.0.0.1:0".into(),
            public_address: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_names: vec![],
            allow_plaintext: false,
            max_message_bytes: twokey::config::DEFAULT_MAX_PG_MESSAGE_BYTES,
        }),
        ..Default::default()
    });
    let db = config
        .resources
        .iter_mut()
        .find(|r| r.name == "demo-db")
        .unwrap();
    db.address = Some(format!("127.0.0.1:{}", cluster.port));
    db.database = Some("app".into());
    db.admin_user = Some(postgres::TWOKEY_ADMIN.into());
    db.admin_password_file = Some(admin_pw);
    db.tls = None;
    db.tls_ca_file = Some(cluster.ca_file());
    db.reassign_owned_to = None;
    db.access = None;
    let role = &mut db.roles[0];
    role.db_roles = vec![];
    role.db_grants = vec![format!(
        "GRANT SELECT, INSERT, UPDATE ON {TABLES} TO {{role}}"
    )];
    role.connection_limit = (idle + 50) as i32;
    role.min_approvals = 1;
    // Rules of the kind a team writes, so each statement is held to several.
    role.sql = twokey::config::SqlPolicy {
        deny: [
            "DROP",
            "TRUNCATE",
            "ALTER",
            "GRANT",
            "COPY PROGRAM",
            "COPY FILE",
        ]
        .map(String::from)
        .to_vec(),
        deny_tables: vec!["secrets".into(), "audit.*".into()],
        deny_functions: vec!["pg_read_file".into(), "lo_export".into(), "dblink".into()],
        search_path: Some("public".into()),
        ..Default::default()
    };
    config.validate().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = twokey::server::start(config, Arc::new(SystemClock), listener)
        .await
        .unwrap();
    let state = server.state.clone();
    let relay_port = server.relay.as_ref().unwrap().pg_addr.unwrap().port();
    let relay_cert = dir.path().join("relay.pem");
    std::fs::write(&relay_cert, &state.relay_pg.as_ref().unwrap().cert_pem).unwrap();

    // A grant and its relay password, through the API.
    let base = format!("{}/api/v1", server.url());
    let alice = twokey::auth::create_api_token(&state, ALICE, "bench")
        .await
        .unwrap();
    let bob = twokey::auth::create_scoped_token(
        &state,
        "bob@example.com",
        "bench",
        &twokey::auth::scopes::Scopes::all(),
        None,
    )
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let r: serde_json::Value = http
        .post(format!("{base}/requests"))
        .bearer_auth(&alice)
        .json(&json!({"resource": "demo-db", "role": "read", "duration": "1h", "reason": "bench run"}))
        .send().await.unwrap().json().await.unwrap();
    let id = r["id"].as_str().unwrap().to_string();
    let a = http
        .post(format!("{base}/requests/{id}/approve"))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert!(a.status().is_success(), "{}", a.text().await.unwrap());
    let r: serde_json::Value = http
        .post(format!("{base}/requests/{id}/relay-login"))
        .bearer_auth(&alice)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let relay_password = r["password"].as_str().unwrap().to_string();

    // PgBouncer, session mode, as the postgres user (it refuses root), TLS both sides.
    let bouncer_dir = tempfile::tempdir().unwrap();
    let b = bouncer_dir.path();
    for f in ["server.crt", "server.key", "ca.crt"] {
        std::fs::copy(cluster.dir.path().join(f), b.join(f)).unwrap();
    }
    std::fs::write(
        b.join("userlist.txt"),
        format!("\"{BENCH_ROLE}\" \"{BENCH_PASSWORD}\"\n"),
    )
    .unwrap();
    let bouncer_port = postgres::free_port();
    std::fs::write(
        b.join("pgbouncer.ini"),
        format!(
            "[databases]
app = host=127.0.0.1 port={} dbname=app
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {bouncer_port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {d}/userlist.txt
pool_mode = session
; sqlx sends it at startup; PgBouncer refuses what it does not know.
ignore_startup_parameters = extra_float_digits
max_client_conn = 100
default_pool_size = 40
client_tls_sslmode = require
client_tls_cert_file = {d}/server.crt
client_tls_key_file = {d}/server.key
server_tls_sslmode = verify-full
server_tls_ca_file = {d}/ca.crt
logfile = {d}/pgbouncer.log
",
            cluster.port,
            d = b.display()
        ),
    )
    .unwrap();
    let mut bouncer = Command::new("pgbouncer");
    if is_root() {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        let uid: u32 = run(Command::new("id").args(["-u", "postgres"]))
            .trim()
            .parse()
            .unwrap();
        let gid: u32 = run(Command::new("id").args(["-g", "postgres"]))
            .trim()
            .parse()
            .unwrap();
        std::fs::set_permissions(b, std::fs::Permissions::from_mode(0o755)).unwrap();
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(b));
        bouncer.uid(uid).gid(gid);
    }
    let mut bouncer = bouncer
        .arg(b.join("pgbouncer.ini"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pgbouncer (Debian package pgbouncer; ./scripts/test installs it)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", bouncer_port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "pgbouncer did not listen: {}",
            std::fs::read_to_string(b.join("pgbouncer.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let sqlx_direct = |port: u16| {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(port)
            .database("app")
            .username(BENCH_ROLE)
            .password(BENCH_PASSWORD)
    };
    let legs = [
        Leg {
            name: "direct",
            conninfo: format!("{direct_base} user={BENCH_ROLE}"),
            password: BENCH_PASSWORD.into(),
            opts: sqlx_direct(cluster.port)
                .ssl_mode(PgSslMode::VerifyFull)
                .ssl_root_cert(cluster.ca_file()),
        },
        Leg {
            name: "pgbouncer (session)",
            conninfo: format!(
                "host=127.0.0.1 port={bouncer_port} dbname=app user={BENCH_ROLE} sslmode=verify-full sslrootcert={} connect_timeout=10",
                cluster.ca_file().display()
            ),
            password: BENCH_PASSWORD.into(),
            opts: sqlx_direct(bouncer_port)
                .ssl_mode(PgSslMode::VerifyFull)
                .ssl_root_cert(cluster.ca_file()),
        },
        Leg {
            name: "twokey relay",
            conninfo: format!(
                "host=127.0.0.1 port={relay_port} dbname=demo-db user={ALICE} sslmode=verify-full sslrootcert={} connect_timeout=10",
                relay_cert.display()
            ),
            password: relay_password.clone(),
            opts: PgConnectOptions::new()
                .host("127.0.0.1")
                .port(relay_port)
                .database("demo-db")
                .username(ALICE)
                .password(&relay_password)
                .ssl_mode(PgSslMode::VerifyFull)
                .ssl_root_cert(&relay_cert),
        },
    ];
    println!(
        "TLS on every leg: direct verify-full to PostgreSQL; pgbouncer client TLS + server TLS verify-full; relay TLS (its pinned certificate) + verify-full to PostgreSQL"
    );

    // Idle connections first, on a relay that has served one session (what is set up
    // lazily once is not counted): each has done its startup and SCRAM, holds its
    // upstream connection, and sends nothing.
    round_trips(&legs[2].opts, 10).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib();
    let mut holder = Command::new(std::env::current_exe().unwrap())
        .env(CHILD, idle.to_string())
        .env("TWOKEY_BENCH_PG_PORT", relay_port.to_string())
        .env("TWOKEY_BENCH_PG_PASSWORD", &relay_password)
        .env("TWOKEY_BENCH_PG_CERT", &relay_cert)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    let mut out = BufReader::new(holder.stdout.take().unwrap());
    tokio::task::block_in_place(|| out.read_line(&mut said).unwrap());
    assert!(said.starts_with("open "), "the idle child said {said:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib();
    let open = count_established(relay_port);
    let grew = after.saturating_sub(before);
    println!(
        "relay with {open} idle connections: RSS {before} → {after} KiB, +{grew} KiB ({:.1} KiB each; target < 64)",
        grew as f64 / open.max(1) as f64
    );
    drop(holder.stdin.take());
    holder.wait().unwrap();

    // Latency: one connection, `select 1` (prepared by sqlx, so Bind/Execute/Sync).
    let n = env_or("TWOKEY_BENCH_ROUND_TRIPS", 5000);
    let mut lat = Vec::new();
    for leg in &legs {
        let s = round_trips(&leg.opts, n).await;
        let (p50, p99) = (pct_us(&s, 0.5), pct_us(&s, 0.99));
        println!(
            "select 1, one connection, n={n}: {:<20} p50 {p50:>7.1} µs  p99 {p99:>7.1} µs",
            leg.name
        );
        lat.push((p50, p99));
    }
    println!(
        "relay adds p50 {:+.1} µs, p99 {:+.1} µs over direct (target p50 < 200 µs); pgbouncer adds p50 {:+.1} µs, p99 {:+.1} µs",
        lat[2].0 - lat[0].0,
        lat[2].1 - lat[0].1,
        lat[1].0 - lat[0].0,
        lat[1].1 - lat[0].1,
    );

    // Throughput: each mode on each leg in turn, TPC-B's tables reset before each run.
    println!("pgbench -n -c 16 -j 2 -T {secs}, scale {scale}, tps without initial connection time");
    for (mode, args) in [
        ("-S (simple)", &["-S"][..]),
        ("-S -M prepared", &["-S", "-M", "prepared"][..]),
        ("TPC-B (default)", &[][..]),
    ] {
        let mut tps = Vec::new();
        for (i, leg) in legs.iter().enumerate() {
            if args.is_empty() {
                cluster.admin("app", "TRUNCATE pgbench_history");
                cluster.admin("app", "VACUUM pgbench_branches");
                cluster.admin("app", "VACUUM pgbench_tellers");
            }
            // pgbench runs as this thread waits: the worker it is on hands its work to
            // another thread, so the relay keeps both of the runtime's workers.
            // The proxy's own CPU per transaction (none for direct), against PgBouncer's.
            let proxy = match i {
                1 => Some(bouncer.id()),
                2 => Some(std::process::id()),
                _ => None,
            };
            let before = proxy.map(cpu_ms);
            let t = tokio::task::block_in_place(|| pgbench(leg, args, secs));
            let cpu = match (proxy, before) {
                (Some(p), Some(b)) => format!(
                    "  proxy CPU {:>5.1} µs/transaction",
                    (cpu_ms(p) - b) * 1000.0 / (t * secs as f64)
                ),
                _ => String::new(),
            };
            println!("  {mode:<16} {:<20} {t:>9.0} tps{cpu}", leg.name);
            tps.push(t);
        }
        println!(
            "  {mode:<16} relay / direct {:.2}×, relay / pgbouncer {:.2}×",
            tps[2] / tps[0],
            tps[2] / tps[1]
        );
    }

    judging_cost(&legs[2], secs);

    let _ = bouncer.kill();
    let _ = bouncer.wait();
    server.stop().await;
}

/// Statements per second through the relay with the role's rules judged and with
/// judging switched off (the `bench-unjudged` feature), alternating so the machine's
/// drift falls on both alike.
#[cfg(feature = "bench-unjudged")]
fn judging_cost(relay: &Leg, secs: u64) {
    use std::sync::atomic::Ordering;
    use twokey::relay::postgres::judge::UNJUDGED;
    println!(
        "statement rules on vs off, through the relay (pgbench -n -c 16 -j 2 -T {secs}, two runs each, alternating)"
    );
    for (mode, args) in [
        ("-S (simple)", &["-S"][..]),
        ("-S -M prepared", &["-S", "-M", "prepared"][..]),
    ] {
        let (mut on, mut off) = (0.0, 0.0);
        for _ in 0..2 {
            UNJUDGED.store(false, Ordering::Relaxed);
            on += tokio::task::block_in_place(|| pgbench(relay, args, secs)) / 2.0;
            UNJUDGED.store(true, Ordering::Relaxed);
            off += tokio::task::block_in_place(|| pgbench(relay, args, secs)) / 2.0;
        }
        UNJUDGED.store(false, Ordering::Relaxed);
        println!(
            "  {mode:<16} rules on {on:>9.0} tps, off {off:>9.0} tps: on / off {:.3}×",
            on / off
        );
    }
}

#[cfg(not(feature = "bench-unjudged"))]
fn judging_cost(_: &Leg, _: u64) {
    println!("statement rules on vs off: cargo bench --bench pg_relay --features bench-unjudged");
}
