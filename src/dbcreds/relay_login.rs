//! Relay passwords: what the holder of a live grant on a PostgreSQL resource reached
//! through the relay (`access = "relay"`) gives psql or a driver, with `user` = their
//! email and `dbname` = the resource, to log in at the PostgreSQL relay.
//!
//! The password is made here, shown once and kept only as its SCRAM-SHA-256 verifier
//! (beside its grant, in `relay_db_logins`); issuing another replaces it. It is worth
//! nothing without a live grant: the relay checks the grant again at every login.
//!
//! What this module must never do: store, log or audit the password (or its verifier),
//! or hand out a login for a resource engineers reach directly (that is [`super::issue`])
//! — nor, for a relay resource, the target's own login.

use serde_json::json;

use crate::config::{DbAccess, ResourceKind};
use crate::error::{Error, Result};
use crate::policy::Actor;
use crate::state::AppState;
use crate::store;

use super::{SCRAM_ITERATIONS, new_password, scram_verifier};

/// The file name [`RelayLogin::conninfo`] gives `sslrootcert`: where the page tells the
/// engineer to save the relay's certificate (`/api/v1/relay/pg-cert`).
pub const RELAY_CERT_FILE: &str = "twokey-relay.pem";

/// A relay password just issued, and where to use it. The password is in here once and
/// nowhere else.
#[derive(serde::Serialize)]
pub struct RelayLogin {
    /// The grant holder's email: the `user` the relay expects.
    pub user: String,
    pub password: String,
    /// Where the relay is (`relay.postgres.public_address`, or derived).
    pub host: String,
    pub port: u16,
    /// The resource's name: the `dbname` clients give the relay.
    pub database: String,
    /// Always `verify-full`: the client checks the relay's certificate and name.
    pub sslmode: String,
    /// The relay's certificate (PEM), for `sslrootcert`: clients pin it.
    pub sslrootcert_pem: String,
    /// SHA-256 of the relay's certificate (DER), as hex.
    pub fingerprint: String,
    /// The grant's end (RFC 3339): the password stops working then.
    pub expires_at: String,
    /// A libpq connection string without the password, with `sslrootcert` =
    /// [`RELAY_CERT_FILE`] (the PEM above saved under that name).
    pub conninfo: String,
}

impl std::fmt::Debug for RelayLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayLogin")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

/// Makes (or replaces) the relay password of the holder's live grant on a PostgreSQL
/// resource reached through the relay.
pub async fn issue_relay_login(
    state: &AppState,
    actor: &Actor,
    request_id: &str,
) -> Result<RelayLogin> {
    let now = state.now_ms();
    let crate::access::HeldGrant {
        actor: holder,
        grant,
        ref resource,
        ..
    } = {
        let mut conn = state.db.acquire().await?;
        crate::access::holders_live_grant(state, &mut conn, actor, request_id, now).await?
    };
    if resource.kind != ResourceKind::Postgres {
        return Err(Error::conflict(format!(
            "{} is not a database: relay passwords are for postgres resources",
            resource.name
        )));
    }
    if state.config().db_access(resource) != DbAccess::Relay {
        return Err(Error::conflict(format!(
            "{} is reached directly, not through twokey's relay: use \"Get database \
             credentials\" on the request page (or `twokey psql {}`)",
            resource.name, resource.name
        )));
    }
    let (Some(tls), Some(address)) = (&state.relay_pg, state.config().relay_postgres_address())
    else {
        return Err(Error::conflict(
            "twokey's PostgreSQL relay is not configured",
        ));
    };
    let (host, port) = split_address(&address).ok_or_else(|| {
        Error::Internal(format!("relay.postgres: bad public address {address:?}"))
    })?;

    let password = new_password();
    let salt: [u8; 16] = rand::random();
    // Only the verifier is kept: the table (or a backup of it) cannot log anyone in.
    let verifier = scram_verifier(&password, &salt, SCRAM_ITERATIONS);
    let mut tx = store::begin_write(&state.db).await?;
    // Checked again inside the write transaction: a revocation that landed since the
    // check above must not be followed by a password for the dead grant.
    let still_live = store::grant_for_request(&mut tx, request_id)
        .await?
        .is_some_and(|g| g.id == grant.id && g.is_live(now));
    if !still_live {
        return Err(Error::conflict("this grant ended just now"));
    }
    store::set_relay_db_login(&mut tx, &grant.id, &verifier, now).await?;
    crate::audit::append(
        &mut tx,
        now,
        &crate::audit::NewEvent {
            actor: &holder.email,
            action: "relay_password.issued",
            subject: &grant.id,
            details: json!({
                "request_id": request_id,
                "resource": resource.name,
                "by": holder.identity(),
            }),
        },
    )
    .await?;
    tx.commit().await?;

    let conninfo = conninfo(&[
        ("host", &host),
        ("port", &port.to_string()),
        ("dbname", &resource.name),
        ("user", &holder.email),
        ("sslmode", "verify-full"),
        ("sslrootcert", RELAY_CERT_FILE),
    ]);
    Ok(RelayLogin {
        user: holder.email,
        password,
        host,
        port,
        database: resource.name.clone(),
        sslmode: "verify-full".into(),
        sslrootcert_pem: tls.cert_pem.clone(),
        fingerprint: tls.fingerprint.clone(),
        expires_at: crate::clock::from_millis(grant.ends_at)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        conninfo,
    })
}

/// `host:port` (or `[v6]:port`) as host and port.
fn split_address(address: &str) -> Option<(String, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port.parse().ok()?))
}

/// A libpq keyword/value connection string. A value with a space, a quote or a
/// backslash (or an empty one) is single-quoted with `\` escapes, as libpq reads it;
/// anything else stays bare.
pub fn conninfo(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            let plain = !v.is_empty()
                && !v
                    .chars()
                    .any(|c| c.is_whitespace() || c == '\'' || c == '\\');
            if plain {
                format!("{k}={v}")
            } else {
                format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_values_are_quoted_as_libpq_reads_them() {
        for (value, want) in [
            ("prod-db", "dbname=prod-db"),
            ("alice@example.com", "dbname=alice@example.com"),
            ("", "dbname=''"),
            ("my db", "dbname='my db'"),
            ("it's", r"dbname='it\'s'"),
            (r"a\b", r"dbname='a\\b'"),
            ("tab\there", "dbname='tab\there'"),
        ] {
            assert_eq!(conninfo(&[("dbname", value)]), want, "{value:?}");
        }
        assert_eq!(
            conninfo(&[("host", "relay.example.com"), ("port", "6432")]),
            "host=relay.example.com port=6432"
        );
    }

    #[test]
    fn relay_addresses_split_into_host_and_port() {
        for (address, want) in [
            ("relay.example.com:6432", Some(("relay.example.com", 6432))),
            ("127.0.0.1:5", Some(("127.0.0.1", 5))),
            ("[::1]:6432", Some(("::1", 6432))),
            ("relay.example.com", None),
            (":6432", None),
            ("relay:port", None),
            ("relay:70000", None),
        ] {
            let got = split_address(address);
            assert_eq!(
                got.as_ref().map(|(h, p)| (h.as_str(), *p)),
                want,
                "{address}"
            );
        }
    }

    #[test]
    fn debug_never_shows_the_password() {
        let l = RelayLogin {
            user: "alice@example.com".into(),
            password: "s3cretPassw0rdThatMustNotLeak123".into(),
            host: "h".into(),
            port: 1,
            database: "d".into(),
            sslmode: "verify-full".into(),
            sslrootcert_pem: String::new(),
            fingerprint: String::new(),
            expires_at: String::new(),
            conninfo: String::new(),
        };
        let shown = format!("{l:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}
