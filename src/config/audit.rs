//! The `[audit]` section: where the audit chain's checkpoint signing key lives and
//! how often checkpoints are signed. It never signs or reads the chain itself.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::ca::CaConfig;
use super::duration::duration_setting;
use super::{ConfigError, Secret};

/// The key that signs checkpoints of the audit chain head. It must not live in the
/// database: whoever can write the database can recompute every hash, but cannot sign.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The signing key (OpenSSH format, Ed25519); made at first start when absent.
    /// Default: DATA_DIR/audit_signing_key.
    #[serde(default)]
    pub signing_key_file: Option<PathBuf>,
    /// A file holding the passphrase the key is encrypted with at rest. Default: the
    /// CA's (`ca.passphrase_file`), if set.
    #[serde(default)]
    pub passphrase_file: Option<PathBuf>,
    /// The background worker signs a checkpoint when the head has moved and this long
    /// has passed since the last one.
    #[serde(default = "default_checkpoint_interval", with = "duration_setting")]
    pub checkpoint_interval: Duration,
    /// ... or when this many events have been added since the last one.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
}

fn default_checkpoint_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_checkpoint_every() -> u64 {
    100
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            signing_key_file: None,
            passphrase_file: None,
            checkpoint_interval: default_checkpoint_interval(),
            checkpoint_every: default_checkpoint_every(),
        }
    }
}

impl AuditConfig {
    pub fn key_path(&self, data_dir: &Path) -> PathBuf {
        self.signing_key_file
            .clone()
            .unwrap_or_else(|| Self::default_key_path(data_dir))
    }

    /// Where the signing key lives unless configured: DATA_DIR/audit_signing_key.
    pub fn default_key_path(data_dir: &Path) -> PathBuf {
        data_dir.join("audit_signing_key")
    }

    /// The passphrase of the signing key: its own, else the CA's.
    pub fn passphrase(&self, ca: &CaConfig) -> Result<Option<Secret>, ConfigError> {
        let Some(p) = &self.passphrase_file else {
            return ca.passphrase();
        };
        Secret::from_file("audit.passphrase_file", p).map(Some)
    }

    /// How long between periodic checkpoints.
    pub fn checkpoint_interval(&self) -> Duration {
        self.checkpoint_interval
    }
}
