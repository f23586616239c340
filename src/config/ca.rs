//! The `[ca]` section: where the SSH user CA's key lives and its passphrase file. It
//! never loads or makes the key (the `ca` module does).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ConfigError, Secret};

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaConfig {
    /// The CA's private key (OpenSSH format, Ed25519); made at first start when
    /// absent. Default: DATA_DIR/ssh_user_ca.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// A file holding the passphrase the key is encrypted with at rest.
    #[serde(default)]
    pub passphrase_file: Option<PathBuf>,
}

impl CaConfig {
    pub fn key_path(&self, data_dir: &Path) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| Self::default_key_path(data_dir))
    }

    /// Where the CA key lives unless configured: DATA_DIR/ssh_user_ca.
    pub fn default_key_path(data_dir: &Path) -> PathBuf {
        data_dir.join("ssh_user_ca")
    }

    /// The key's passphrase, read from `passphrase_file`.
    pub fn passphrase(&self) -> Result<Option<Secret>, ConfigError> {
        Secret::from_optional_file("ca.passphrase_file", self.passphrase_file.as_deref())
    }
}
