//! Per-address rate limits for the endpoints anyone can reach without signing in:
//! sign-in, emailed links, the CLI's token exchange and Slack's interactions.
//!
//! A token bucket per (endpoint group, client address), kept as a GCRA arrival time
//! and refilled on twokey's injected clock, so tests are deterministic and never sleep. IPv6 clients are counted per /64
//! (one host usually holds a whole /64, and could otherwise rotate through it). Behind
//! a reverse proxy listed in `server.trusted_proxies`, the client is the last address
//! in `X-Forwarded-For` that is not itself a trusted proxy; a header from anyone else
//! is ignored, so a client cannot pick its own address.
//!
//! The table is bounded: idle entries are dropped when it fills, and if it is still
//! full (an attack from very many addresses) new addresses are refused: fail closed.
//! Limits are per replica. What this module must never do: log a path (it may hold
//! a link token).

//!
//! This file is the middleware; [`bucket`] holds the budgets.

pub mod bucket;

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;

pub use bucket::{Bucket, Limiter, client_ip};

use crate::state::AppState;

/// `route` (every method of it) behind the per-address budget of `bucket`: how each
/// page group's `router()` puts an endpoint anyone can reach under a limit.
pub(crate) fn limited(
    state: &AppState,
    bucket: Bucket,
    route: MethodRouter<AppState>,
) -> MethodRouter<AppState> {
    route.layer(axum::middleware::from_fn_with_state(
        (state.clone(), bucket),
        limit,
    ))
}

/// Middleware: refuses with 429 once the client's budget for `bucket` is spent.
pub async fn limit(
    State((state, bucket)): State<(AppState, Bucket)>,
    req: Request,
    next: Next,
) -> Response {
    // Without the peer address (a router served without connect info) every client
    // shares one budget: stricter, never looser.
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    let ip = client_ip(peer, req.headers(), &state.config().trusted_proxies());
    match state.limiter.check(bucket, ip, state.now_ms()) {
        Ok(()) => next.run(req).await,
        Err(wait) => {
            tracing::info!(client = %ip, limit = ?bucket, "rate limited");
            too_many(bucket, wait)
        }
    }
}

fn too_many(bucket: Bucket, wait: u64) -> Response {
    let message = format!(
        "Too many {} from your address. Wait {wait} second{} and try again.",
        bucket.what(),
        if wait == 1 { "" } else { "s" }
    );
    let mut resp = match bucket {
        Bucket::SignIn | Bucket::Link => crate::web::error::page_response(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many attempts",
            message,
        ),
        Bucket::Token | Bucket::Slack => (
            StatusCode::TOO_MANY_REQUESTS,
            axum::Json(serde_json::json!({ "error": "rate_limited", "message": message })),
        )
            .into_response(),
    };
    if let Ok(v) = HeaderValue::from_str(&wait.to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}
