//! Slack, outbound: a message per request with Approve/Deny buttons, posted by the
//! outbox and updated in place with the outcome, and the other calls twokey makes to
//! Slack (`users.info` when a clicker is looked up, the ephemeral reply that tells a
//! clicker why a click did not count).
//!
//! Slack's calls to twokey (the button clicks: signature, payload, decision; linking a
//! Slack account) are handled in `web::slack`. What this module must never do: take a
//! decision (it does not import `access`), or let the bot token or signing secret out
//! of [`Slack`] — `web::slack` gets a keyed MAC, never the secret.

pub mod client;

use serde_json::{Value, json};

pub(crate) use client::Profile;
use client::escape;
pub use client::{Slack, response_url_allowed};

use crate::error::{Error, Result};
use crate::policy::format_duration;
use crate::policy::{Decision, GrantStatus, HeldStatus, OutboxStatus, RequestStatus};
use crate::state::AppState;
use crate::store::{self, OutboxRow, RequestRow};

impl Slack {
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
            state.config().public_url(),
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

    /// Posts a held action that waits for review: who, where, why, its parse and until
    /// when, and a link to its page, where a signed-in approver reads the text and
    /// parameters (never in Slack) and decides. False when it no longer waits.
    pub async fn post_held(&self, state: &AppState, held_id: &str) -> Result<bool> {
        let mut conn = state.db.acquire().await?;
        let Some(h) = store::get_held(&mut conn, held_id).await? else {
            return Ok(false);
        };
        drop(conn);
        if h.status != HeldStatus::Pending || h.expires_at <= state.now_ms() {
            return Ok(false);
        }
        let m = crate::notify::HeldVm::of(state, &h);
        let text = format!(
            "{} sent a {} on {} that waits for review",
            m.requester, m.what, m.resource
        );
        let mut summary = format!(
            "*{}* sent a {} on *{}* ({}) that waits for review: {}",
            escape(&m.requester),
            m.what,
            escape(&m.resource),
            escape(&m.role),
            escape(&m.why)
        );
        if !m.parse.is_empty() {
            summary.push_str(&format!("\nIt is: {}", escape(&m.parse)));
        }
        summary.push_str(&format!("\nWaits until {}", m.until));
        let blocks = json!([
            {"type": "section", "text": {"type": "mrkdwn", "text": summary}},
            // No decision from Slack: the statement is not in the message, and an
            // approver decides what they have read, on its page.
            {"type": "actions", "block_id": "twokey_held", "elements": [
                {"type": "button", "action_id": "held_open", "style": "primary",
                 "text": {"type": "plain_text", "text": "Read and decide in twokey"},
                 "url": m.url},
            ]},
        ]);
        self.api(
            "chat.postMessage",
            json!({"channel": self.channel, "text": text, "blocks": blocks}),
        )
        .await?;
        Ok(true)
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
}

/// Delivers a Slack outbox row: the first posts the message, later ones update it.
pub async fn deliver(state: &AppState, slack: &Slack, row: &OutboxRow) -> Result<bool> {
    let done = if row.kind == "held_needed" {
        slack.post_held(state, &row.held_id).await?
    } else {
        slack.sync(state, &row.request_id).await?
    };
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
