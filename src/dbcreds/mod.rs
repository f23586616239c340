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
//!
//! This file holds the shared pieces (names, quoting, SCRAM, the admin connection);
//! `issue.rs` makes logins, `relay_login.rs` relay passwords, `reconcile.rs` ends
//! logins, `target.rs` checks the admin's privileges on a live target, `check.rs` the
//! settings.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::{Digest, Sha256};
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgSslMode};

use crate::config::{ResourceConfig, Secret};
use crate::error::{Error, Result};
use crate::state::AppState;
use crate::store;

pub use check::check_config;

mod check;
mod issue;
mod reconcile;
mod relay_login;
mod target;
mod upstream;

pub use issue::*;
pub use reconcile::*;
pub use relay_login::*;
pub use target::*;
pub use upstream::*;

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
