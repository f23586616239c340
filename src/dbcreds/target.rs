//! Checking a target's admin at start-up and in `check-config`: each privilege
//! revocation and issuing need, rehearsed in a rolled-back transaction, each missing
//! one named with the SQL that grants it.

use sqlx::postgres::PgConnection;
use sqlx::{Connection, Executor};

use crate::config::ResourceConfig;

use super::issue::create_statements;
use super::reconcile::join_statement;
use super::{Admin, ROLE_PREFIX, TARGET_TIMEOUT, Target, quote_ident};

/// What [`check_target`] found on a live target: each problem names what is missing
/// and the SQL that fixes it (run by a superuser or the role's owner on the target).
#[derive(Debug, Default)]
pub struct TargetCheck {
    /// The target's `server_version_num`, e.g. 170010.
    pub version: u32,
    /// The admin is a superuser (it can do everything; more than twokey needs).
    pub superuser: bool,
    /// Problems that keep twokey from ending logins: `serve` refuses to start.
    pub blocking: Vec<String>,
    /// Problems that make issuing a role's login fail (shown then too).
    pub issuance: Vec<String>,
}

impl TargetCheck {
    /// Whether nothing is missing.
    pub fn is_ok(&self) -> bool {
        self.blocking.is_empty() && self.issuance.is_empty()
    }
}

/// Checks, on the live target, that the admin can do all twokey does there: make each
/// role's login (memberships, COMMENT, `db_grants`) and end one (join it, reassign or
/// drop what it owns, drop it). Each is rehearsed on a NOLOGIN probe role inside a
/// transaction that is rolled back, so nothing stays. `Err` when the target cannot be
/// reached or refuses the admin credential (a message safe to show).
pub async fn check_target(resource: &ResourceConfig) -> std::result::Result<TargetCheck, String> {
    let target = Target::of(resource).map_err(|e| e.to_string())?;
    let Admin { mut conn, version } = target.connect().await?;
    let out = tokio::time::timeout(
        TARGET_TIMEOUT,
        check_on(&target, &mut conn, version, resource),
    )
    .await
    .map_err(|_| "the database did not answer in time".to_string())?
    .map_err(|e| target.describe(&e));
    let _ = conn.close().await;
    out
}

async fn check_on(
    target: &Target,
    conn: &mut PgConnection,
    version: u32,
    resource: &ResourceConfig,
) -> std::result::Result<TargetCheck, sqlx::Error> {
    let admin = quote_ident(&target.admin_user);
    let (superuser, createrole, inherit): (bool, bool, bool) = sqlx::query_as(
        "SELECT rolsuper, rolcreaterole, rolinherit FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(&mut *conn)
    .await?;
    let mut out = TargetCheck {
        version,
        superuser,
        ..TargetCheck::default()
    };
    let v16 = version >= 160000;
    if !superuser && !createrole {
        out.blocking.push(format!(
            "admin_user {admin} lacks CREATEROLE (it creates and drops the logins); fix: \
             ALTER ROLE {admin} CREATEROLE;"
        ));
    }
    if !superuser && !v16 && !inherit {
        out.blocking.push(format!(
            "admin_user {admin} is NOINHERIT: on PostgreSQL 14 and 15 it must inherit the \
             login it joins to end its sessions and drop what it owns; fix: ALTER ROLE {admin} INHERIT;"
        ));
    }
    if let Some(keeper) = &resource.reassign_owned_to {
        let has: Option<bool> = sqlx::query_scalar(
            "SELECT pg_has_role(current_user, oid, 'USAGE') FROM pg_roles WHERE rolname = $1",
        )
        .bind(keeper)
        .fetch_optional(&mut *conn)
        .await?;
        let k = quote_ident(keeper);
        match has {
            None => out.blocking.push(format!(
                "reassign_owned_to: role {k} does not exist on the target; fix: CREATE ROLE {k} NOLOGIN;"
            )),
            Some(false) => out.blocking.push(format!(
                "admin_user {admin} lacks the privileges of {k}, which REASSIGN OWNED needs; fix: \
                 GRANT {k} TO {admin}{};",
                if v16 { " WITH INHERIT TRUE, SET FALSE" } else { "" }
            )),
            Some(true) => {}
        }
    }
    if !out.blocking.is_empty() {
        return Ok(out);
    }
    let probe = format!(
        "{ROLE_PREFIX}check_{}",
        hex::encode(rand::random::<[u8; 6]>())
    );
    // The end of a login, as drop_role does it (no session to terminate: the right to
    // terminate one is the same privilege of the login that DROP OWNED needs).
    let ident = quote_ident(&probe);
    let mut steps = vec![
        format!("CREATE ROLE {ident} NOLOGIN"),
        join_statement(version, &probe),
    ];
    if let Some(keeper) = &resource.reassign_owned_to {
        steps.push(format!(
            "REASSIGN OWNED BY {ident} TO {}",
            quote_ident(keeper)
        ));
    }
    steps.push(format!("DROP OWNED BY {ident}"));
    steps.push(format!("DROP ROLE {ident}"));
    if let Err(e) = rehearse(conn, &steps).await? {
        out.blocking.push(format!(
            "admin_user {admin} cannot end a login: {e} (PostgreSQL {})",
            version / 10000
        ));
        return Ok(out);
    }
    for role in &resource.roles {
        let mut ready = true;
        for r in &role.db_roles {
            let rq = quote_ident(r);
            let admin_of: Option<bool> = sqlx::query_scalar(
                "SELECT pg_has_role(current_user, oid, 'MEMBER WITH ADMIN OPTION') FROM pg_roles \
                 WHERE rolname = $1",
            )
            .bind(r)
            .fetch_optional(&mut *conn)
            .await?;
            match admin_of {
                None => {
                    ready = false;
                    out.issuance.push(format!(
                        "role {}: db_roles: {rq} does not exist on the target",
                        role.name
                    ));
                }
                // 16 made CREATEROLE need ADMIN on a role to grant it; 14/15 let
                // CREATEROLE grant any non-superuser role, which the rehearsal checks.
                Some(false) if v16 => {
                    ready = false;
                    out.issuance.push(format!(
                        "role {}: admin_user {admin} lacks ADMIN on {rq} (to make logins members); \
                         fix: GRANT {rq} TO {admin} WITH ADMIN OPTION, INHERIT FALSE, SET FALSE;",
                        role.name
                    ));
                }
                Some(_) => {}
            }
        }
        if !ready {
            continue;
        }
        let steps = create_statements(&probe, role, None, "twokey: privilege check");
        if let Err(e) = rehearse(conn, &steps).await? {
            out.issuance.push(format!(
                "role {}: admin_user {admin} cannot make its login: {e}{}",
                role.name,
                if role.db_grants.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (each db_grants privilege must be held WITH GRANT OPTION, e.g. \
                         GRANT SELECT ON public.orders TO {admin} WITH GRANT OPTION;)"
                    )
                }
            ));
        }
    }
    Ok(out)
}

/// Runs `steps` in one transaction and rolls it back: `Ok(Err(message))` when the
/// target refused one (the statement's kind and PostgreSQL's words).
async fn rehearse(
    conn: &mut PgConnection,
    steps: &[String],
) -> std::result::Result<std::result::Result<(), String>, sqlx::Error> {
    let mut tx = conn.begin().await?;
    for sql in steps {
        if let Err(e) = tx.execute(sql.as_str()).await {
            let sqlx::Error::Database(d) = &e else {
                return Err(e);
            };
            // (No secret in these: the probe has no password.)
            let msg = format!("{sql} refused: {}", d.message());
            drop(tx);
            return Ok(Err(msg));
        }
    }
    tx.rollback().await?;
    Ok(Ok(()))
}
