//! The `[ca]` section: where the SSH user CA's key lives and its passphrase file. It
//! never loads or makes the key (the `ca` module does).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ConfigError, invalid};

#[derive(Debug, Clone, Default, Deserialize)]
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

    pub fn passphrase(&self) -> Result<Option<String>, ConfigError> {
        let Some(p) = &self.passphrase_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(p).map_err(|e| {
            invalid(
                "ca.passphrase_file",
                format!("cannot read {}: {e}", p.display()),
            )
        })?;
        let pass = text.trim_end_matches(['\n', '\r']).to_string();
        if pass.is_empty() {
            return Err(invalid("ca.passphrase_file", "the file is empty"));
        }
        Ok(Some(pass))
    }
}
