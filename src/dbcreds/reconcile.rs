//! Ending logins: the reconciler's pass over every managed target (the target's roles
//! listed before the store is read, so no fresh login is missed), and dropping one
//! login (NOLOGIN, join, terminate, reassign, drop).

use serde_json::json;
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Executor};

use super::{Admin, TARGET_TIMEOUT, Target, instance_tag, quote_ident};
use crate::config::ResourceConfig;
use crate::error::Result;
use crate::state::AppState;
use crate::store;

/// What one reconciler pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub dropped: usize,
    pub failed: usize,
}

/// Drops every `twokey_*` role without a live grant, on every managed resource.
/// Safe to repeat; failures are recorded and retried on the next pass.
pub async fn reconcile(state: &AppState) -> Result<Reconciled> {
    let mut out = Reconciled::default();
    for resource in state
        .config()
        .resources
        .iter()
        .filter(|r| r.manages_db_roles())
    {
        match reconcile_resource(state, resource).await {
            Ok(r) => {
                out.dropped += r.dropped;
                out.failed += r.failed;
            }
            Err(msg) => {
                out.failed += 1;
                tracing::warn!(resource = %resource.name, error = %msg, "database reconcile failed; will retry");
            }
        }
    }
    Ok(out)
}

pub(super) async fn reconcile_resource(
    state: &AppState,
    resource: &ResourceConfig,
) -> std::result::Result<Reconciled, String> {
    let target = Target::of(resource).map_err(|e| e.to_string())?;
    let Admin {
        mut conn, version, ..
    } = target.connect().await?;
    // The target's roles first, the store second. A login is recorded ('creating',
    // committed) before it is made on the target, so every role this listing sees
    // already has its row when the store is read below. Read the other way round, a
    // login made in between would look like an orphan and be dropped while its grant
    // is live — right after its password was handed out.
    // Only roles this instance made (by their COMMENT), whichever resource they were for.
    let present: Vec<String> = sqlx::query_scalar(
        "SELECT rolname FROM pg_roles
         WHERE rolname LIKE 'twokey\\_%' AND shobj_description(oid, 'pg_authid') LIKE $1
         ORDER BY rolname",
    )
    .bind(format!("{}%", instance_tag(state)))
    .fetch_all(&mut conn)
    .await
    .map_err(|e| target.describe(&e))?;
    if present.is_empty() {
        let _ = conn.close().await;
        return Ok(Reconciled::default());
    }
    let live = store::live_db_roles(&state.db, state.now_ms())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Reconciled::default();
    for name in present.into_iter().filter(|n| !live.contains(n)) {
        let record = store::db_credential_by_role(&state.db, &name)
            .await
            .map_err(|e| e.to_string())?;
        match drop_role(
            &target,
            &mut conn,
            version,
            &name,
            resource.reassign_owned_to.as_deref(),
        )
        .await
        {
            Ok(steps) => {
                out.dropped += 1;
                let mut tx = store::begin_write(&state.db)
                    .await
                    .map_err(|e| e.to_string())?;
                let now = state.now_ms();
                store::db_credential_dropped(&mut tx, &name, now)
                    .await
                    .map_err(|e| e.to_string())?;
                crate::audit::append(
                    &mut tx,
                    now,
                    &crate::audit::NewEvent {
                        actor: "system",
                        action: "db_role.dropped",
                        subject: record
                            .as_ref()
                            .map_or(name.as_str(), |r| r.grant_id.as_str()),
                        details: json!({
                            "role": name,
                            "resource": resource.name,
                            "known_grant": record.is_some(),
                            "steps": steps,
                        }),
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
                tx.commit().await.map_err(|e| e.to_string())?;
                tracing::info!(role = %name, resource = %resource.name, "database role dropped");
            }
            Err(msg) => {
                out.failed += 1;
                tracing::warn!(role = %name, resource = %resource.name, error = %msg, "dropping a database role failed; will retry");
                let mut tx = store::begin_write(&state.db)
                    .await
                    .map_err(|e| e.to_string())?;
                crate::audit::append(
                    &mut tx,
                    state.now_ms(),
                    &crate::audit::NewEvent {
                        actor: "system",
                        action: "db_role.drop_failed",
                        subject: record
                            .as_ref()
                            .map_or(name.as_str(), |r| r.grant_id.as_str()),
                        details: json!({ "role": name, "resource": resource.name, "error": msg }),
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
                tx.commit().await.map_err(|e| e.to_string())?;
                if let Some(r) = &record {
                    let mut tx = store::begin_write(&state.db)
                        .await
                        .map_err(|e| e.to_string())?;
                    store::db_credential_error(
                        &mut tx,
                        &r.grant_id,
                        &resource.name,
                        &name,
                        &format!("dropping the login failed (will retry): {msg}"),
                        state.now_ms(),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                    tx.commit().await.map_err(|e| e.to_string())?;
                }
            }
        }
    }
    let _ = conn.close().await;
    Ok(out)
}

/// Ends a role: no new logins, its sessions terminated, what it owns reassigned or
/// dropped, then the role itself. Returns the steps taken, for the audit log.
async fn drop_role(
    target: &Target,
    conn: &mut PgConnection,
    version: u32,
    name: &str,
    reassign_to: Option<&str>,
) -> std::result::Result<Vec<String>, String> {
    let ident = quote_ident(name);
    let mut steps = Vec::new();
    let work = async {
        conn.execute(format!("ALTER ROLE {ident} NOLOGIN").as_str())
            .await?;
        steps.push("login disabled".to_string());
        if join_login(conn, version, name).await? {
            steps.push("admin joined the login to end it".to_string());
        }
        // The sessions' pids first, then each terminated on its own, waiting (up to 5 s)
        // until it is really gone. (One query with pg_terminate_backend in its WHERE
        // could be evaluated on other rows first — this very connection among them.)
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE usename = $1 AND pid <> pg_backend_pid()",
        )
        .bind(name)
        .fetch_all(&mut *conn)
        .await?;
        let mut ended = 0;
        for pid in pids {
            let done: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
                .bind(pid)
                .fetch_one(&mut *conn)
                .await?;
            ended += usize::from(done);
        }
        steps.push(format!("{ended} session(s) terminated"));
        let mut tx = conn.begin().await?;
        if let Some(to) = reassign_to {
            tx.execute(format!("REASSIGN OWNED BY {ident} TO {}", quote_ident(to)).as_str())
                .await?;
            steps.push(format!("owned objects reassigned to {to}"));
        }
        tx.execute(format!("DROP OWNED BY {ident}").as_str())
            .await?;
        steps.push("owned objects and privileges dropped".to_string());
        tx.execute(format!("DROP ROLE {ident}").as_str()).await?;
        tx.commit().await?;
        steps.push("role dropped".to_string());
        Ok::<(), sqlx::Error>(())
    };
    tokio::time::timeout(TARGET_TIMEOUT, work)
        .await
        .map_err(|_| "the database did not answer in time".to_string())?
        .map_err(|e| target.describe(&e))?;
    Ok(steps)
}

/// Makes the admin a member of the login, with its privileges, unless it has them
/// (a superuser, or a join left by an earlier failed pass). Returns whether it joined.
///
/// PostgreSQL lets only a role with the login's privileges (or `pg_signal_backend`, or a
/// superuser) terminate its sessions and `DROP OWNED BY` it; CREATEROLE alone does not
/// give them, on any version. Joining here, when the login already cannot log in and
/// is about to be dropped, asks no more of the DBA than CREATEROLE (which on 14/15 may
/// grant any non-superuser role, and on 16+ comes with ADMIN on the roles it creates):
/// no cluster-wide `pg_signal_backend`, and the admin never holds the login's
/// privileges while the login is in use. The membership goes with `DROP ROLE`.
async fn join_login(
    conn: &mut PgConnection,
    version: u32,
    name: &str,
) -> std::result::Result<bool, sqlx::Error> {
    let has: bool = sqlx::query_scalar("SELECT pg_has_role(current_user, $1, 'USAGE')")
        .bind(name)
        .fetch_one(&mut *conn)
        .await?;
    if has {
        return Ok(false);
    }
    conn.execute(join_statement(version, name).as_str()).await?;
    Ok(true)
}

/// `GRANT login TO CURRENT_USER`: on 16+ with INHERIT (whatever the admin's own
/// INHERIT attribute) and without SET (the admin never acts as the login); 14/15 know
/// no such options, and the admin must then be INHERIT (checked in [`check_target`]).
pub(super) fn join_statement(version: u32, name: &str) -> String {
    if version >= 160000 {
        format!(
            "GRANT {} TO CURRENT_USER WITH INHERIT TRUE, SET FALSE",
            quote_ident(name)
        )
    } else {
        format!("GRANT {} TO CURRENT_USER", quote_ident(name))
    }
}
