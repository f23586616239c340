//! The relay instance: the id kept in the data dir that each session row carries, and
//! the claim (a file lock) a running process holds on it, so that a second process on
//! the same data dir never closes this one's live sessions as interrupted.

use crate::error::{Error, Result};

/// This relay instance's id, kept in the data dir, which each session row carries;
/// the file is also the lock a running process holds ([`super::claim_instance`]).
pub struct Instance {
    pub id: String,
    pub(crate) file: std::path::PathBuf,
}

impl Instance {
    /// Reads the instance id in `data_dir`, or makes one.
    pub fn load(data_dir: &std::path::Path) -> Result<Instance> {
        let instance_file = data_dir.join("relay_instance");
        let instance = match std::fs::read_to_string(&instance_file) {
            Ok(id) if !id.trim().is_empty() => id.trim().to_string(),
            _ => {
                let id = uuid::Uuid::new_v4().to_string();
                std::fs::write(&instance_file, format!("{id}\n")).map_err(|e| {
                    Error::Internal(format!("relay: writing {}: {e}", instance_file.display()))
                })?;
                id
            }
        };
        Ok(Instance {
            id: instance,
            file: instance_file,
        })
    }
}

/// This process's claim on the relay instance of its data dir: a lock held while it
/// runs. None when the relay is off, or another process holds it.
pub struct InstanceClaim(pub(crate) Option<std::fs::File>);

impl InstanceClaim {
    /// No claim: the relay is off.
    pub fn none() -> Self {
        InstanceClaim(None)
    }
}
