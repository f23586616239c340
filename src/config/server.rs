//! The `[server]` section: where twokey listens, its public URL, data directory and
//! database, and how often its background workers run. Its `Debug` never shows the
//! database URL (it may carry a password).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::Secret;
use super::duration::duration_setting;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the web app and API listen on.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The URL users reach twokey at; decides whether cookies are `Secure`.
    #[serde(default)]
    pub public_url: Option<String>,
    /// Where the SQLite database (and later recordings) live.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// `sqlite://PATH`; defaults to `DATA_DIR/twokey.db`. May carry a password for
    /// other backends, hence a [`Secret`].
    #[serde(default)]
    pub database_url: Option<Secret>,
    /// How often expired requests and grants are swept (`"1s"`, `"5s"`); `"0s"`
    /// turns the background sweeper off (tests drive it by hand).
    #[serde(default = "default_sweep_interval", with = "duration_setting")]
    pub sweep_interval: Duration,
    /// How often the notification outbox is delivered; `"0s"` turns the worker off.
    #[serde(default = "default_outbox_interval", with = "duration_setting")]
    pub outbox_interval: Duration,
    /// How often database logins are checked against live grants (also at start, and
    /// at once when a grant ends or is revoked); `"0s"` turns it off (tests drive it).
    #[serde(default = "default_reconcile_interval", with = "duration_setting")]
    pub reconcile_interval: Duration,
    /// Reverse proxies (IP addresses) whose `X-Forwarded-For` names the client, for
    /// the per-address rate limits. Empty: the peer address is the client.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

fn default_outbox_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_reconcile_interval() -> Duration {
    Duration::from_secs(60)
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            public_url: None,
            data_dir: default_data_dir(),
            database_url: None,
            sweep_interval: default_sweep_interval(),
            outbox_interval: default_outbox_interval(),
            reconcile_interval: default_reconcile_interval(),
            trusted_proxies: Vec::new(),
        }
    }
}

pub(super) fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("./twokey-data")
}
fn default_sweep_interval() -> Duration {
    Duration::from_secs(1)
}
