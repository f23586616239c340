//! The Slack Web API client: the bot token and signing secret (which never leave this
//! type), the calls twokey makes (`chat.postMessage`/`chat.update` through
//! [`super`], `users.info`, the ephemeral reply), and which callback URLs may be called.
//! Holds no state of twokey's and decides nothing.

use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::config::SlackConfig;
use crate::error::{Error, Result};

/// The Slack client: the bot token, the signing secret, the channel and the pinned
/// workspace, from `[slack]`.
pub struct Slack {
    api_base: String,
    token: String,
    signing_secret: String,
    pub(super) channel: String,
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

pub(super) fn escape(s: &str) -> String {
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

    pub(super) async fn api(&self, method: &str, body: Value) -> Result<Value> {
        self.call(method, Body::Json(body)).await
    }

    async fn api_form(&self, method: &str, args: &[(&str, &str)]) -> Result<Value> {
        self.call(method, Body::Form(args)).await
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
