//! The HTTP surface: pages for people, `/api/v1` for the CLI and automation,
//! `/healthz` and `/metrics`.
//!
//! Permission checks live in the extractors ([`extract`]) so a handler cannot forget
//! them. Errors become a page or a JSON body in [`error`], which logs internals and
//! renders only safe messages. No GET handler changes state.
//!
//! One file per page group, each with its own `router()`; [`router`] merges them and
//! adds the shared layers once. A tour:
//! - [`sign_in`]: `/`, `/login`, demo and OIDC sign-in, `/logout`.
//! - [`requests`]: new request, my requests, the approval queue, a request's page and
//!   its approve / deny / cancel / revoke; [`links`]: the emailed action links.
//! - [`grants`]: live grants, the SSH certificate and database login of a grant.
//! - [`sessions`]: relay sessions, their replay, ending one; [`db_session`]: a
//!   PostgreSQL session's transcript page and download.
//! - [`admin`] (users, forced re-sign-in), [`host_keys`], [`audit_log`]; [`policy_page`].
//! - [`account`], [`tokens`], [`cli_login`] (`twokey login`), [`slack`] (Slack's button
//!   clicks, linking a Slack account); [`mailbox`]: the demo's mailbox.
//! - [`api`]: `/api/v1`; [`ops`]: `/healthz`, `/metrics`; [`assets`]: `/static/…`.
//! - Shared: [`views`] (page chrome, view models), [`extract`], [`error`], [`limit`]
//!   (per-address budgets), [`anon`] (cookies of visitors not signed in).

pub mod account;
pub mod admin;
pub mod anon;
pub mod api;
pub mod assets;
pub mod audit_log;
mod chrome;
pub mod cli_login;
pub mod db_session;
pub mod error;
pub mod extract;
pub mod grants;
pub mod held;
pub mod host_keys;
pub mod limit;
pub mod links;
pub mod mailbox;
pub mod ops;
pub mod policy_page;
pub mod requests;
pub mod sessions;
pub mod sign_in;
pub mod slack;
pub mod tokens;
pub mod views;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
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

/// The whole app, ready to serve: three tiers, each with its own layers, under the
/// headers every response gets.
/// - `/api/v1`: bearer tokens, JSON errors, no session.
/// - Pages: the session layer and error pages, and the 404 page for anything unknown.
/// - Slack's callback, `/healthz`, `/metrics`, `/static/…`: neither.
pub fn router(state: AppState, sessions: crate::store::SessionStore) -> Router {
    let hsts = state
        .config()
        .secure_cookies()
        .then(|| HeaderValue::from_static(HSTS));
    let idle = state.config().session_idle_timeout();
    let session_layer = SessionManagerLayer::new(sessions)
        .with_name("twokey_session")
        .with_http_only(true)
        .with_same_site(SameSite::Lax)
        .with_secure(state.config().secure_cookies())
        .with_expiry(Expiry::OnInactivity(time::Duration::seconds(
            idle.as_secs() as i64,
        )));

    let api = api::router()
        .merge(cli_login::api_router(&state))
        .fallback(api::not_found);

    let pages = Router::new()
        .merge(sign_in::router(&state))
        .merge(links::router(&state))
        .merge(mailbox::router())
        .merge(cli_login::router())
        .merge(account::router())
        .merge(tokens::router())
        .merge(slack::router(&state))
        .merge(admin::router())
        .merge(host_keys::router())
        .merge(requests::router())
        .merge(grants::router())
        .merge(sessions::router())
        .merge(held::router())
        .merge(audit_log::router())
        .merge(policy_page::router())
        .fallback(views::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            error::render_error_pages,
        ))
        .layer(session_layer);

    Router::new()
        .nest("/api/v1", api)
        .merge(slack::interactions_router(&state))
        .merge(ops::router())
        .merge(assets::router())
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

/// Counts the request, and runs it to its end in a task of its own: a client that goes
/// away half-way (an approver closing the tab) must not stop a handler inside its
/// transaction, which would hold the database's write lock until the pool reused the
/// connection.
async fn count_requests(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    Metrics::inc(&state.metrics.http_requests);
    match tokio::spawn(next.run(req)).await {
        Ok(response) => response,
        Err(e) => {
            tracing::error!(error = %e, "a request's handler failed");
            axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
