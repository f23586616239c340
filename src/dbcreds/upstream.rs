//! The grant's own login as the PostgreSQL relay uses it upstream: made (or given a
//! fresh password) as [`super::issue`] makes a direct login, with the same role
//! settings and the same record, so the reconciler drops it when the grant ends. Its
//! password goes to the relay's memory only: no person, page, log or table sees it.

use serde_json::json;

use crate::config::{ResourceConfig, RoleConfig, Secret};
use crate::error::{Error, Result};
use crate::state::AppState;
use crate::store::{self, GrantRow};

use super::issue::provision;
use super::{Target, instance_tag, new_password, role_name};

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
    let name = role_name(&grant.id);
    let now = state.now_ms();
    if !grant.is_live(now) {
        return Err(Error::conflict("this grant is not live"));
    }
    {
        let mut tx = store::begin_write(&state.db).await?;
        store::db_credential_creating(&mut tx, &grant.id, &resource.name, &name, now).await?;
        tx.commit().await?;
    }
    let password = new_password();
    let ends = crate::clock::from_millis(grant.ends_at);
    let comment = format!("{}grant:{}", instance_tag(state), grant.id);
    let made = provision(&target, &name, &password, role, &ends, &comment).await;
    let mut tx = store::begin_write(&state.db).await?;
    let created = match made {
        Ok(c) => c,
        Err(msg) => {
            store::db_credential_error(&mut tx, &grant.id, &resource.name, &name, &msg, now)
                .await?;
            crate::audit::append(
                &mut tx,
                now,
                &crate::audit::NewEvent {
                    actor: &grant.user_email,
                    action: "db_credentials.failed",
                    subject: &grant.id,
                    details: json!({ "role": name, "error": msg, "by": "relay" }),
                },
            )
            .await?;
            tx.commit().await?;
            return Err(Error::conflict(msg));
        }
    };
    let live = store::grant_for_request(&mut tx, &grant.request_id)
        .await?
        .is_some_and(|g| g.is_live(state.now_ms()));
    if !live {
        drop(tx);
        state.reconcile_now.notify_one();
        return Err(Error::conflict(
            "this grant ended while its login was being made",
        ));
    }
    store::db_credential_issued(&mut tx, &grant.id, &resource.name, &name, now).await?;
    if created {
        crate::audit::append(
            &mut tx,
            now,
            &crate::audit::NewEvent {
                actor: &grant.user_email,
                action: "db_role.created",
                subject: &grant.id,
                details: json!({
                    "role": name, "resource": resource.name, "db_roles": role.db_roles,
                    "valid_until": ends.to_rfc3339(), "connection_limit": role.connection_limit,
                    "by": "relay",
                }),
            },
        )
        .await?;
    }
    tx.commit().await?;
    state.reconcile_now.notify_one();
    Ok(UpstreamLogin {
        role: name,
        password: Secret::new("relay upstream login", &password)
            .map_err(|e| Error::Internal(e.to_string()))?,
        host: target.host,
        port: target.port,
        database: target.database,
    })
}
