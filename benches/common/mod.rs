//! What the benches share: concurrent clients, percentiles, one report line.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

pub const CLIENTS: usize = 50;
pub const ROUNDS: usize = 20;

pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub async fn run<F, Fut>(op: F) -> (Vec<Duration>, Duration)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let op = op.clone();
        set.spawn(async move {
            let mut out = Vec::with_capacity(ROUNDS);
            for _ in 0..ROUNDS {
                let t = Instant::now();
                op(c).await;
                out.push(t.elapsed());
            }
            out
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r.unwrap());
    }
    let wall = start.elapsed();
    all.sort();
    (all, wall)
}

pub fn report(name: &str, samples: &[Duration], wall: Duration) -> (f64, f64) {
    let (p50, p99) = (ms(pct(samples, 0.50)), ms(pct(samples, 0.99)));
    println!(
        "{name:<28} n={:<5} p50={p50:>8.2} ms  p99={p99:>8.2} ms  throughput={:>8.1}/s",
        samples.len(),
        samples.len() as f64 / wall.as_secs_f64()
    );
    (p50, p99)
}
