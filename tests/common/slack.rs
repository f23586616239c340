//! A local server that speaks Slack's Web API shape (chat.postMessage, chat.update,
//! users.info, response_url), recording what twokey sends it, plus the signing that
//! Slack applies to interaction callbacks. Slack's servers cannot run here; this is
//! the wire as Slack documents it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::post;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

pub const BOT_TOKEN: &str = "xoxb-test-0123456789";
pub const SIGNING_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
pub const CHANNEL_ID: &str = "C0TWOKEY";
/// The workspace twokey is pinned to in the tests.
pub const TEAM_ID: &str = "T0TEAM";

#[derive(Clone, Default)]
pub struct Recorded {
    pub calls: Arc<Mutex<Vec<(String, Value)>>>,
    users: Arc<Mutex<HashMap<String, Value>>>,
    /// While set, every Web API call fails the way an outage does: HTTP 503.
    down: Arc<AtomicBool>,
}

pub struct FakeSlack {
    pub base: String,
    pub api: String,
    pub recorded: Recorded,
}

async fn method(
    State(rec): State<Recorded>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: String,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if rec.down.load(Ordering::SeqCst) {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "upstream connect error",
        )
            .into_response();
    }
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if auth != format!("Bearer {BOT_TOKEN}") {
        return axum::Json(json!({"ok": false, "error": "invalid_auth"})).into_response();
    }
    let reply = match method.as_str() {
        "chat.postMessage" | "chat.update" => {
            let Ok(v) = serde_json::from_str::<Value>(&body) else {
                return axum::Json(json!({"ok": false, "error": "invalid_json"})).into_response();
            };
            let mut calls = rec.calls.lock().unwrap();
            // Each new message gets its own ts; an update answers with the ts it was given.
            let ts = match v["ts"].as_str() {
                Some(ts) => ts.to_string(),
                None => {
                    let posted = calls
                        .iter()
                        .filter(|(m, _)| m == "chat.postMessage")
                        .count();
                    format!("1763812800.{:06}", 100 + posted)
                }
            };
            calls.push((method.clone(), v.clone()));
            json!({"ok": true, "channel": CHANNEL_ID, "ts": ts, "message": {"text": v["text"]}})
        }
        "users.info" => {
            // A read method: form-encoded arguments, as Slack takes them.
            let user = form_urlencoded::parse(body.as_bytes())
                .find(|(k, _)| k == "user")
                .map(|(_, v)| v.to_string())
                .unwrap_or_default();
            rec.calls
                .lock()
                .unwrap()
                .push((method.clone(), json!({"user": user})));
            match rec.users.lock().unwrap().get(&user) {
                Some(u) => json!({"ok": true, "user": u}),
                None => json!({"ok": false, "error": "user_not_found"}),
            }
        }
        _ => json!({"ok": false, "error": "unknown_method"}),
    };
    axum::Json(reply).into_response()
}

async fn response_url(
    State(rec): State<Recorded>,
    Path(id): Path<String>,
    body: String,
) -> &'static str {
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    rec.calls
        .lock()
        .unwrap()
        .push((format!("response_url/{id}"), v));
    "ok"
}

impl FakeSlack {
    pub async fn start() -> FakeSlack {
        let recorded = Recorded::default();
        let app = Router::new()
            .route("/api/{method}", post(method))
            .route("/actions/{id}", post(response_url))
            .with_state(recorded.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeSlack {
            api: format!("{base}/api"),
            base,
            recorded,
        }
    }

    /// Slack user `id` has this confirmed email.
    pub fn user(&self, id: &str, email: &str) {
        self.user_as(
            id,
            json!({
                "id": id, "name": email.split('@').next(), "deleted": false, "is_bot": false,
                "is_email_confirmed": true, "profile": {"email": email}
            }),
        );
    }

    /// Slack user `id` as `users.info` describes it, exactly.
    pub fn user_as(&self, id: &str, user: Value) {
        self.recorded.users.lock().unwrap().insert(id.into(), user);
    }

    /// Takes Slack's Web API down (true) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.recorded.down.store(down, Ordering::SeqCst);
    }

    pub fn calls(&self, method: &str) -> Vec<Value> {
        self.recorded
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, _)| m == method)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// What Slack posts when `user` of the pinned workspace clicks `action` on request
/// `request_id`.
pub fn payload(base: &str, user: &str, action: &str, request_id: &str) -> Value {
    payload_from(TEAM_ID, base, user, action, request_id)
}

/// The same click from a user of workspace `team`.
pub fn payload_from(team: &str, base: &str, user: &str, action: &str, request_id: &str) -> Value {
    json!({
        "type": "block_actions",
        "team": {"id": team, "domain": "example"},
        "user": {"id": user, "username": user, "team_id": team},
        "api_app_id": "A0APP",
        "container": {"type": "message", "message_ts": "1763812800.000100", "channel_id": CHANNEL_ID},
        "channel": {"id": CHANNEL_ID, "name": "access-requests"},
        "response_url": format!("{base}/actions/{user}-{action}"),
        "actions": [{
            "action_id": action, "block_id": "twokey_decision", "type": "button",
            "value": request_id, "action_ts": "1763812801.000200"
        }]
    })
}

/// The form body Slack sends: `payload=<url-encoded JSON>`.
pub fn body(payload: &Value) -> String {
    form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", &payload.to_string())
        .finish()
}

/// `v0=` + HMAC-SHA256(secret, "v0:{ts}:{body}").
pub fn sign(secret: &str, ts: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("v0:{ts}:{body}").as_bytes());
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}
