//! The SSH relay against plain OpenSSH, in one run on this machine: throughput of a
//! bulk transfer (default 1 GiB, `TWOKEY_BENCH_BYTES`) and the round-trip time of a
//! small command, for direct ssh, ssh through an OpenSSH jump host (ProxyCommand `-W`,
//! what `-J` does), and ssh through the twokey relay; the relay's memory with idle
//! sessions open (default 500, `TWOKEY_BENCH_IDLE`); and how long revoking a grant takes
//! to close every live session on it (default 100, `TWOKEY_BENCH_LIVE`).
//!
//! `cargo bench --bench relay` (or `benches/run.sh`). Prints figures and ratios; asserts
//! nothing about time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/sshd.rs"]
mod sshd;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::net::TcpListener;
use twokey::clock::SystemClock;
use twokey::config::{Config, RelayConfig, demo_config_toml};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// ssh with a path's options; `pipe` streams that many zero bytes into `cat > /dev/null`.
fn ssh(base: &[String], command: &str, pipe: Option<u64>) -> Duration {
    let t = Instant::now();
    let mut c = Command::new("ssh");
    c.args(base)
        .arg(command)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let out = match pipe {
        None => c.stdin(Stdio::null()).output().unwrap(),
        Some(n) => {
            c.stdin(Stdio::piped());
            let mut child = c.spawn().unwrap();
            let mut stdin = child.stdin.take().unwrap();
            let writer = std::thread::spawn(move || {
                use std::io::Write;
                let buf = vec![0u8; 1 << 20];
                let mut left = n;
                while left > 0 {
                    let k = left.min(buf.len() as u64) as usize;
                    stdin.write_all(&buf[..k]).unwrap();
                    left -= k as u64;
                }
            });
            writer.join().unwrap();
            child.wait_with_output().unwrap()
        }
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let bytes: u64 = std::env::var("TWOKEY_BENCH_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30);
    let idle: usize = std::env::var("TWOKEY_BENCH_IDLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let dir = tempfile::tempdir().unwrap();
    let login = sshd::login();

    // twokey with the relay; its CAs exist once the state is open.
    let relay_listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = Config::parse(&demo_config_toml("127.0.0.1:0", dir.path()), "bench").unwrap();
    config.server.sweep_interval = std::time::Duration::ZERO;
    config.relay = Some(RelayConfig {
        listen: relay_listen.to_string(),
        host_key_file: None,
        upstream_ca_key_file: None,
        max_connections: idle + 50,
        // Every client here is on 127.0.0.1.
        max_connections_per_ip: idle + 50,
        // What recording costs: TWOKEY_BENCH_RECORDING_CAP=0 records (almost) nothing.
        max_recording_bytes: std::env::var("TWOKEY_BENCH_RECORDING_CAP")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(twokey::config::DEFAULT_MAX_RECORDING_BYTES),
        ..Default::default()
    });
    // The target needs both CAs (direct and jump paths use the engineer's certificate,
    // the relay its upstream one) and its host key pinned: start it with placeholder
    // CA lines, then write the real ones once twokey has made its CAs.
    let target = sshd::Sshd::start("", "");
    let jump = sshd::Sshd::start("", "");
    let ssh_res = config
        .resources
        .iter_mut()
        .find(|r| r.name == "demo-ssh")
        .unwrap();
    ssh_res.address = Some(format!("127.0.0.1:{}", target.port));
    ssh_res.host_key = Some(target.host_key_line());
    let role = &mut ssh_res.roles[0];
    role.principals = vec![login.clone()];
    role.min_approvals = 1;
    role.require_ticket = false;
    role.extensions = vec!["permit-pty".into(), "permit-port-forwarding".into()];
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = twokey::server::start(config, Arc::new(SystemClock), listener)
        .await
        .unwrap();
    let state = server.state.clone();
    let user_ca = state.ca.public_key_line();
    let upstream_ca = state.relay.as_ref().unwrap().upstream_ca.public_key_line();
    std::fs::write(
        target.dir.path().join("ca.pub"),
        format!("{user_ca}\n{upstream_ca}\n"),
    )
    .unwrap();
    std::fs::write(jump.dir.path().join("ca.pub"), format!("{user_ca}\n")).unwrap();

    // A grant and a certificate, through the API.
    let base = format!("{}/api/v1", server.url());
    let alice = twokey::auth::create_api_token(&state, "alice@example.com", "bench")
        .await
        .unwrap();
    let bob = twokey::auth::create_api_token(&state, "bob@example.com", "bench")
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let r: serde_json::Value = http
        .post(format!("{base}/requests"))
        .bearer_auth(&alice)
        .json(&json!({"resource": "demo-ssh", "role": "admin", "duration": "1h", "reason": "bench run"}))
        .send().await.unwrap().json().await.unwrap();
    let id = r["id"].as_str().unwrap().to_string();
    http.post(format!("{base}/requests/{id}/approve"))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    let key = sshd::keygen(dir.path(), "id_ed25519");
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let m: serde_json::Value = http
        .post(format!("{base}/requests/{id}/ssh-certificate"))
        .bearer_auth(&alice)
        .json(&json!({"public_key": public}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let cert = dir.path().join("id_ed25519-cert.pub");
    std::fs::write(&cert, format!("{}\n", m["certificate"].as_str().unwrap())).unwrap();

    let known = dir.path().join("known_hosts");
    std::fs::write(
        &known,
        format!(
            "[127.0.0.1]:{} {}\n[127.0.0.1]:{} {}\n[127.0.0.1]:{} {}\n",
            target.port,
            target.host_key_line(),
            jump.port,
            jump.host_key_line(),
            relay_listen.port(),
            state.relay.as_ref().unwrap().host.public_key_line()
        ),
    )
    .unwrap();
    let common = |port: u16| -> Vec<String> {
        let mut v: Vec<String> = [
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            // A stalled path fails the bench instead of hanging it.
            "-o",
            "ConnectTimeout=10",
            "-o",
            "ServerAliveInterval=5",
            "-o",
            "ServerAliveCountMax=6",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.push("-o".into());
        v.push(format!("UserKnownHostsFile={}", known.display()));
        v.push("-o".into());
        v.push(format!("CertificateFile={}", cert.display()));
        v.push("-i".into());
        v.push(key.display().to_string());
        v.push("-p".into());
        v.push(port.to_string());
        // TWOKEY_BENCH_CIPHER=aes128-gcm@openssh.com: every path with that cipher
        // (OpenSSH's default is chacha20-poly1305).
        if let Ok(cipher) = std::env::var("TWOKEY_BENCH_CIPHER") {
            v.push("-c".into());
            v.push(cipher);
        }
        v
    };
    let direct = [common(target.port), vec![format!("{login}@127.0.0.1")]].concat();
    let jump_cmd = format!(
        "ssh {} -W %h:%p {login}@127.0.0.1",
        common(jump.port).join(" ")
    );
    let via_jump = [
        common(target.port),
        vec![
            "-o".into(),
            format!("ProxyCommand={jump_cmd}"),
            format!("{login}@127.0.0.1"),
        ],
    ]
    .concat();
    let via_relay = [
        common(relay_listen.port()),
        vec!["demo-ssh@127.0.0.1".into()],
    ]
    .concat();

    // Idle sessions first, on a relay that has served one session (so what is lazily
    // set up once is not counted): authenticated connections holding no channel.
    ssh(&via_relay, "true", None);
    let before = rss_kib();
    let mut children = Vec::new();
    for _ in 0..idle {
        let mut c = Command::new("ssh");
        c.args(common(relay_listen.port()))
            .args(["-N", "demo-ssh@127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        children.push(c.spawn().unwrap());
    }
    // Let them all authenticate (bounded).
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = 0;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = count_established(relay_listen.port());
        if now >= idle || (now == last && now > 0) {
            break;
        }
        last = now;
    }
    let after = rss_kib();
    let open = count_established(relay_listen.port());
    println!(
        "relay with {open} idle connections: +{} KiB RSS ({:.1} KiB each)",
        after.saturating_sub(before),
        after.saturating_sub(before) as f64 / open.max(1) as f64
    );
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    println!(
        "bulk transfer of {} MiB and `true` round trips, all on this machine",
        bytes >> 20
    );
    let mut rows = Vec::new();
    for (name, args) in [
        ("direct OpenSSH", &direct),
        ("OpenSSH jump host (-W)", &via_jump),
        ("twokey relay", &via_relay),
    ] {
        ssh(args, "true", None); // warm up
        let t = ssh(args, "cat > /dev/null", Some(bytes));
        let mib_s = bytes as f64 / 1048576.0 / t.as_secs_f64();
        let rtt = median((0..9).map(|_| ssh(args, "true", None)).collect());
        println!(
            "{name:<24} {mib_s:>8.1} MiB/s   round trip p50 {:>7.1} ms",
            rtt.as_secs_f64() * 1000.0
        );
        rows.push((mib_s, rtt));
    }
    println!(
        "relay / direct: throughput {:.2}×, round trip {:.2}×; relay / jump host: throughput {:.2}×, round trip {:.2}×",
        rows[2].0 / rows[0].0,
        rows[2].1.as_secs_f64() / rows[0].1.as_secs_f64(),
        rows[2].0 / rows[1].0,
        rows[2].1.as_secs_f64() / rows[1].1.as_secs_f64(),
    );

    // The cut: live sessions on one grant, then the grant is revoked; how long until
    // the last engineer's ssh has exited (one store query per tick, however many).
    let live: usize = std::env::var("TWOKEY_BENCH_LIVE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let mut sessions = Vec::new();
    for batch in (0..live).collect::<Vec<_>>().chunks(20) {
        let started: Vec<_> = batch
            .iter()
            .map(|_| {
                let mut c = Command::new("ssh");
                c.args(&via_relay)
                    .arg("echo started; sleep 600")
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null());
                let mut child = c.spawn().unwrap();
                let mut out = child.stdout.take().unwrap();
                std::thread::spawn(move || {
                    use std::io::Read;
                    let mut buf = [0u8; 8];
                    out.read_exact(&mut buf).unwrap();
                    child
                })
            })
            .collect();
        sessions.extend(started.into_iter().map(|t| t.join().unwrap()));
    }
    let t = Instant::now();
    let revoked = http
        .post(format!("{base}/requests/{id}/revoke"))
        .bearer_auth(&bob)
        .json(&json!({"comment": "bench: the cut"}))
        .send()
        .await
        .unwrap();
    assert!(revoked.status().is_success(), "{}", revoked.status());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sessions.is_empty() && Instant::now() < deadline {
        sessions.retain_mut(|c| c.try_wait().unwrap().is_none());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "revocation with {live} live sessions on the grant: all closed after {:.0} ms ({} still open)",
        t.elapsed().as_secs_f64() * 1000.0,
        sessions.len()
    );
    for mut c in sessions {
        let _ = c.kill();
        let _ = c.wait();
    }

    server.stop().await;
}

/// Established TCP connections to the relay's port (from /proc/net/tcp).
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
