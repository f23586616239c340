//! The `[relay]` section: where the SSH relay listens, its keys and its limits, and
//! `[relay.postgres]`, the PostgreSQL relay's listener and TLS. It never opens a socket.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::duration::duration_setting;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Where engineers connect: `ssh -p PORT RESOURCE@host`.
    pub listen: String,
    /// The relay's host key; made at first start. Default DATA_DIR/relay_host_key.
    #[serde(default)]
    pub host_key_file: Option<PathBuf>,
    /// The CA the targets trust for the relay's upstream logins (never the engineers'
    /// CA). Made at first start; default DATA_DIR/relay_upstream_ca.
    #[serde(default)]
    pub upstream_ca_key_file: Option<PathBuf>,
    /// Connections that may be open at once; more are closed at accept, before any
    /// cryptography.
    #[serde(default = "default_relay_connections")]
    pub max_connections: usize,
    /// Connections one address may have open at once.
    #[serde(default = "default_relay_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// How long a connection may take to authenticate before it is closed.
    #[serde(default = "default_login_grace", with = "duration_setting")]
    pub login_grace_time: Duration,
    /// An authenticated connection with no traffic for this long is closed.
    #[serde(default = "default_relay_idle", with = "duration_setting")]
    pub idle_timeout: Duration,
    /// A session's recorded output stops growing past this many bytes (at least
    /// 64 KiB): a marker says so and later output is counted, not written. What the
    /// engineer types and sends (sftp requests too) is recorded past it.
    #[serde(default = "default_max_recording")]
    pub max_recording_bytes: u64,
    /// The PostgreSQL relay; off without this table.
    #[serde(default)]
    pub postgres: Option<RelayPostgresConfig>,
}

/// `[relay.postgres]`: where psql and drivers connect (`host=RELAY port=6432
/// dbname=RESOURCE user=EMAIL`), the certificate it answers SSLRequest with, and its
/// message bounds. Connection counts, the startup timeout (`login_grace_time`) and the
/// idle timeout are the `[relay]` ones.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayPostgresConfig {
    /// The listening address, e.g. `0.0.0.0:6432`.
    pub listen: String,
    /// What clients are told to connect to (`twokey psql`, the request page), as
    /// `host:port`; default: the host of `server.public_url` and the port of `listen`.
    #[serde(default)]
    pub public_address: Option<String>,
    /// The relay's TLS certificate chain (PEM) and key; without them one is made at
    /// first start under DATA_DIR (`relay_pg_cert.pem`, `relay_pg_key.pem`) naming
    /// `tls_names`, and clients pin it (`sslrootcert`, served at `/api/v1/relay/pg-cert`).
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// The DNS names and IP addresses the made certificate names; default: the host of
    /// `public_address` (or `server.public_url`), `localhost` and `127.0.0.1`.
    #[serde(default)]
    pub tls_names: Vec<String>,
    /// Admit clients that do not ask for TLS. Off by default: the relay password would
    /// cross the network readable by anyone on the path.
    #[serde(default)]
    pub allow_plaintext: bool,
    /// The largest protocol message accepted from a client or a target; a larger one
    /// ends the session with an error (PostgreSQL's own bound is 1 GiB).
    #[serde(default = "default_max_message")]
    pub max_message_bytes: u32,
}

/// 64 MiB: far beyond any statement or row a person works with, well below 1 GiB.
pub const DEFAULT_MAX_PG_MESSAGE_BYTES: u32 = 64 << 20;

fn default_max_message() -> u32 {
    DEFAULT_MAX_PG_MESSAGE_BYTES
}

/// 100 MiB of asciicast: hours of terminal work, a bounded slice of a bulk transfer.
pub const DEFAULT_MAX_RECORDING_BYTES: u64 = 100 << 20;
/// The smallest `relay.max_recording_bytes` accepted.
pub const MIN_MAX_RECORDING_BYTES: u64 = 64 << 10;

fn default_relay_connections() -> usize {
    1000
}

fn default_relay_connections_per_ip() -> usize {
    50
}

fn default_login_grace() -> Duration {
    Duration::from_secs(30)
}

fn default_relay_idle() -> Duration {
    Duration::from_secs(3600)
}

fn default_max_recording() -> u64 {
    DEFAULT_MAX_RECORDING_BYTES
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            listen: "127.0.0.1:2222".into(),
            host_key_file: None,
            upstream_ca_key_file: None,
            max_connections: default_relay_connections(),
            max_connections_per_ip: default_relay_connections_per_ip(),
            login_grace_time: default_login_grace(),
            idle_timeout: default_relay_idle(),
            max_recording_bytes: default_max_recording(),
            postgres: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{Config, demo_config_toml};

    #[test]
    fn a_recording_cap_of_nothing_is_refused() {
        let base = demo_config_toml("127.0.0.1:8080", Path::new("/tmp/x"));
        for (bytes, ok) in [(0, false), (65_535, false), (65_536, true)] {
            let text = format!(
                "{base}\n[relay]\nlisten = \"127.0.0.1:0\"\nmax_recording_bytes = {bytes}\n"
            );
            let checked = Config::parse(&text, "t").and_then(|c| c.validate());
            match checked {
                Ok(_) => assert!(ok, "{bytes} accepted"),
                Err(e) => {
                    assert!(!ok, "{bytes}: {e}");
                    assert!(
                        e.to_string().starts_with("relay.max_recording_bytes"),
                        "{e}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_postgres_relay_and_access_are_checked() {
        let base = demo_config_toml("127.0.0.1:8080", Path::new("/tmp/x"));
        let db = "name = \"demo-db\"\nkind = \"postgres\"\n";
        let admin = "address = \"127.0.0.1:5432\"\ndatabase = \"app\"\nadmin_user = \"twokey\"\nadmin_password_file = \"/tmp/x/pw\"\n";
        let relay =
            "\n[relay]\nlisten = \"127.0.0.1:0\"\n[relay.postgres]\nlisten = \"127.0.0.1:0\"\n";
        let cases: &[(String, Option<&str>)] = &[
            // No relay: direct, as before.
            (base.clone(), None),
            // The relay on: relay is the default, and needs the admin to make logins.
            (
                format!("{base}{relay}"),
                Some("resource demo-db.admin_user"),
            ),
            (
                format!("{}{relay}", base.replacen(db, &format!("{db}{admin}"), 1)),
                None,
            ),
            // Asked for without the relay.
            (
                base.replacen(db, &format!("{db}access = \"relay\"\n"), 1),
                Some("resource demo-db.access"),
            ),
            (
                format!(
                    "{}{relay}",
                    base.replacen(db, &format!("{db}access = \"direct\"\n"), 1)
                ),
                None,
            ),
            // Not for SSH resources.
            (
                base.replacen(
                    "kind = \"ssh\"\n",
                    "kind = \"ssh\"\naccess = \"direct\"\n",
                    1,
                ),
                Some("resource demo-ssh.access"),
            ),
            (
                format!(
                    "{}{relay}tls_cert_file = \"/tmp/c.pem\"\n",
                    base.replacen(db, &format!("{db}{admin}"), 1)
                ),
                Some("relay.postgres.tls_cert_file"),
            ),
            (
                format!(
                    "{}{relay}max_message_bytes = 100\n",
                    base.replacen(db, &format!("{db}{admin}"), 1)
                ),
                Some("relay.postgres.max_message_bytes"),
            ),
            (
                format!(
                    "{base}\n[relay]\nlisten = \"127.0.0.1:0\"\n[relay.postgres]\nlisten = \"nowhere\"\n"
                ),
                Some("relay.postgres.listen"),
            ),
        ];
        for (text, want) in cases {
            let got = Config::parse(text, "t").and_then(|c| c.validate());
            match (got, want) {
                (Ok(_), None) => {}
                (Err(e), Some(w)) => assert!(e.to_string().starts_with(w), "{e} / {w}"),
                (Ok(_), Some(w)) => panic!("accepted, wanted {w}:\n{text}"),
                (Err(e), None) => panic!("{e}:\n{text}"),
            }
        }
        let c = Config::parse(
            &format!("{}{relay}", base.replacen(db, &format!("{db}{admin}"), 1)),
            "t",
        )
        .unwrap();
        let r = c.resource("demo-db").unwrap();
        assert_eq!(c.db_access(r), super::super::DbAccess::Relay);
        assert_eq!(c.relay_postgres_address().as_deref(), Some("127.0.0.1:0"));
    }
}
