//! The grant's own login as the PostgreSQL relay uses it upstream: made (or given a
//! fresh password) by the same sequence as a direct login (`super::issue::make_login`),
//! with the same role settings and the same record, so the reconciler drops it when the
//! grant ends. Its password goes to the relay's memory only: no person, page, log or
//! table sees it.

use crate::config::{ResourceConfig, RoleConfig, Secret};
use crate::error::{Error, Result};
use crate::state::AppState;
use crate::store::GrantRow;

use super::Target;
use super::issue::{Made, Maker, make_login};

/// Where and as whom the relay logs in for a grant.
pub struct UpstreamLogin {
    pub role: String,
    pub password: Secret,
    pub host: String,
    pub port: u16,
    pub database: String,
}

/// Makes the grant's login on the target (or re-keys it) with a password that only the
/// returned value holds. The grant must be live: checked before the target is touched
/// and again after, as for a direct login.
pub async fn relay_upstream_login(
    state: &AppState,
    grant: &GrantRow,
    resource: &ResourceConfig,
    role: &RoleConfig,
) -> Result<UpstreamLogin> {
    let target = Target::of(resource)?;
    let now = state.now_ms();
    if !grant.is_live(now) {
        return Err(Error::conflict("this grant is not live"));
    }
    let Made { name, password, .. } =
        make_login(state, grant, resource, role, &target, Maker::Relay, now).await?;
    Ok(UpstreamLogin {
        role: name,
        password: Secret::new("relay upstream login", &password)
            .map_err(|e| Error::Internal(e.to_string()))?,
        host: target.host,
        port: target.port,
        database: target.database,
    })
}
