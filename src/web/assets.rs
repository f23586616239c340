//! Static files: the stylesheet (built in), and the session replay's scripts — its
//! start-up script (built in) and asciinema-player from npm, served as is from
//! `TWOKEY_PLAYER_DIR`, the project's node_modules or the container image. Served
//! without a session; what this module must never do is serve a path taken from the
//! request.

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::state::AppState;

/// `/static/…`.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/static/style.css", get(style))
        .route("/static/replay.js", get(replay_js))
        .route("/static/asciinema-player.min.js", get(player_js))
        .route("/static/asciinema-player.css", get(player_css))
}

/// Where the npm package's files are: `TWOKEY_PLAYER_DIR`, the project's node_modules,
/// or where the container image puts them.
fn player_file(name: &str) -> Option<std::path::PathBuf> {
    let dirs = [
        std::env::var_os("TWOKEY_PLAYER_DIR").map(std::path::PathBuf::from),
        Some("node_modules/asciinema-player/dist/bundle".into()),
        Some("/usr/share/twokey/asciinema-player".into()),
    ];
    dirs.into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

async fn asset(name: &str, content_type: &'static str) -> Response {
    match player_file(name) {
        Some(p) => match tokio::fs::read(p).await {
            Ok(body) => (
                [
                    (header::CONTENT_TYPE, content_type),
                    (header::CACHE_CONTROL, "public, max-age=3600"),
                ],
                body,
            )
                .into_response(),
            Err(_) => axum::http::StatusCode::NOT_FOUND.into_response(),
        },
        None => axum::http::StatusCode::NOT_FOUND.into_response(),
    }
}

pub async fn player_js() -> Response {
    asset("asciinema-player.min.js", "text/javascript").await
}

pub async fn player_css() -> Response {
    asset("asciinema-player.css", "text/css").await
}

pub async fn replay_js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript")],
        include_str!("../../static/replay.js"),
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
