//! What a verified click on Approve or Deny does: the payload is read, the click counts
//! only from the pinned workspace (`slack.team_id`) and from a Slack user explicitly
//! linked to a twokey user (the first click of an unlinked user only earns them a
//! one-time link, see [`super::link`]), and the decision then goes through the same
//! `access::decide` as every other channel, so self-approval and group rules hold here
//! too. Refusals are told to the clicking user alone, in an ephemeral reply.
//!
//! The Slack profile's email never names the approver (anyone who can edit profiles
//! could pick it); it is only checked once, when a link is made. What this module must
//! never do: act on a payload [`super::verify`] has not passed.

use serde_json::Value;

use super::link::{self, LINK_TTL_MS};
use crate::access::{self, Channel, Decision};
use crate::error::{Error, Result};
use crate::notify::slack::Slack;
use crate::policy::Actor;
use crate::state::AppState;
use crate::store;

/// The twokey user a click is from: the one the Slack user is linked to in the
/// pinned workspace, while the Slack account is live. `Err(text)` tells the clicker
/// why the click did not count (an unlinked user gets a one-time link).
async fn clicker(
    slack: &Slack,
    state: &AppState,
    slack_user: &str,
) -> Result<std::result::Result<Actor, String>> {
    let mut conn = state.db.acquire().await?;
    let linked = store::slack_link_user(&mut conn, slack.team_id(), slack_user).await?;
    drop(conn);
    let Some(profile) = slack.profile(slack_user).await? else {
        return Ok(Err(
            "twokey does not take decisions from this Slack account.".into(),
        ));
    };
    let Some(user_id) = linked else {
        let url = link::offer_link(slack, state, slack_user, &profile).await?;
        return Ok(Err(format!(
            "Your Slack account is not linked to twokey yet, so this click did not count. \
             Link it once, while signed in to twokey: <{url}|Link your Slack account> \
             (works once, for {} minutes). Then click again.",
            LINK_TTL_MS / 60_000
        )));
    };
    let mut conn = state.db.acquire().await?;
    match store::load_actor(&mut conn, &user_id, &state.config().auth.admin_groups).await? {
        Some(actor) => Ok(Ok(actor)),
        None => Ok(Err("twokey does not know you.".into())),
    }
}

/// Handles a verified `block_actions` payload.
pub(super) async fn interact(slack: &Slack, state: &AppState, payload: &Value) -> Result<()> {
    let response_url = payload["response_url"].as_str();
    let Some(action) = payload["actions"].get(0) else {
        return Ok(());
    };
    // A request's buttons. (A held action's message only links to its page.)
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
    if teams.is_empty() || teams.iter().any(|t| *t != slack.team_id()) {
        tracing::warn!(teams = ?teams, "slack click from another workspace refused");
        slack
            .ephemeral(
                response_url,
                "twokey does not take decisions from this Slack workspace.",
            )
            .await;
        return Ok(());
    }
    let actor = match clicker(slack, state, slack_user).await? {
        Ok(actor) => actor,
        Err(why) => {
            slack.ephemeral(response_url, &why).await;
            return Ok(());
        }
    };
    match access::decide(state, &actor, request_id, decision, None, Channel::Slack).await {
        Ok(_) => {
            if let Err(e) = slack.sync(state, request_id).await {
                tracing::warn!(error = %e, "slack message update failed; the outbox will retry");
            }
        }
        Err(e @ (Error::Forbidden(_) | Error::Conflict(_) | Error::NotFound(_))) => {
            slack
                .ephemeral(response_url, &format!("Not done: {e}"))
                .await;
        }
        Err(e) => return Err(e),
    }
    Ok(())
}
