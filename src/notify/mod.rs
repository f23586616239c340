//! Notifications: the outbox worker, email (lettre), and single-use action links.
//!
//! Rows enter the outbox in the same transaction as the event that causes them
//! (`access`), so a message is never lost; this worker delivers them, retrying with
//! backoff while SMTP is down, and never blocks a request. Action links are minted
//! here, at delivery, and only their hashes are stored.
//!
//! Never log or store a link token, and never let a link change state by itself: the
//! link leads to a confirm page; acting needs the approver's signed-in POST.

use std::sync::Arc;

use askama::Template;
use lettre::message::{Mailbox, MultiPart, header};
use lettre::{AsyncTransport, Message};

use crate::clock::from_millis;
use crate::error::{Error, Result};
use crate::policy::{Decision, OutboxStatus, RequestStatus, format_duration};
use crate::state::AppState;
use crate::store::{self, HeldRow, OutboxRow, RequestRow};

pub mod email;
pub mod slack;

pub use email::Mailer;

/// How long an emailed action link works.
pub const LINK_TTL_MS: i64 = 10 * 60 * 1000;
/// How long a worker holds a message it is sending before another may retry it.
const LEASE_MS: i64 = 60 * 1000;
/// Longest wait between two attempts.
const MAX_BACKOFF_MS: i64 = 5 * 60 * 1000;

/// One rendered email.
pub struct Email {
    pub subject: String,
    pub text: String,
    pub html: String,
}

#[derive(Template)]
#[template(path = "email/approval_needed.txt")]
struct ApprovalText<'a> {
    r: &'a MailVm,
}

#[derive(Template)]
#[template(path = "email/approval_needed.html")]
struct ApprovalHtml<'a> {
    r: &'a MailVm,
}

#[derive(Template)]
#[template(path = "email/outcome.txt")]
struct OutcomeText<'a> {
    r: &'a MailVm,
}

#[derive(Template)]
#[template(path = "email/outcome.html")]
struct OutcomeHtml<'a> {
    r: &'a MailVm,
}

#[derive(Template)]
#[template(path = "email/held_needed.txt")]
struct HeldText<'a> {
    h: &'a HeldVm,
}

#[derive(Template)]
#[template(path = "email/held_needed.html")]
struct HeldHtml<'a> {
    h: &'a HeldVm,
}

/// What a message says about a held action: never its text or parameters, which an
/// approver reads only on its page, signed in.
pub struct HeldVm {
    pub requester: String,
    pub resource: String,
    pub role: String,
    /// "statement" or "command".
    pub what: &'static str,
    pub why: String,
    /// Its parse in words, e.g. "DELETE on orders".
    pub parse: String,
    pub until: String,
    pub url: String,
}

impl HeldVm {
    pub fn of(state: &AppState, h: &HeldRow) -> HeldVm {
        let p = h.parse();
        let mut parse = p.kinds.join(", ");
        if !p.tables.is_empty() {
            parse = format!("{parse} on {}", p.tables.join(", "));
        }
        HeldVm {
            requester: h.requester_email.clone(),
            resource: h.resource.clone(),
            role: h.role.clone(),
            what: if h.protocol == "ssh" {
                "command"
            } else {
                "statement"
            },
            why: h.why.clone(),
            parse,
            until: from_millis(h.expires_at)
                .format("%Y-%m-%d %H:%M:%S UTC")
                .to_string(),
            url: format!("{}/held/{}", state.config().public_url(), h.id),
        }
    }
}

/// What a message says about a request.
pub struct MailVm {
    pub requester: String,
    pub resource: String,
    pub role: String,
    pub duration: String,
    pub reason: String,
    pub ticket: String,
    pub request_url: String,
    pub approve_url: String,
    pub deny_url: String,
    pub outcome: String,
    pub detail: String,
}

fn vm(state: &AppState, r: &RequestRow) -> MailVm {
    MailVm {
        requester: r.requester_email.clone(),
        resource: r.resource.clone(),
        role: r.role.clone(),
        duration: format_duration(std::time::Duration::from_secs(r.duration_secs as u64)),
        reason: r.reason.clone(),
        ticket: r.ticket.clone().unwrap_or_default(),
        request_url: format!("{}/requests/{}", state.config().public_url(), r.id),
        approve_url: String::new(),
        deny_url: String::new(),
        outcome: String::new(),
        detail: String::new(),
    }
}

fn render<T: Template>(t: T) -> Result<String> {
    t.render()
        .map_err(|e| Error::Internal(format!("template: {e}")))
}

/// What to send for an outbox row, or `None` when it is no longer worth sending (an
/// approval request for a request already decided).
async fn compose(state: &AppState, row: &OutboxRow) -> Result<Option<Email>> {
    let mut conn = state.db.acquire().await?;
    if row.kind == "held_needed" {
        let Some(h) = store::get_held(&mut conn, &row.held_id).await? else {
            return Ok(None);
        };
        if h.status != crate::policy::HeldStatus::Pending || h.expires_at <= state.now_ms() {
            return Ok(None);
        }
        let m = HeldVm::of(state, &h);
        return Ok(Some(Email {
            subject: format!(
                "Review a {} by {} on {}? (waits until {})",
                m.what, m.requester, m.resource, m.until
            ),
            text: render(HeldText { h: &m })?,
            html: render(HeldHtml { h: &m })?,
        }));
    }
    let Some(req) = store::get_request(&mut conn, &row.request_id).await? else {
        return Ok(None);
    };
    drop(conn);
    let now = state.now_ms();
    let mut m = vm(state, &req);
    match row.kind.as_str() {
        "approval_needed" => {
            if req.status != RequestStatus::Pending || req.expires_at <= now {
                return Ok(None);
            }
            // Fresh single-use links for this approver; only hashes are stored.
            let mut tx = store::begin_write(&state.db).await?;
            for &action in Decision::ALL {
                let (token, hash) = crate::auth::secret::new_secret("ak_");
                store::insert_action_token(
                    &mut tx,
                    &hash,
                    &req.id,
                    row.recipient_id.as_deref().unwrap_or_default(),
                    action.as_str(),
                    now,
                    now + LINK_TTL_MS,
                )
                .await?;
                let url = format!("{}/a/{}", state.config().public_url(), token);
                if action == Decision::Approve {
                    m.approve_url = url;
                } else {
                    m.deny_url = url;
                }
            }
            tx.commit().await?;
            Ok(Some(Email {
                subject: format!(
                    "Approve {} on {} for {}? ({})",
                    req.role, req.resource, m.requester, m.duration
                ),
                text: render(ApprovalText { r: &m })?,
                html: render(ApprovalHtml { r: &m })?,
            }))
        }
        kind => {
            let (outcome, detail) = outcome_words(state, &req, kind).await?;
            m.outcome = outcome;
            m.detail = detail;
            Ok(Some(Email {
                subject: format!(
                    "Your request for {} on {} was {}",
                    req.role, req.resource, m.outcome
                ),
                text: render(OutcomeText { r: &m })?,
                html: render(OutcomeHtml { r: &m })?,
            }))
        }
    }
}

async fn outcome_words(state: &AppState, req: &RequestRow, kind: &str) -> Result<(String, String)> {
    let mut conn = state.db.acquire().await?;
    let grant = store::grant_for_request(&mut conn, &req.id).await?;
    let approvals = store::approvals_for(&mut conn, &req.id).await?;
    let when = |ms: i64| from_millis(ms).format("%Y-%m-%d %H:%M UTC").to_string();
    Ok(match kind {
        "approved" => (
            "approved".into(),
            match grant {
                Some(g) => format!(
                    "Your access runs from {} to {}.",
                    when(g.starts_at),
                    when(g.ends_at)
                ),
                None => String::new(),
            },
        ),
        "denied" => {
            let d = approvals.iter().find(|a| a.decision == Decision::Deny);
            (
                "denied".into(),
                match d {
                    Some(a) => format!(
                        "Denied by {}{}",
                        a.approver_email,
                        a.comment
                            .as_deref()
                            .map(|c| format!(": {c}"))
                            .unwrap_or_default()
                    ),
                    None => String::new(),
                },
            )
        }
        "expired" => ("not decided in time and has expired".into(), String::new()),
        _ => (
            "revoked".into(),
            match grant {
                // A revocation twokey made itself (the holder's groups changed) has
                // nobody to name: the mail says so instead of "Revoked by : …".
                Some(g) => match g.ended_by_email.filter(|e| !e.is_empty()) {
                    Some(who) => format!(
                        "Revoked by {who}{}",
                        g.end_comment.map(|c| format!(": {c}")).unwrap_or_default()
                    ),
                    None => format!(
                        "Revoked by twokey{}",
                        g.end_comment.map(|c| format!(": {c}")).unwrap_or_default()
                    ),
                },
                None => String::new(),
            },
        ),
    })
}

fn backoff_ms(attempts: i64) -> i64 {
    let exp = attempts.clamp(0, 16) as u32;
    (1000i64 << exp).min(MAX_BACKOFF_MS)
}

/// What one pass of the worker did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delivered {
    pub sent: usize,
    pub skipped: usize,
    pub failed: usize,
}

/// Delivers every due message once. Safe to run from several workers at once: each
/// message is claimed before it is sent.
pub async fn deliver_due(state: &AppState) -> Result<Delivered> {
    if state.mailer.is_none() && state.slack.is_none() {
        return Ok(Delivered::default());
    }
    let mut out = Delivered::default();
    let now = state.now_ms();
    for row in store::due_outbox(&state.db, now, 100).await? {
        if !store::claim_outbox(&state.db, &row.id, now, LEASE_MS).await? {
            continue;
        }
        let result = match row.channel.as_str() {
            "slack" => match &state.slack {
                Some(slack) => slack::deliver(state, slack, &row).await,
                None => Err(Error::Internal("slack is not configured".into())),
            },
            _ => match &state.mailer {
                Some(mailer) => deliver(state, mailer, &row).await,
                None => Err(Error::Internal("email is not configured".into())),
            },
        };
        match result {
            Ok(true) => out.sent += 1,
            Ok(false) => out.skipped += 1,
            Err(e) => {
                out.failed += 1;
                let msg = e.to_string();
                tracing::warn!(outbox = %row.id, attempt = row.attempts + 1, error = %msg, "delivery failed; will retry");
                store::retry_outbox(&state.db, &row.id, now + backoff_ms(row.attempts), &msg)
                    .await?;
            }
        }
    }
    Ok(out)
}

/// Sends one message; `Ok(false)` when it was no longer needed.
async fn deliver(state: &AppState, mailer: &Arc<Mailer>, row: &OutboxRow) -> Result<bool> {
    let now = state.now_ms();
    let Some(email) = compose(state, row).await? else {
        let mut conn = state.db.acquire().await?;
        store::finish_outbox(&mut conn, &row.id, OutboxStatus::Skipped, now).await?;
        return Ok(false);
    };
    match mailer.as_ref() {
        Mailer::DevMailbox => {
            let mut tx = store::begin_write(&state.db).await?;
            store::dev_mail(
                &mut tx,
                &row.id,
                &row.recipient,
                &email.subject,
                &email.text,
                &email.html,
                now,
            )
            .await?;
            store::finish_outbox(&mut tx, &row.id, OutboxStatus::Sent, now).await?;
            tx.commit().await?;
        }
        Mailer::Smtp { transport, from } => {
            let to: Mailbox = row
                .recipient
                .parse()
                .map_err(|e| Error::Internal(format!("recipient address: {e}")))?;
            let message = Message::builder()
                .from(from.clone())
                .to(to)
                .subject(email.subject)
                // One Message-ID per outbox row: a retried message is recognisably the same.
                .message_id(Some(format!("<{}@twokey>", row.id)))
                .header(header::ContentType::TEXT_PLAIN)
                .multipart(MultiPart::alternative_plain_html(email.text, email.html))
                .map_err(|e| Error::Internal(format!("building the message: {e}")))?;
            transport
                .send(message)
                .await
                .map_err(|e| Error::Internal(format!("smtp: {e}")))?;
            let mut conn = state.db.acquire().await?;
            store::finish_outbox(&mut conn, &row.id, OutboxStatus::Sent, now).await?;
        }
    }
    tracing::info!(outbox = %row.id, kind = %row.kind, to = %row.recipient, "notification delivered");
    Ok(true)
}

/// Queues the messages an event causes, inside the event's transaction. Does nothing
/// for a channel that is not configured.
pub async fn enqueue_for(
    state: &AppState,
    conn: &mut store::Conn,
    req: &RequestRow,
    kind: &str,
    now: i64,
) -> Result<()> {
    // The requester cancelled it themselves: no mail; only the Slack message changes.
    if state.mailer.is_some() && kind != "cancelled" {
        if kind == "approval_needed" {
            if let Some((_, role)) = state.config().role(&req.resource, &req.role) {
                for (id, email) in
                    store::users_in_groups(conn, &role.approver_groups, &req.requester_id).await?
                {
                    store::enqueue(conn, &req.id, kind, "email", Some(&id), &email, now).await?;
                }
            }
        } else {
            let (id, email) = (&req.requester_id, &req.requester_email);
            store::enqueue(conn, &req.id, kind, "email", Some(id), email, now).await?;
        }
    }
    if let Some(slack) = &state.slack {
        // One message per request in the channel, updated in place with the outcome.
        store::enqueue(conn, &req.id, kind, "slack", None, slack.channel(), now).await?;
    }
    Ok(())
}

/// Queues the messages a held action causes, inside its filing's transaction: each of
/// the role's approvers (never its sender) by email, and the Slack channel.
pub async fn enqueue_held(
    state: &AppState,
    conn: &mut store::Conn,
    h: &HeldRow,
    role: &crate::config::RoleConfig,
    now: i64,
) -> Result<()> {
    let kind = "held_needed";
    if state.mailer.is_some() {
        for (id, email) in
            store::users_in_groups(conn, &role.approver_groups, &h.requester_id).await?
        {
            store::enqueue_about(
                conn,
                &h.request_id,
                &h.id,
                kind,
                "email",
                Some(&id),
                &email,
                now,
            )
            .await?;
        }
    }
    if let Some(slack) = &state.slack {
        store::enqueue_about(
            conn,
            &h.request_id,
            &h.id,
            kind,
            "slack",
            None,
            slack.channel(),
            now,
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff_ms(0), 1000);
        assert_eq!(backoff_ms(3), 8000);
        assert_eq!(backoff_ms(40), MAX_BACKOFF_MS);
    }
}
