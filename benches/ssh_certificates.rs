//! SSH certificates minted per second through the API: 50 concurrent clients each
//! POST `/requests/{id}/ssh-certificate` for a live grant against a real server on
//! 127.0.0.1 (SQLite in a temp dir). Baselines from the same run: an authenticated
//! `GET /requests/{id}` through the same stack, and the CA signing alone in-process.
//!
//! `cargo bench --bench ssh_certificates` (or `benches/run.sh`). Prints figures and
//! ratios; asserts nothing about time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::{CLIENTS, ROUNDS, report, run};
use serde_json::json;
use ssh_key::getrandom::SysRng;
use ssh_key::rand_core::UnwrapErr;
use tokio::net::TcpListener;
use twokey::clock::SystemClock;
use twokey::config::{Config, demo_config_toml};

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::parse(&demo_config_toml("127.0.0.1:0", dir.path()), "bench").unwrap();
    config.server.sweep_interval = std::time::Duration::ZERO;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = twokey::server::start(config, Arc::new(SystemClock), listener)
        .await
        .unwrap();
    let state = server.state.clone();
    let base = format!("{}/api/v1", server.url());
    let token = |who: &'static str| {
        let state = state.clone();
        async move {
            twokey::auth::create_api_token(&state, who, "bench")
                .await
                .unwrap()
        }
    };
    let (alice, bob, carol) = (
        token("alice@example.com").await,
        token("bob@example.com").await,
        token("carol@example.com").await,
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()
        .unwrap();
    let r: serde_json::Value = http
        .post(format!("{base}/requests"))
        .bearer_auth(&alice)
        .json(
            &json!({"resource": "demo-ssh", "role": "admin", "duration": "1h",
                      "reason": "bench run", "ticket": "BENCH-1"}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = r["id"].as_str().unwrap().to_string();
    for approver in [&bob, &carol] {
        let r = http
            .post(format!("{base}/requests/{id}/approve"))
            .bearer_auth(approver)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    let user =
        ssh_key::PrivateKey::random(&mut UnwrapErr(SysRng), ssh_key::Algorithm::Ed25519).unwrap();
    let public = user.public_key().to_openssh().unwrap();

    let (h, b, a, i) = (http.clone(), base.clone(), alice.clone(), id.clone());
    let (base_samples, base_wall) = run(move |_| {
        let (h, b, a, i) = (h.clone(), b.clone(), a.clone(), i.clone());
        async move {
            let r = h
                .get(format!("{b}/requests/{i}"))
                .bearer_auth(&a)
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
        }
    })
    .await;

    let (h, b, a, i) = (http.clone(), base.clone(), alice.clone(), id.clone());
    let (samples, wall) = run(move |_| {
        let (h, b, a, i, k) = (h.clone(), b.clone(), a.clone(), i.clone(), public.clone());
        async move {
            let r = h
                .post(format!("{b}/requests/{i}/ssh-certificate"))
                .bearer_auth(&a)
                .json(&json!({ "public_key": k }))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), reqwest::StatusCode::CREATED);
        }
    })
    .await;

    // The CA alone: what signing costs without HTTP, SQL and the audit chain.
    let principals = vec!["admin".to_string()];
    let extensions = vec!["permit-pty".to_string()];
    let n = 5000;
    let t = Instant::now();
    for serial in 1..=n {
        state
            .ca
            .sign(&twokey::ca::CertSpec {
                public_key: user.public_key(),
                serial,
                key_id: "twokey:bench:alice@example.com",
                principals: &principals,
                valid_after: 1,
                valid_before: 2,
                extensions: &extensions,
                force_command: None,
                source_address: None,
            })
            .unwrap();
    }
    let sign_rate = n as f64 / t.elapsed().as_secs_f64();

    println!("{CLIENTS} concurrent clients × {ROUNDS} rounds, server and clients on this machine");
    let (bp50, _) = report("baseline GET /requests/{id}", &base_samples, base_wall);
    let (p50, _) = report("POST ssh-certificate", &samples, wall);
    let api_rate = samples.len() as f64 / wall.as_secs_f64();
    println!("CA signing alone, one thread: {sign_rate:.0} certificates/s");
    println!(
        "certificates/s through the API: {api_rate:.0} ({:.2}× the signing-alone rate); p50 {:.1}× the baseline GET",
        api_rate / sign_rate,
        p50 / bp50
    );
    let krl_t = Instant::now();
    let krl = twokey::access::ssh::current_krl(&state).await.unwrap();
    println!(
        "KRL with {} live certificates (none revoked): {} bytes in {:.2} ms",
        samples.len(),
        krl.len(),
        krl_t.elapsed().as_secs_f64() * 1000.0
    );
    let verified = twokey::audit::verify_chain(&state.db).await.unwrap();
    println!(
        "audit chain after the run: {:?}",
        verified.map(|ok| ok.events)
    );
    server.stop().await;
}
