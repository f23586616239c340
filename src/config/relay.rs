//! The `[relay]` section: where the SSH relay listens, its keys and its limits. It
//! never opens a socket.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::duration::duration_setting;

#[derive(Debug, Clone, Deserialize)]
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
}
