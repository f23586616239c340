//! `POST /slack/interactions`: Slack's interactivity callback for the Approve/Deny
//! buttons. Unverified requests get 401 and are not read further; verified ones get
//! 200 at once (Slack retries anything else), with refusals told to the clicking user.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;

use crate::state::AppState;

pub async fn interactions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let Some(slack) = state.slack.clone() else {
        return StatusCode::NOT_FOUND;
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Err(refusal) = slack
        .verify(
            &state,
            header("x-slack-request-timestamp"),
            header("x-slack-signature"),
            &body,
            state.clock.now(),
        )
        .await
    {
        tracing::warn!(reason = %refusal, "slack interaction refused");
        crate::state::Metrics::inc(&state.metrics.refusals);
        return StatusCode::UNAUTHORIZED;
    }
    let payload = form_urlencoded::parse(&body)
        .find(|(k, _)| k == "payload")
        .and_then(|(_, v)| serde_json::from_str::<serde_json::Value>(&v).ok());
    let Some(payload) = payload else {
        return StatusCode::BAD_REQUEST;
    };
    if payload["type"] != "block_actions" {
        return StatusCode::OK;
    }
    if let Err(e) = slack.interact(&state, &payload).await {
        tracing::error!(error = %e, "slack interaction failed");
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    StatusCode::OK
}
