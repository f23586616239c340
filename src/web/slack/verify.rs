//! Is this request from Slack? Every call to `POST /slack/interactions` is checked here
//! before anything is read from it: the `X-Slack-Signature` HMAC-SHA256 over
//! `v0:timestamp:body` (compared in constant time), a timestamp under 5 minutes old,
//! and a signature not seen before (replay). What this module must never do: parse the
//! body, or answer anything but "refused" before all three checks pass.

use chrono::{DateTime, Utc};
use hmac::Mac;

use crate::notify::slack::Slack;
use crate::state::AppState;
use crate::store;

/// Slack rejects nothing older, and neither do we.
pub const MAX_AGE_SECS: i64 = 5 * 60;

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

/// Checks signature, age and freshness of an interaction request.
pub(super) async fn verify(
    slack: &Slack,
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
    let mut mac = slack.signing_mac().map_err(|_| Refusal::BadSignature)?;
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

/// What the replay table stores for a verified signature: a hash of the decoded MAC,
/// so every spelling of one signature is one key.
fn replay_key(mac: &[u8]) -> String {
    crate::auth::hash_token(&hex::encode(mac))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_a_signature_is_one_replay_key() {
        let lower = hex::decode("0a1bff").unwrap();
        let upper = hex::decode("0A1BFF").unwrap();
        let mixed = hex::decode("0a1BfF").unwrap();
        assert_eq!(replay_key(&lower), replay_key(&upper));
        assert_eq!(replay_key(&lower), replay_key(&mixed));
        assert_ne!(replay_key(&lower), replay_key(&[0x0a, 0x1b, 0xfe]));
    }
}
