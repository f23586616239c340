//! Slack: a message per request with Approve/Deny buttons, updated in place with the
//! outcome, and the interactivity endpoint those buttons call.
//!
//! Every interaction is checked before anything is read from it: the
//! `X-Slack-Signature` HMAC-SHA256 over `v0:timestamp:body` (constant-time), a
//! timestamp under 5 minutes old, and a signature not seen before (replay). A click
//! counts only from the pinned workspace (`slack.team_id`) and from a Slack user
//! explicitly linked to a twokey user: the first click of an unlinked user only earns
//! them a one-time link, which they confirm while signed in to twokey. The Slack
//! profile's email never names the approver (anyone who can edit profiles could pick
//! it); it is only checked once, when a link is made. The decision then goes through
//! the same `access::decide` as every other channel, so self-approval and group rules
//! hold here too.

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::access::{self, Channel, Decision};
use crate::audit::NewEvent;
use crate::config::SlackConfig;
use crate::error::{Error, Result};
use crate::policy::format_duration;
use crate::policy::{Actor, GrantStatus, OutboxStatus, RequestStatus};
use crate::state::AppState;
use crate::store::{self, OutboxRow, RequestRow};

/// Slack rejects nothing older, and neither do we.
pub const MAX_AGE_SECS: i64 = 5 * 60;

/// How long a link offered to an unlinked Slack user works.
pub const LINK_TTL_MS: i64 = 10 * 60 * 1000;

/// Prefix of Slack link tokens.
pub const LINK_PREFIX: &str = "sl_";

pub struct Slack {
    api_base: String,
    token: String,
    signing_secret: String,
    channel: String,
    team_id: String,
    http: reqwest::Client,
}

/// What Slack says about a user, for linking.
struct Profile {
    name: String,
    /// Only an email Slack says it confirmed.
    confirmed_email: Option<String>,
}

enum Body<'a> {
    Json(Value),
    Form(&'a [(&'a str, &'a str)]),
}

/// Why an interaction was refused before it was read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("missing Slack signature headers")]
    MissingHeaders,
    #[error("stale or malformed timestamp")]
    Stale,
    #[error("bad signature")]
    BadSignature,
    #[error("replayed interaction")]
    Replay,
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
            token,
            signing_secret,
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

    /// Checks signature, age and freshness of an interaction request.
    pub async fn verify(
        &self,
        state: &AppState,
        timestamp: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> std::result::Result<(), Refusal> {
        let (Some(ts), Some(sig)) = (timestamp, signature) else {
            return Err(Refusal::MissingHeaders);
        };
        let ts_num: i64 = ts.parse().map_err(|_| Refusal::Stale)?;
        if (now.timestamp() - ts_num).abs() > MAX_AGE_SECS {
            return Err(Refusal::Stale);
        }
        let Some(given) = sig.strip_prefix("v0=").and_then(|h| hex::decode(h).ok()) else {
            return Err(Refusal::BadSignature);
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(self.signing_secret.as_bytes())
            .map_err(|_| Refusal::BadSignature)?;
        mac.update(b"v0:");
        mac.update(ts.as_bytes());
        mac.update(b":");
        mac.update(body);
        // verify_slice compares in constant time.
        mac.verify_slice(&given)
            .map_err(|_| Refusal::BadSignature)?;
        let now_ms = now.timestamp_millis();
        // Keyed on the MAC bytes, not the header text: hex decoding accepts either
        // letter case, so the same signature in upper (or mixed) case must still count
        // as a replay.
        let fresh = store::first_sighting(
            &state.db,
            &replay_key(&given),
            now_ms,
            now_ms - 2 * MAX_AGE_SECS * 1000,
        )
        .await
        .map_err(|_| Refusal::Replay)?;
        if !fresh {
            return Err(Refusal::Replay);
        }
        Ok(())
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
    async fn profile(&self, slack_user: &str) -> Result<Option<Profile>> {
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

    /// The twokey user a click is from: the one the Slack user is linked to in the
    /// pinned workspace, while the Slack account is live. `Err(text)` tells the clicker
    /// why the click did not count (an unlinked user gets a one-time link).
    async fn clicker(
        &self,
        state: &AppState,
        slack_user: &str,
    ) -> Result<std::result::Result<Actor, String>> {
        let mut conn = state.db.acquire().await?;
        let linked = store::slack_link_user(&mut conn, &self.team_id, slack_user).await?;
        drop(conn);
        let Some(profile) = self.profile(slack_user).await? else {
            return Ok(Err(
                "twokey does not take decisions from this Slack account.".into(),
            ));
        };
        let Some(user_id) = linked else {
            let url = self.offer_link(state, slack_user, &profile).await?;
            return Ok(Err(format!(
                "Your Slack account is not linked to twokey yet, so this click did not count. \
                 Link it once, while signed in to twokey: <{url}|Link your Slack account> \
                 (works once, for {} minutes). Then click again.",
                LINK_TTL_MS / 60_000
            )));
        };
        let mut conn = state.db.acquire().await?;
        match store::load_actor(&mut conn, &user_id, &state.config.auth.admin_groups).await? {
            Some(actor) => Ok(Ok(actor)),
            None => Ok(Err("twokey does not know you.".into())),
        }
    }

    /// Stores a one-time link token for this Slack user and returns its URL. Only the
    /// hash is kept; the token reaches only the clicker, in an ephemeral message.
    async fn offer_link(&self, state: &AppState, slack_user: &str, p: &Profile) -> Result<String> {
        let (token, hash) = crate::auth::new_secret(LINK_PREFIX);
        let now = state.now_ms();
        let mut tx = store::begin_write(&state.db).await?;
        store::insert_slack_link_token(
            &mut tx,
            &store::NewSlackLinkToken {
                token_hash: &hash,
                team_id: &self.team_id,
                slack_user_id: slack_user,
                slack_name: &p.name,
                slack_email: p.confirmed_email.as_deref(),
                now,
                expires_at: now + LINK_TTL_MS,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(format!("{}/slack/link/{token}", state.config.public_url()))
    }

    /// Tells the clicking user why nothing happened (only they see it).
    async fn ephemeral(&self, response_url: Option<&str>, text: &str) {
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

    /// Handles a verified `block_actions` payload.
    pub async fn interact(&self, state: &AppState, payload: &Value) -> Result<()> {
        let response_url = payload["response_url"].as_str();
        let Some(action) = payload["actions"].get(0) else {
            return Ok(());
        };
        let decision = match action["action_id"].as_str() {
            Some("approve") => Decision::Approve,
            Some("deny") => Decision::Deny,
            _ => return Ok(()),
        };
        let Some(request_id) = action["value"].as_str() else {
            return Ok(());
        };
        let Some(slack_user) = payload["user"]["id"].as_str() else {
            return Ok(());
        };
        // One app (and so one signing secret) can be installed in many workspaces: a
        // click counts only from the pinned one. Every team id the payload names must
        // be it, and it must name one.
        let teams: Vec<&str> = [
            payload["team"]["id"].as_str(),
            payload["user"]["team_id"].as_str(),
        ]
        .into_iter()
        .flatten()
        .collect();
        if teams.is_empty() || teams.iter().any(|t| *t != self.team_id) {
            tracing::warn!(teams = ?teams, "slack click from another workspace refused");
            self.ephemeral(
                response_url,
                "twokey does not take decisions from this Slack workspace.",
            )
            .await;
            return Ok(());
        }
        let actor = match self.clicker(state, slack_user).await? {
            Ok(actor) => actor,
            Err(why) => {
                self.ephemeral(response_url, &why).await;
                return Ok(());
            }
        };
        match access::decide(state, &actor, request_id, decision, None, Channel::Slack).await {
            Ok(_) => {
                if let Err(e) = self.sync(state, request_id).await {
                    tracing::warn!(error = %e, "slack message update failed; the outbox will retry");
                }
            }
            Err(e @ (Error::Forbidden(_) | Error::Conflict(_) | Error::NotFound(_))) => {
                self.ephemeral(response_url, &format!("Not done: {e}"))
                    .await;
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

/// What the replay table stores for a verified signature: a hash of the decoded MAC,
/// so every spelling of one signature is one key.
fn replay_key(mac: &[u8]) -> String {
    crate::auth::hash_token(&hex::encode(mac))
}

/// Why a link token cannot be used, in words for the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRefusal {
    Unknown,
    Used,
    Expired,
}

impl LinkRefusal {
    pub fn message(self) -> &'static str {
        match self {
            LinkRefusal::Unknown => {
                "This link is not valid. Click a button in Slack again to get a new one."
            }
            LinkRefusal::Used => "This link has already been used. Each link works once.",
            LinkRefusal::Expired => {
                "This link has expired: links work for 10 minutes. Click a button in Slack again to get a new one."
            }
        }
    }
}

/// A link token that may be used now, or why not.
pub async fn check_link_token(
    state: &AppState,
    token: &str,
) -> Result<std::result::Result<store::SlackLinkTokenRow, LinkRefusal>> {
    if !token.starts_with(LINK_PREFIX) || token.len() > 128 {
        return Ok(Err(LinkRefusal::Unknown));
    }
    let hash = crate::auth::hash_token(token);
    let mut conn = state.db.acquire().await?;
    let row = store::slack_link_token(&mut conn, &hash)
        .await?
        // Found by hash; compare in constant time anyway.
        .filter(|r| crate::auth::secrets_equal(&r.token_hash, &hash));
    Ok(match row {
        None => Err(LinkRefusal::Unknown),
        Some(r) if r.used_at.is_some() => Err(LinkRefusal::Used),
        Some(r) if r.expires_at <= state.now_ms() => Err(LinkRefusal::Expired),
        Some(r) => Ok(r),
    })
}

/// Why `actor` may not take this link, if they may not: the Slack account's confirmed
/// email must be theirs. Without this, any Slack user could send their own link to a
/// twokey user and have it confirmed by mistake; with it, only someone who can also
/// set Slack emails could try, and the person must still confirm while signed in.
pub fn link_mismatch(row: &store::SlackLinkTokenRow, actor: &Actor) -> Option<String> {
    match &row.slack_email {
        Some(email) if email.eq_ignore_ascii_case(&actor.email) => None,
        Some(email) => Some(format!(
            "This Slack account's email is {email}, not {}: twokey links a Slack account only to the twokey user with the same email. Sign in as that user, or ask a Slack admin to fix the email.",
            actor.email
        )),
        None => Some(
            "Slack has not confirmed this Slack account's email, so twokey cannot link it to you."
                .into(),
        ),
    }
}

/// The signed-in `actor` confirmed a link: the token is used up and the Slack user
/// bound to them, with its audit event, in one transaction.
pub async fn link(state: &AppState, actor: &Actor, token: &str) -> Result<store::SlackLinkRow> {
    let row = match check_link_token(state, token).await? {
        Ok(row) => row,
        Err(refusal) => return Err(Error::conflict(refusal.message())),
    };
    if let Some(why) = link_mismatch(&row, actor) {
        return Err(Error::forbidden(why));
    }
    let now = state.now_ms();
    let mut tx = store::begin_write(&state.db).await?;
    if !store::consume_slack_link_token(&mut tx, &row.token_hash, now).await? {
        return Err(Error::conflict(LinkRefusal::Used.message()));
    }
    if !store::insert_slack_link(
        &mut tx,
        &row.team_id,
        &row.slack_user_id,
        &actor.user_id,
        now,
    )
    .await?
    {
        return Err(Error::conflict(
            "this Slack account, or your twokey account, is already linked in this workspace: unlink the old link on your Account page first",
        ));
    }
    crate::audit::append(
        &mut tx,
        now,
        &NewEvent {
            actor: &actor.email,
            action: "slack.linked",
            subject: &actor.user_id,
            details: json!({
                "by": actor.identity(),
                "team_id": row.team_id,
                "slack_user_id": row.slack_user_id,
                "slack_email": row.slack_email,
            }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(store::SlackLinkRow {
        team_id: row.team_id,
        slack_user_id: row.slack_user_id,
        user_id: actor.user_id.clone(),
        created_at: now,
    })
}

/// The user removes their own link; from then on that Slack account's clicks count for
/// nobody until it is linked again.
pub async fn unlink(
    state: &AppState,
    actor: &Actor,
    team_id: &str,
    slack_user_id: &str,
) -> Result<()> {
    let now = state.now_ms();
    let mut tx = store::begin_write(&state.db).await?;
    if !store::delete_slack_link(&mut tx, team_id, slack_user_id, &actor.user_id).await? {
        return Err(Error::NotFound("Slack link"));
    }
    crate::audit::append(
        &mut tx,
        now,
        &NewEvent {
            actor: &actor.email,
            action: "slack.unlinked",
            subject: &actor.user_id,
            details: json!({
                "by": actor.identity(),
                "team_id": team_id,
                "slack_user_id": slack_user_id,
            }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(())
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
    fn every_spelling_of_a_signature_is_one_replay_key() {
        let lower = hex::decode("0a1bff").unwrap();
        let upper = hex::decode("0A1BFF").unwrap();
        let mixed = hex::decode("0a1BfF").unwrap();
        assert_eq!(replay_key(&lower), replay_key(&upper));
        assert_eq!(replay_key(&lower), replay_key(&mixed));
        assert_ne!(replay_key(&lower), replay_key(&[0x0a, 0x1b, 0xfe]));
    }

    #[test]
    fn mrkdwn_is_escaped() {
        assert_eq!(
            escape("<!channel> & <@U1>"),
            "&lt;!channel&gt; &amp; &lt;@U1&gt;"
        );
    }
}
