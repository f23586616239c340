//! The HTTP surface: pages for people, `/api/v1` for the CLI and automation,
//! `/healthz` and `/metrics`.
//!
//! Permission checks live in the extractors ([`extract`]) so a handler cannot forget
//! them. Errors become a page or a JSON body in [`error`], which logs internals and
//! renders only safe messages. No GET handler changes state.

pub mod account;
pub mod anon;
pub mod api;
pub mod cli_login;
pub mod error;
pub mod extract;
pub mod host_keys;
pub mod limit;
pub mod links;
pub mod pages;
pub mod sessions;
pub mod slack;
pub mod tokens;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_sessions::cookie::SameSite;
use tower_sessions::{Expiry, SessionManagerLayer};

use crate::state::{AppState, Metrics};

/// Content-Security-Policy for every response: no scripts at all, styles and images
/// from twokey only, never framed, forms post only back to twokey.
pub const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Strict-Transport-Security when twokey is served over https: browsers then refuse
/// plain http to this host for a year, so a network attacker cannot strip TLS from a
/// later visit. Not `includeSubDomains`: twokey cannot know what else runs on sibling
/// hosts, and must not break it.
pub const HSTS: &str = "max-age=31536000";

/// The whole app, ready to serve.
pub fn router(state: AppState, sessions: crate::store::SessionStore) -> Router {
    let hsts = state
        .config
        .secure_cookies()
        .then(|| HeaderValue::from_static(HSTS));
    let idle = state.config.session_idle_timeout();
    let session_layer = SessionManagerLayer::new(sessions)
        .with_name("twokey_session")
        .with_http_only(true)
        .with_same_site(SameSite::Lax)
        .with_secure(state.config.secure_cookies())
        .with_expiry(Expiry::OnInactivity(time::Duration::seconds(
            idle.as_secs() as i64,
        )));

    // Per-address budgets for what anyone can reach without signing in.
    let limited = |bucket: limit::Bucket| {
        axum::middleware::from_fn_with_state((state.clone(), bucket), limit::limit)
    };

    let api = Router::new()
        .route("/requests", get(api::list).post(api::create))
        .route("/requests/{id}", get(api::show))
        .route("/requests/{id}/ssh-certificate", post(api::ssh_certificate))
        .route("/requests/{id}/db-credentials", post(api::db_credentials))
        .route("/requests/{id}/{action}", post(api::act))
        .route("/ca/ssh", get(api::ca_public_key))
        .route("/ca/krl", get(api::ca_krl))
        .route("/relay/host-key", get(api::relay_host_key))
        .route("/whoami", get(api::whoami))
        .route(
            "/cli/token",
            post(cli_login::token).layer(limited(limit::Bucket::Token)),
        )
        .fallback(api::not_found);

    let mut page_routes = Router::new();
    // Demo sign-in exists only when configured: otherwise the route is simply absent.
    if state.config.auth.dev_login {
        page_routes = page_routes.route(
            "/login/dev",
            post(pages::dev_login).layer(limited(limit::Bucket::SignIn)),
        );
    }
    let pages = page_routes
        .route("/", get(pages::home))
        .route("/login", get(pages::login_page))
        .route("/logout", post(pages::logout))
        .route(
            "/auth/oidc/start",
            get(pages::oidc_start).layer(limited(limit::Bucket::SignIn)),
        )
        .route(
            "/auth/oidc/callback",
            get(pages::oidc_callback).layer(limited(limit::Bucket::SignIn)),
        )
        .route(
            "/a/{token}",
            get(links::show)
                .post(links::confirm)
                .layer(limited(limit::Bucket::Link)),
        )
        .route("/dev/mailbox", get(pages::dev_mailbox))
        .route("/cli/login", get(cli_login::show).post(cli_login::confirm))
        .route("/account", get(account::show))
        .route("/tokens", get(tokens::list))
        .route("/tokens/{id}/revoke", post(tokens::revoke))
        .route("/account/slack/unlink", post(slack::unlink))
        .route(
            "/slack/link/{token}",
            get(slack::link_page)
                .post(slack::link_confirm)
                .layer(limited(limit::Bucket::Link)),
        )
        .route("/admin/users", get(pages::users))
        .route("/admin/users/{id}/reauth", post(pages::force_reauth))
        .route("/admin/host-keys", get(host_keys::list))
        .route("/admin/host-keys/{id}/{action}", post(host_keys::decide))
        .route(
            "/requests",
            get(pages::my_requests).post(pages::create_request),
        )
        .route("/requests/new", get(pages::new_request))
        .route("/requests/{id}", get(pages::request_detail))
        .route(
            "/requests/{id}/ssh-certificate",
            post(pages::ssh_certificate),
        )
        .route("/requests/{id}/db-credentials", post(pages::db_credentials))
        .route("/requests/{id}/{action}", post(pages::act))
        .route("/queue", get(pages::queue))
        .route("/grants", get(pages::grants))
        .route("/sessions", get(sessions::list))
        .route("/sessions/{id}", get(sessions::show))
        .route("/sessions/{id}/cast", get(sessions::cast))
        .route("/sessions/{id}/terminate", post(sessions::terminate))
        .route("/audit", get(pages::audit_log))
        .route("/policy", get(pages::policy))
        .fallback(pages::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            error::render_error_pages,
        ))
        .layer(session_layer);

    Router::new()
        .nest("/api/v1", api)
        .route(
            "/slack/interactions",
            post(slack::interactions).layer(limited(limit::Bucket::Slack)),
        )
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/static/style.css", get(style))
        .route("/static/replay.js", get(sessions::replay_js))
        .route("/static/asciinema-player.min.js", get(sessions::player_js))
        .route("/static/asciinema-player.css", get(sessions::player_css))
        .merge(pages)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(header_layer(header::CONTENT_SECURITY_POLICY, CSP))
        .layer(header_layer(header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .layer(header_layer(header::X_FRAME_OPTIONS, "DENY"))
        // Later issues put single-use tokens in URLs: never leak them to other sites.
        .layer(header_layer(header::REFERRER_POLICY, "no-referrer"))
        .layer(header_layer(header::CACHE_CONTROL, "no-store"))
        .layer(SetResponseHeaderLayer::overriding(
            header::STRICT_TRANSPORT_SECURITY,
            move |_: &axum::response::Response| hsts.clone(),
        ))
        .with_state(state)
}

fn header_layer(
    name: header::HeaderName,
    value: &'static str,
) -> SetResponseHeaderLayer<HeaderValue> {
    SetResponseHeaderLayer::if_not_present(name, HeaderValue::from_static(value))
}

async fn count_requests(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    Metrics::inc(&state.metrics.http_requests);
    next.run(req).await
}

async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    match crate::store::ping(&state.db).await {
        Ok(_) => (axum::http::StatusCode::OK, "ok\n"),
        Err(e) => {
            tracing::error!(error = %e, "health check: database unreachable");
            (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "database unreachable\n",
            )
        }
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let (pending, live) = crate::store::gauges(&state.db, state.now_ms())
        .await
        .unwrap_or((-1, -1));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(pending, live),
    )
}

async fn style() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        include_str!("../../static/style.css"),
    )
}
