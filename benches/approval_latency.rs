//! Latency of the approval workflow through the API: 50 concurrent clients each run
//! create → approve → GET against a real server on 127.0.0.1 (SQLite in a temp dir),
//! and the same clients hit `/healthz` as the baseline measured in the same run.
//!
//! `cargo bench --bench approval_latency` (or `benches/run.sh`). Prints p50/p99 and
//! the ratio to the baseline; asserts nothing about time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::{CLIENTS, ROUNDS, report, run};

use serde_json::json;
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
    let alice = twokey::auth::create_api_token(&state, "alice@example.com", "bench")
        .await
        .unwrap();
    let bob = twokey::auth::create_api_token(&state, "bob@example.com", "bench")
        .await
        .unwrap();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()
        .unwrap();

    let (h, u) = (http.clone(), server.url());
    let (base_samples, base_wall) = run(move |_| {
        let (h, u) = (h.clone(), u.clone());
        async move {
            let r = h.get(format!("{u}/healthz")).send().await.unwrap();
            assert!(r.status().is_success());
        }
    })
    .await;

    let (h, b) = (http.clone(), base.clone());
    let (samples, wall) = run(move |_| {
        let (h, b, alice, bob) = (h.clone(), b.clone(), alice.clone(), bob.clone());
        async move {
            let r: serde_json::Value = h
                .post(format!("{b}/requests"))
                .bearer_auth(&alice)
                .json(&json!({"resource": "demo-db", "role": "read", "duration": "30m", "reason": "bench run"}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let id = r["id"].as_str().unwrap().to_string();
            let r = h.post(format!("{b}/requests/{id}/approve")).bearer_auth(&bob).send().await.unwrap();
            assert!(r.status().is_success(), "approve: {}", r.status());
            let r: serde_json::Value = h
                .get(format!("{b}/requests/{id}"))
                .bearer_auth(&alice)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(r["status"], "approved");
        }
    })
    .await;

    println!("{CLIENTS} concurrent clients × {ROUNDS} rounds, server and clients on this machine");
    let (bp50, bp99) = report("baseline GET /healthz", &base_samples, base_wall);
    let (p50, p99) = report("create → approve → GET", &samples, wall);
    println!(
        "ratio to baseline: p50 {:.1}×, p99 {:.1}×",
        p50 / bp50,
        p99 / bp99
    );
    let verified = twokey::audit::verify_chain(&state.db).await.unwrap();
    println!(
        "audit chain after the run: {:?}",
        verified.map(|ok| ok.events)
    );
    server.stop().await;
}
