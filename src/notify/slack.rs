//! Slack, outbound: a message per request with Approve/Deny buttons, posted by the
//! outbox and updated in place with the outcome, and the other calls twokey makes to
//! Slack (`users.info` when a clicker is looked up, the ephemeral reply that tells a
//! clicker why a click did not count).
//!
//! Slack's calls to twokey (the button clicks: signature, payload, decision; linking a
//! Slack account) are handled in `web::slack`. What this module must never do: take a
//! decision (it does not import `access`), or let the bot token or signing secret out
//! of [`Slack`] — `web::slack` gets a keyed MAC, never the secret.

use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::config::SlackConfig;
use crate::error::{Error, Result};
use crate::policy::format_duration;
use crate::policy::{Decision, GrantStatus, OutboxStatus, RequestStatus};
use crate::state::AppState;
use crate::store::{self, OutboxRow, RequestRow};

/// The Slack client: the bot token, the signing secret, the channel and the pinned
/// workspace, from `[slack]`.
pub struct Slack {
    api_base: String,
    token: String,
    signing_secret: String,
    channel: String,
    team_id: String,
    http: reqwest::Client,
}

/// What Slack says about a user, for linking.
pub(crate) struct Profile {
    pub(crate) name: String,
    /// Only an email Slack says it confirmed.
    pub(crate) confirmed_email: Option<String>,
}

enum Body<'a> {
    Json(Value),
    Form(&'a [(&'a str, &'a str)]),
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Slack {
    pub fn new(config: &SlackConfig) -> Result<Self> {
        let (token, signing_secret) = config
            .secrets()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| Error::Internal(format!("http client: {e}")))?;
        Ok(Slack {
            api_base: config.api_base.trim_end_matches('/').to_string(),
            token: token.expose().to_string(),
            signing_secret: signing_secret.expose().to_string(),
            channel: config.channel.clone(),
            team_id: config.team_id.clone(),
            http,
        })
    }

    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The pinned workspace.
    pub fn team_id(&self) -> &str {
        &self.team_id
    }

    /// A MAC keyed with the signing secret, for `web::slack` to check that a request
    /// came from Slack. Why a MAC and not the secret: the secret never leaves this type,
    /// so no caller can log or echo it.
    pub fn signing_mac(&self) -> std::result::Result<Hmac<Sha256>, hmac::digest::InvalidLength> {
        Hmac::<Sha256>::new_from_slice(self.signing_secret.as_bytes())
    }

    /// Calls a Web API method: write methods take JSON, read methods (`users.info`)
    /// form-encoded arguments, as Slack documents them. Slack answers HTTP 200 with
    /// `ok: false` on errors; anything but a 2xx (an outage, rate limiting) is an error
    /// too, and the outbox retries it.
    async fn call(&self, method: &str, body: Body<'_>) -> Result<Value> {
        let req = self
            .http
            .post(format!("{}/{method}", self.api_base))
            .bearer_auth(&self.token);
        let req = match body {
            Body::Json(v) => req.json(&v),
            Body::Form(args) => req.form(args),
        };
        let fail = |what: String| Error::Internal(format!("slack {method}: {what}"));
        let resp = req
            .send()
            .await
            .map_err(|e| fail(e.without_url().to_string()))?;
        if !resp.status().is_success() {
            return Err(fail(format!("HTTP {}", resp.status().as_u16())));
        }
        let v: Value = resp
            .json()
            .await
            .map_err(|e| fail(e.without_url().to_string()))?;
        if v["ok"] != Value::Bool(true) {
            return Err(fail(v["error"].as_str().unwrap_or("unknown_error").into()));
        }
        Ok(v)
    }

    async fn api(&self, method: &str, body: Value) -> Result<Value> {
        self.call(method, Body::Json(body)).await
    }

    async fn api_form(&self, method: &str, args: &[(&str, &str)]) -> Result<Value> {
        self.call(method, Body::Form(args)).await
    }

    /// The message for a request as it stands now.
    async fn blocks(&self, state: &AppState, req: &RequestRow) -> Result<(String, Value)> {
        let mut conn = state.db.acquire().await?;
        let approvals = store::approvals_for(&mut conn, &req.id).await?;
        let grant = store::grant_for_request(&mut conn, &req.id).await?;
        drop(conn);
        let duration = format_duration(std::time::Duration::from_secs(req.duration_secs as u64));
        let text = format!(
            "{} asks for {} on {} for {}",
            req.requester_email, req.role, req.resource, duration
        );
        let mut summary = format!(
            "*{}* asks for *{}* on *{}* for *{}*\n>{}",
            escape(&req.requester_email),
            escape(&req.role),
            escape(&req.resource),
            duration,
            escape(&req.reason)
        );
        if let Some(t) = &req.ticket {
            summary.push_str(&format!("\nTicket: {}", escape(t)));
        }
        let hhmm = |ms: i64| {
            crate::clock::from_millis(ms)
                .format("%H:%M UTC")
                .to_string()
        };
        let who = |decision: Decision| {
            approvals
                .iter()
                .filter(|a| a.decision == decision)
                .map(|a| format!("{} at {}", a.approver_email, hhmm(a.created_at)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let now = state.now_ms();
        let status = if req.status == RequestStatus::Pending && req.expires_at <= now {
            RequestStatus::Expired
        } else {
            req.status
        };
        let outcome = match status {
            RequestStatus::Approved => match &grant {
                Some(g) if g.status == GrantStatus::Revoked => format!(
                    ":no_entry: Approved by {}; revoked by {}",
                    who(Decision::Approve),
                    g.ended_by_email.clone().unwrap_or_default()
                ),
                _ => format!(":white_check_mark: Approved by {}", who(Decision::Approve)),
            },
            RequestStatus::Denied => format!(":x: Denied by {}", who(Decision::Deny)),
            RequestStatus::Cancelled => "Cancelled by the requester".to_string(),
            RequestStatus::Expired => "Expired without a decision".to_string(),
            RequestStatus::Pending if !approvals.is_empty() => {
                format!("Approved so far by {}", who(Decision::Approve))
            }
            RequestStatus::Pending => String::new(),
        };
        let link = format!(
            "<{}/requests/{}|Open in twokey>",
            state.config.public_url(),
            req.id
        );
        let mut blocks =
            vec![json!({"type": "section", "text": {"type": "mrkdwn", "text": summary}})];
        if status == RequestStatus::Pending {
            blocks.push(json!({
                "type": "actions",
                "block_id": "twokey_decision",
                "elements": [
                    {"type": "button", "action_id": "approve", "style": "primary",
                     "text": {"type": "plain_text", "text": "Approve"}, "value": req.id},
                    {"type": "button", "action_id": "deny", "style": "danger",
                     "text": {"type": "plain_text", "text": "Deny"}, "value": req.id},
                ]
            }));
        }
        let context = if outcome.is_empty() {
            link
        } else {
            format!("{} · {}", escape(&outcome), link)
        };
        blocks.push(json!({"type": "context", "elements": [{"type": "mrkdwn", "text": context}]}));
        Ok((text, Value::Array(blocks)))
    }

    /// Posts a new request, or brings its message up to date.
    pub async fn sync(&self, state: &AppState, request_id: &str) -> Result<bool> {
        let mut conn = state.db.acquire().await?;
        let Some(req) = store::get_request(&mut conn, request_id).await? else {
            return Ok(false);
        };
        drop(conn);
        let (text, blocks) = self.blocks(state, &req).await?;
        match store::slack_message(&state.db, request_id).await? {
            Some((channel, ts)) => {
                self.api(
                    "chat.update",
                    json!({"channel": channel, "ts": ts, "text": text, "blocks": blocks}),
                )
                .await?;
            }
            None => {
                if req.status != RequestStatus::Pending {
                    return Ok(false);
                }
                let v = self
                    .api(
                        "chat.postMessage",
                        json!({"channel": self.channel, "text": text, "blocks": blocks}),
                    )
                    .await?;
                let (Some(channel), Some(ts)) = (v["channel"].as_str(), v["ts"].as_str()) else {
                    return Err(Error::Internal(
                        "slack chat.postMessage: no channel/ts".into(),
                    ));
                };
                let mut conn = state.db.acquire().await?;
                store::save_slack_message(&mut conn, request_id, channel, ts).await?;
            }
        }
        Ok(true)
    }

    /// A Slack user as `users.info` describes them, or `None` for an unknown,
    /// deactivated or bot account (nobody, whatever they are linked to).
    pub(crate) async fn profile(&self, slack_user: &str) -> Result<Option<Profile>> {
        let v = match self.api_form("users.info", &[("user", slack_user)]).await {
            Ok(v) => v,
            Err(Error::Internal(msg)) if msg.ends_with("user_not_found") => return Ok(None),
            Err(e) => return Err(e),
        };
        let user = &v["user"];
        if user["deleted"] == Value::Bool(true) || user["is_bot"] == Value::Bool(true) {
            return Ok(None);
        }
        let name = [
            &user["profile"]["display_name"],
            &user["real_name"],
            &user["name"],
        ]
        .into_iter()
        .filter_map(|v| v.as_str())
        .find(|s| !s.trim().is_empty())
        .unwrap_or(slack_user)
        .chars()
        .take(80)
        .collect();
        // A missing flag is not a yes.
        let confirmed_email = if user["is_email_confirmed"] == Value::Bool(true) {
            user["profile"]["email"].as_str().map(str::to_string)
        } else {
            None
        };
        Ok(Some(Profile {
            name,
            confirmed_email,
        }))
    }

    /// Tells the clicking user why nothing happened (only they see it).
    pub(crate) async fn ephemeral(&self, response_url: Option<&str>, text: &str) {
        let Some(url) = response_url else { return };
        if !response_url_allowed(&self.api_base, url) {
            tracing::warn!("slack response_url outside Slack ignored");
            return;
        }
        let body = json!({"response_type": "ephemeral", "replace_original": false, "text": text});
        if let Err(e) = self.http.post(url).json(&body).send().await {
            tracing::warn!(error = %e.without_url(), "slack response_url failed");
        }
    }
}

/// Only Slack's own hooks (or the configured API host, for tests) may be called back:
/// never an attacker-chosen URL, even in a signed payload.
pub fn response_url_allowed(api_base: &str, url: &str) -> bool {
    let origin = |u: &str| {
        reqwest::Url::parse(u)
            .ok()
            .map(|u| u.origin().ascii_serialization())
    };
    let Some(target) = origin(url) else {
        return false;
    };
    target == "https://hooks.slack.com" || origin(api_base).is_some_and(|api| api == target)
}

/// Delivers a Slack outbox row: the first posts the message, later ones update it.
pub async fn deliver(state: &AppState, slack: &Slack, row: &OutboxRow) -> Result<bool> {
    let done = slack.sync(state, &row.request_id).await?;
    let mut conn = state.db.acquire().await?;
    store::finish_outbox(
        &mut conn,
        &row.id,
        if done {
            OutboxStatus::Sent
        } else {
            OutboxStatus::Skipped
        },
        state.now_ms(),
    )
    .await?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_urls_must_be_slacks() {
        let api = "https://slack.com/api";
        assert!(response_url_allowed(
            api,
            "https://hooks.slack.com/actions/T/1/x"
        ));
        assert!(response_url_allowed(
            "http://127.0.0.1:4000/api",
            "http://127.0.0.1:4000/actions/x"
        ));
        for bad in [
            "http://hooks.slack.com/actions/x",
            "https://hooks.slack.com.evil.example/x",
            "https://evil.example/https://hooks.slack.com/",
            "http://127.0.0.1:4001/actions/x",
            "not a url",
        ] {
            assert!(!response_url_allowed(api, bad), "{bad}");
            assert!(
                !response_url_allowed("http://127.0.0.1:4000/api", bad),
                "{bad}"
            );
        }
    }

    #[test]
    fn mrkdwn_is_escaped() {
        assert_eq!(
            escape("<!channel> & <@U1>"),
            "&lt;!channel&gt; &amp; &lt;@U1&gt;"
        );
    }
}
