//! Database logins that exist only while their grant does (PostgreSQL).
//!
//! The grant's holder asks for credentials: twokey makes the role `twokey_<grant>` on
//! the target (LOGIN, `VALID UNTIL` the grant's end as a backstop, the role's
//! memberships and grants, a connection limit) in one transaction there — so a failure
//! leaves nothing half-made — or, if it exists, gives it a fresh password. The password
//! is shown once and stored nowhere: the target receives only its SCRAM-SHA-256
//! verifier, so not even the target's statement log holds it.
//!
//! When the grant ends or is revoked, [`reconcile`] ends the role's sessions, disposes
//! of what it owns, and drops it; it also runs at start-up and periodically, and drops
//! any `twokey_*` role without a live grant, so a crash never leaves a login behind.
//!
//! Identifiers and literals sent to the target are always quoted here; no user input
//! (reasons, tickets, names) ever reaches its SQL.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use rand::Rng;
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgSslMode};
use sqlx::{ConnectOptions, Connection, Executor};

use crate::config::{ResourceConfig, RoleConfig, Secret};
use crate::error::{Error, Result};
use crate::policy::Actor;
use crate::state::AppState;
use crate::store;

pub use check::check_config;

mod check;

/// Every role twokey makes starts with this; twokey owns the prefix on its targets.
pub const ROLE_PREFIX: &str = "twokey_";
/// SCRAM iterations, as PostgreSQL's own default.
const SCRAM_ITERATIONS: u32 = 4096;
/// How long a statement on a target may take before twokey gives up on it.
const TARGET_TIMEOUT: Duration = Duration::from_secs(15);
/// The admin connection's TLS mode when `tls` is not set.
pub const DEFAULT_TLS: &str = "verify-full";

/// The login twokey makes for a grant.
pub fn role_name(grant_id: &str) -> String {
    let short: String = grant_id
        .chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_lowercase())
        .take(12)
        .collect();
    format!("{ROLE_PREFIX}{short}")
}

/// What twokey writes as the COMMENT of each role it makes: this instance (its CA's
/// fingerprint) and the grant. The reconciler only ever touches roles carrying this
/// instance's tag, so another twokey, or an admin's own `twokey_…` role, is left alone.
fn instance_tag(state: &AppState) -> String {
    let fp = state.ca.fingerprint();
    let short: String = fp
        .trim_start_matches("SHA256:")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(16)
        .collect();
    format!("twokey:{short}:")
}

/// A PostgreSQL identifier, quoted: `"` doubled, the whole wrapped in `"`.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A PostgreSQL string literal, quoted: `'` doubled. (Backslashes are plain characters
/// with standard_conforming_strings, on by default since 9.1; a target with it off is
/// refused in [`connect`].)
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A strong random password: 32 characters from 62 (≈190 bits).
pub fn new_password() -> String {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..32)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect()
}

/// The SCRAM-SHA-256 verifier PostgreSQL stores for a password (RFC 5802/7677):
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
pub fn scram_verifier(password: &str, salt: &[u8], iterations: u32) -> String {
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut salted);
    let hmac = |key: &[u8], msg: &[u8]| {
        let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
        m.update(msg);
        m.finalize().into_bytes()
    };
    let client_key = hmac(&salted, b"Client Key");
    let stored_key = Sha256::digest(client_key);
    let server_key = hmac(&salted, b"Server Key");
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        STANDARD.encode(salt),
        STANDARD.encode(stored_key),
        STANDARD.encode(server_key)
    )
}

/// Where a resource's database is and how twokey administers it.
struct Target {
    host: String,
    port: u16,
    database: String,
    admin_user: String,
    admin_password: Secret,
    ssl: PgSslMode,
    ssl_name: &'static str,
    /// PEM file of the CA(s) that sign the target's certificate (`tls_ca_file`).
    ca_file: Option<std::path::PathBuf>,
}

/// An open admin connection and the target's `server_version_num` (e.g. 150018).
struct Admin {
    conn: PgConnection,
    version: u32,
}

impl Target {
    fn of(resource: &ResourceConfig) -> Result<Target> {
        let bad = |what: &str| Error::Internal(format!("resource {}: {what}", resource.name));
        let address = resource
            .address
            .as_deref()
            .ok_or_else(|| bad("no address"))?;
        let (host, port) = address.rsplit_once(':').ok_or_else(|| bad("bad address"))?;
        // The admin credential can create logins: by default the server must prove it is
        // the target (a CA twokey trusts, the host named in its certificate), so a
        // machine in the middle can neither read nor steer what twokey sends.
        let (ssl, ssl_name) = match resource.tls.as_deref().unwrap_or(DEFAULT_TLS) {
            "disable" => (PgSslMode::Disable, "disable"),
            "prefer" => (PgSslMode::Prefer, "prefer"),
            "require" => (PgSslMode::Require, "require"),
            "verify-full" => (PgSslMode::VerifyFull, "verify-full"),
            other => return Err(bad(&format!("tls = {other:?} is not a TLS mode"))),
        };
        Ok(Target {
            host: host.to_string(),
            port: port.parse().map_err(|_| bad("bad port"))?,
            database: resource
                .database
                .clone()
                .ok_or_else(|| bad("no database"))?,
            admin_user: resource
                .admin_user
                .clone()
                .ok_or_else(|| bad("no admin_user"))?,
            admin_password: resource
                .admin_password(&format!("resource {}", resource.name))
                .map_err(|e| Error::Internal(e.to_string()))?,
            ssl,
            ssl_name,
            ca_file: resource.tls_ca_file.clone(),
        })
    }

    async fn connect(&self) -> std::result::Result<Admin, String> {
        let mut opts = PgConnectOptions::new()
            .host(&self.host)
            .port(self.port)
            .database(&self.database)
            .username(&self.admin_user)
            .password(self.admin_password.expose())
            .ssl_mode(self.ssl)
            .application_name("twokey")
            .disable_statement_logging();
        if let Some(ca) = &self.ca_file {
            opts = opts.ssl_root_cert(ca);
        }
        let mut conn = tokio::time::timeout(TARGET_TIMEOUT, opts.connect())
            .await
            .map_err(|_| {
                format!(
                    "cannot reach the database at {}:{} (timed out)",
                    self.host, self.port
                )
            })?
            .map_err(|e| self.describe(&e))?;
        let version: String = sqlx::query_scalar("SHOW server_version_num")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| self.describe(&e))?;
        let version = version.parse::<u32>().unwrap_or(0);
        if version < 140000 {
            return Err("twokey needs PostgreSQL 14 or newer on the target".into());
        }
        let scs: String = sqlx::query_scalar("SHOW standard_conforming_strings")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| self.describe(&e))?;
        if scs != "on" {
            return Err(
                "the database has standard_conforming_strings off; twokey needs it on".into(),
            );
        }
        Ok(Admin { conn, version })
    }

    /// A failed TLS handshake. The TLS library's words name the cause (an unknown
    /// issuer, a name not in the certificate, no TLS on the server); they hold no secret.
    fn tls_failure(&self, detail: &dyn std::fmt::Display) -> String {
        format!(
            "TLS to the database at {}:{} failed (tls = {:?}): {detail}; with verify-full the \
             server's certificate must name {} and be signed by a CA twokey trusts \
             (tls_ca_file = the CA's PEM file, {})",
            self.host,
            self.port,
            self.ssl_name,
            self.host,
            match &self.ca_file {
                Some(p) => format!("now {}", p.display()),
                None => "not set".to_string(),
            }
        )
    }

    /// An error from the target, in words safe to show (never the admin password).
    fn describe(&self, e: &sqlx::Error) -> String {
        match e {
            sqlx::Error::Database(d) => match d.code().as_deref() {
                Some("28P01") | Some("28000") => {
                    "the database refused twokey's admin credential".to_string()
                }
                Some(code) => format!("the database refused: {} (SQLSTATE {code})", d.message()),
                None => format!("the database refused: {}", d.message()),
            },
            // A refused certificate surfaces from the handshake as invalid data.
            sqlx::Error::Io(io)
                if io.kind() == std::io::ErrorKind::InvalidData
                    && !matches!(self.ssl, PgSslMode::Disable) =>
            {
                self.tls_failure(io)
            }
            sqlx::Error::Io(io) => format!(
                "cannot reach the database at {}:{} ({})",
                self.host,
                self.port,
                io.kind()
            ),
            sqlx::Error::Tls(tls) => self.tls_failure(tls),
            _ => format!(
                "talking to the database at {}:{} failed",
                self.host, self.port
            ),
        }
    }
}

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
        resource,
        role,
        ..
    } = {
        let mut conn = state.db.acquire().await?;
        crate::access::holders_live_grant(state, &mut conn, actor, request_id, now).await?
    };
    if !resource.manages_db_roles() {
        return Err(Error::conflict(format!(
            "twokey does not manage logins for {} (it has no admin_user)",
            resource.name
        )));
    }
    let target = Target::of(resource)?;
    let name = role_name(&grant.id);
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
    let result = provision(&target, &name, &password, role, &ends, &comment).await;
    let mut tx = store::begin_write(&state.db).await?;
    let created = match result {
        Ok(created) => created,
        Err(msg) => {
            // Shown on the request page to the holder and the approvers.
            store::db_credential_error(&mut tx, &grant.id, &resource.name, &name, &msg, now)
                .await?;
            crate::audit::append(
                &mut tx,
                now,
                &crate::audit::NewEvent {
                    actor: &actor.email,
                    action: "db_credentials.failed",
                    subject: &grant.id,
                    details: json!({ "request_id": request_id, "role": name, "error": msg }),
                },
            )
            .await?;
            tx.commit().await?;
            return Err(Error::conflict(format!("no database credentials: {msg}")));
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
        if let Err(msg) = reconcile_resource(state, resource).await {
            tracing::warn!(error = %msg, "dropping a login made for a grant that ended meanwhile failed; will retry");
        }
        return Err(Error::conflict(
            "this grant ended while its login was being made",
        ));
    }
    store::db_credential_issued(&mut tx, &grant.id, &resource.name, &name, now).await?;
    crate::audit::append(
        &mut tx,
        now,
        &crate::audit::NewEvent {
            actor: &actor.email,
            action: if created {
                "db_role.created"
            } else {
                "db_credentials.issued"
            },
            subject: &grant.id,
            details: json!({
                "request_id": request_id,
                "role": name,
                "resource": resource.name,
                "db_roles": role.db_roles,
                "valid_until": ends.to_rfc3339(),
                "connection_limit": role.connection_limit,
                "by": actor.identity(),
            }),
        },
    )
    .await?;
    tx.commit().await?;
    // A revocation may have raced the creation: the reconciler removes the role then.
    state.reconcile_now.notify_one();
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
fn create_statements(
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
        .config
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

async fn reconcile_resource(
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
fn join_statement(version: u32, name: &str) -> String {
    if version >= 160000 {
        format!(
            "GRANT {} TO CURRENT_USER WITH INHERIT TRUE, SET FALSE",
            quote_ident(name)
        )
    } else {
        format!("GRANT {} TO CURRENT_USER", quote_ident(name))
    }
}

/// The holder's view of a grant's database login, for the request page.
pub fn state_words(row: &store::DbCredentialRow) -> String {
    use crate::policy::DbCredentialState as S;
    match (row.status, &row.last_error) {
        (S::Active, None) => format!("login {} exists until the grant ends", row.role_name),
        (S::Dropped, _) => format!("login {} dropped", row.role_name),
        (_, Some(e)) => format!("error: {e}"),
        (s, None) => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(quote_ident("twokey_abc"), "\"twokey_abc\"");
        assert_eq!(
            quote_ident("a\"b; DROP TABLE x; --"),
            "\"a\"\"b; DROP TABLE x; --\""
        );
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(
            quote_literal("x'; DROP ROLE postgres; --"),
            "'x''; DROP ROLE postgres; --'"
        );
    }

    #[test]
    fn role_names_come_from_the_grant_id_only() {
        assert_eq!(
            role_name("0f8e2c1a-7b3d-4e5f-9a0b-1c2d3e4f5a6b"),
            "twokey_0f8e2c1a7b3d"
        );
        // Only hex digits of whatever it is given survive.
        assert_eq!(role_name("x\"; DROP ROLE postgres; --"), "twokey_dee");
    }

    #[test]
    fn scram_verifier_matches_postgres() {
        // The shape PostgreSQL stores; that it accepts a login with the password is
        // checked against a real server in tests/dbcreds.rs.
        let v = scram_verifier("pencil", b"0123456789abcdef", 4096);
        assert!(
            v.starts_with("SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$"),
            "{v}"
        );
        let parts: Vec<&str> = v.rsplit('$').next().unwrap().split(':').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(STANDARD.decode(parts[0]).unwrap().len(), 32);
        assert_eq!(STANDARD.decode(parts[1]).unwrap().len(), 32);
    }

    #[test]
    fn the_admin_joins_a_login_with_what_its_version_knows() {
        // 16+: with the login's privileges but never acting as it; 14/15 have no options.
        assert_eq!(
            join_statement(170010, "twokey_ab"),
            "GRANT \"twokey_ab\" TO CURRENT_USER WITH INHERIT TRUE, SET FALSE"
        );
        assert_eq!(
            join_statement(160000, "twokey_ab"),
            "GRANT \"twokey_ab\" TO CURRENT_USER WITH INHERIT TRUE, SET FALSE"
        );
        assert_eq!(
            join_statement(150018, "twokey_ab"),
            "GRANT \"twokey_ab\" TO CURRENT_USER"
        );
    }

    #[test]
    fn passwords_are_long_and_random() {
        let (a, b) = (new_password(), new_password());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
