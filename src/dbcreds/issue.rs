//! Issuing a grant's database login: the role made on the target with `VALID UNTIL`
//! the grant's end, its password shown once and kept only as a SCRAM verifier.

use serde_json::json;
use sqlx::{Connection, Executor};

use crate::config::{ResourceConfig, RoleConfig};
use crate::error::{Error, Result};
use crate::policy::Actor;
use crate::state::AppState;
use crate::store::{self, GrantRow};

use super::reconcile::reconcile_resource;
use super::{
    Admin, SCRAM_ITERATIONS, TARGET_TIMEOUT, Target, instance_tag, new_password, quote_ident,
    quote_literal, role_name, scram_verifier,
};

/// Credentials just issued. The password is in here once and nowhere else.
#[derive(serde::Serialize)]
pub struct Issued {
    pub username: String,
    pub password: String,
    pub host: String,
    pub port: u16,
    pub database: String,
    pub sslmode: String,
    pub expires_at: String,
    /// A ready `psql` connection URL (it holds the password: treat it like one).
    pub psql_url: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Creates (or re-keys) the login for the holder's live grant on a PostgreSQL resource.
pub async fn issue(state: &AppState, actor: &Actor, request_id: &str) -> Result<Issued> {
    let now = state.now_ms();
    let crate::access::HeldGrant {
        grant,
        ref resource,
        ref role,
        ..
    } = {
        let mut conn = state.db.acquire().await?;
        crate::access::holders_live_grant(state, &mut conn, actor, request_id, now).await?
    };
    // A relay resource is reached only through the relay: handing out the target's own
    // login would let the engineer around the recording and the data-path policy.
    if state.config().db_access(resource) == crate::config::DbAccess::Relay
        && resource.kind == crate::config::ResourceKind::Postgres
    {
        return Err(Error::conflict(format!(
            "{0} is reached only through twokey's relay: run `twokey psql {0}`, or get a \
             relay password on the request page",
            resource.name
        )));
    }
    if !resource.manages_db_roles() {
        return Err(Error::conflict(format!(
            "twokey does not manage logins for {} (it has no admin_user)",
            resource.name
        )));
    }
    let target = Target::of(resource)?;
    let Made {
        name,
        password,
        ends,
    } = make_login(
        state,
        &grant,
        resource,
        role,
        &target,
        Maker::Holder(actor),
        now,
    )
    .await?;
    let psql_url = format!(
        "postgresql://{}:{}@{}:{}/{}?sslmode={}",
        name,
        password,
        url_host(&target.host),
        target.port,
        form_urlencoded::byte_serialize(target.database.as_bytes()).collect::<String>(),
        target.ssl_name
    );
    Ok(Issued {
        username: name,
        password,
        host: target.host,
        port: target.port,
        database: target.database,
        sslmode: target.ssl_name.to_string(),
        expires_at: ends.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        psql_url,
    })
}

/// Who makes a grant's login: it decides what the record of it says, what a failure
/// reads, and whether a login made for a grant that ended meanwhile is dropped before
/// the caller hears of it.
pub(super) enum Maker<'a> {
    /// The holder, for a login handed to them: every issue is audited (`db_role.created`
    /// or `db_credentials.issued`), under their identity.
    Holder(&'a Actor),
    /// The relay, for its own upstream use: only a newly made role is audited, and the
    /// details say `"by": "relay"`.
    Relay,
}

impl Maker<'_> {
    fn actor<'g>(&'g self, grant: &'g GrantRow) -> &'g str {
        match self {
            Maker::Holder(actor) => &actor.email,
            Maker::Relay => &grant.user_email,
        }
    }
}

/// A login just made (or re-keyed) on the target. The password is in here once.
pub(super) struct Made {
    pub name: String,
    pub password: String,
    pub ends: chrono::DateTime<chrono::Utc>,
}

/// The one sequence that makes a grant's login: recorded as being made, made on the
/// target, then recorded as issued with its audit event, in one transaction that first
/// checks the grant is still live. A failure on the target is recorded and audited; a
/// grant that ended meanwhile gets no login, and the reconciler drops the role.
pub(super) async fn make_login(
    state: &AppState,
    grant: &GrantRow,
    resource: &ResourceConfig,
    role: &RoleConfig,
    target: &Target,
    maker: Maker<'_>,
    now: i64,
) -> Result<Made> {
    let name = role_name(&grant.id);
    let request_id = grant.request_id.as_str();
    // Recorded before the target is touched: the reconciler leaves a role being made
    // for a live grant alone, and drops it once the grant is over.
    {
        let mut tx = store::begin_write(&state.db).await?;
        store::db_credential_creating(&mut tx, &grant.id, &resource.name, &name, now).await?;
        tx.commit().await?;
    }
    let password = new_password();
    let ends = crate::clock::from_millis(grant.ends_at);
    let comment = format!("{}grant:{}", instance_tag(state), grant.id);
    let result = provision(target, &name, &password, role, &ends, &comment).await;
    let mut tx = store::begin_write(&state.db).await?;
    let created = match result {
        Ok(created) => created,
        Err(msg) => {
            // Shown on the request page to the holder and the approvers.
            store::db_credential_error(&mut tx, &grant.id, &resource.name, &name, &msg, now)
                .await?;
            let details = match maker {
                Maker::Holder(_) => json!({ "request_id": request_id, "role": name, "error": msg }),
                Maker::Relay => json!({ "role": name, "error": msg, "by": "relay" }),
            };
            crate::audit::append(
                &mut tx,
                now,
                &crate::audit::NewEvent {
                    actor: maker.actor(grant),
                    action: "db_credentials.failed",
                    subject: &grant.id,
                    details,
                },
            )
            .await?;
            tx.commit().await?;
            return Err(Error::conflict(match maker {
                Maker::Holder(_) => format!("no database credentials: {msg}"),
                Maker::Relay => msg,
            }));
        }
    };
    // The grant may have been revoked while the target was busy: then the login must
    // not be handed out, and goes at once.
    let still_live = store::grant_for_request(&mut tx, request_id)
        .await?
        .is_some_and(|g| g.is_live(state.now_ms()));
    if !still_live {
        drop(tx);
        state.reconcile_now.notify_one();
        if let Maker::Holder(_) = maker
            && let Err(msg) = reconcile_resource(state, resource).await
        {
            tracing::warn!(error = %msg, "dropping a login made for a grant that ended meanwhile failed; will retry");
        }
        return Err(Error::conflict(
            "this grant ended while its login was being made",
        ));
    }
    store::db_credential_issued(&mut tx, &grant.id, &resource.name, &name, now).await?;
    let event = match maker {
        Maker::Holder(actor) => Some((
            if created {
                "db_role.created"
            } else {
                "db_credentials.issued"
            },
            json!({
                "request_id": request_id,
                "role": name,
                "resource": resource.name,
                "db_roles": role.db_roles,
                "valid_until": ends.to_rfc3339(),
                "connection_limit": role.connection_limit,
                "by": actor.identity(),
            }),
        )),
        Maker::Relay => created.then(|| {
            (
                "db_role.created",
                json!({
                    "role": name, "resource": resource.name, "db_roles": role.db_roles,
                    "valid_until": ends.to_rfc3339(), "connection_limit": role.connection_limit,
                    "by": "relay",
                }),
            )
        }),
    };
    if let Some((action, details)) = event {
        crate::audit::append(
            &mut tx,
            now,
            &crate::audit::NewEvent {
                actor: maker.actor(grant),
                action,
                subject: &grant.id,
                details,
            },
        )
        .await?;
    }
    tx.commit().await?;
    // A revocation may have raced the creation: the reconciler removes the role then.
    state.reconcile_now.notify_one();
    Ok(Made {
        name,
        password,
        ends,
    })
}

fn url_host(h: &str) -> String {
    if h.contains(':') {
        format!("[{h}]")
    } else {
        h.to_string()
    }
}

/// Makes the role (true) or gives it a new password (false), in one transaction on the
/// target.
async fn provision(
    target: &Target,
    name: &str,
    password: &str,
    role: &RoleConfig,
    ends: &chrono::DateTime<chrono::Utc>,
    comment: &str,
) -> std::result::Result<bool, String> {
    let Admin { mut conn, .. } = target.connect().await?;
    let salt: [u8; 16] = rand::random();
    let verifier = scram_verifier(password, &salt, SCRAM_ITERATIONS);
    let until = ends.format("%Y-%m-%d %H:%M:%S+00").to_string();
    let work = async {
        let mut tx = conn.begin().await?;
        let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_roles WHERE rolname = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        let ident = quote_ident(name);
        if exists.is_some() {
            tx.execute(
                format!(
                    "ALTER ROLE {ident} WITH LOGIN PASSWORD {} VALID UNTIL {}",
                    quote_literal(&verifier),
                    quote_literal(&until)
                )
                .as_str(),
            )
            .await?;
        } else {
            for sql in create_statements(name, role, Some((&verifier, &until)), comment) {
                tx.execute(sql.as_str()).await?;
            }
        }
        tx.commit().await?;
        Ok::<bool, sqlx::Error>(exists.is_none())
    };
    let out = tokio::time::timeout(TARGET_TIMEOUT, work)
        .await
        .map_err(|_| "the database did not answer in time".to_string())?
        .map_err(|e| target.describe(&e));
    let _ = conn.close().await;
    out
}

/// The statements that make a grant's login: the role (with its memberships), its
/// COMMENT, its grants. `login` is the SCRAM verifier and `VALID UNTIL`; without it the
/// role is NOLOGIN (the start-up rehearsal, rolled back).
pub(super) fn create_statements(
    name: &str,
    role: &RoleConfig,
    login: Option<(&str, &str)>,
    comment: &str,
) -> Vec<String> {
    let ident = quote_ident(name);
    let mut sql = match login {
        Some((verifier, until)) => format!(
            "CREATE ROLE {ident} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION \
             PASSWORD {} VALID UNTIL {} CONNECTION LIMIT {}",
            quote_literal(verifier),
            quote_literal(until),
            role.connection_limit
        ),
        None => format!(
            "CREATE ROLE {ident} WITH NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION"
        ),
    };
    if !role.db_roles.is_empty() {
        let roles: Vec<String> = role.db_roles.iter().map(|r| quote_ident(r)).collect();
        sql.push_str(&format!(" IN ROLE {}", roles.join(", ")));
    }
    let mut out = vec![
        sql,
        format!("COMMENT ON ROLE {ident} IS {}", quote_literal(comment)),
    ];
    out.extend(role.db_grants.iter().map(|g| g.replace("{role}", &ident)));
    out
}
