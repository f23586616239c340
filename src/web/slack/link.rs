//! Linking a Slack account to a twokey user: the one-time link token offered to an
//! unlinked clicker, its check, the signed-in user's confirmation (the token used up and
//! the link made, with its audit event, in one transaction) and unlinking. Only the
//! token's hash is stored, and it is compared in constant time. What this module must
//! never do: link on anything but a signed-in user's POST, or to a user whose email is
//! not the one Slack confirmed for the account.

use serde_json::json;

use crate::audit::NewEvent;
use crate::error::{Error, Result};
use crate::notify::slack::{Profile, Slack};
use crate::policy::Actor;
use crate::state::AppState;
use crate::store;

/// How long a link offered to an unlinked Slack user works.
pub const LINK_TTL_MS: i64 = 10 * 60 * 1000;

/// Prefix of Slack link tokens.
pub const LINK_PREFIX: &str = "sl_";

/// Stores a one-time link token for this Slack user and returns its URL. Only the
/// hash is kept; the token reaches only the clicker, in an ephemeral message.
pub(super) async fn offer_link(
    slack: &Slack,
    state: &AppState,
    slack_user: &str,
    p: &Profile,
) -> Result<String> {
    let (token, hash) = crate::auth::secret::new_secret(LINK_PREFIX);
    let now = state.now_ms();
    let mut tx = store::begin_write(&state.db).await?;
    store::insert_slack_link_token(
        &mut tx,
        &store::NewSlackLinkToken {
            token_hash: &hash,
            team_id: slack.team_id(),
            slack_user_id: slack_user,
            slack_name: &p.name,
            slack_email: p.confirmed_email.as_deref(),
            now,
            expires_at: now + LINK_TTL_MS,
        },
    )
    .await?;
    tx.commit().await?;
    Ok(format!(
        "{}/slack/link/{token}",
        state.config().public_url()
    ))
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
