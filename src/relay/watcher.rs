//! The one cut watcher: a pass, every [`CUT_CHECK`], that ends the live sessions whose
//! grant is no longer rightfully live, whatever their protocol.
//!
//! It must never keep a session alive on a grant the store did not just confirm: a
//! store that cannot answer cuts (fail closed).

use std::time::Duration;

use super::live::GRANT_ENDED;
use crate::state::AppState;

/// How often the watcher checks that its grant is still live (the cut happens within
/// this, well under the 1 s promised).
pub(crate) const CUT_CHECK: Duration = Duration::from_millis(200);

/// The cut watcher's pass, run every [`CUT_CHECK`] by [`crate::tasks`]: one query asks
/// which grants with live sessions are still live; sessions on any other are cut. A
/// store that cannot answer cuts them all (fail closed). One query per pass, however
/// many sessions are open.
pub(crate) async fn pass(state: &AppState) {
    let ids = state.live_sessions.grant_ids();
    if ids.is_empty() {
        return;
    }
    // Rightful, not merely active: the holder may have been forced out or lost the
    // group since (crate::access::rightful_grants_among).
    match crate::access::rightful_grants_among(state, &ids).await {
        // A session registered during the query is on a grant it did not ask about:
        // left for the next tick.
        Ok(live) => {
            state.live_sessions.cut_where(
                |g| live.contains(g) || ids.binary_search_by(|i| i.as_str().cmp(g)).is_err(),
                GRANT_ENDED,
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "relay: cannot check grants; ending sessions");
            state.live_sessions.cut_where(
                |g| ids.binary_search_by(|i| i.as_str().cmp(g)).is_err(),
                "twokey cannot check the grant",
            );
        }
    }
}
