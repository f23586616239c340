//! The SSH protocol layer of the relay, on the shared core (`relay::admission`,
//! `live`, `limits`, `lifecycle`). A tour:
//! - [`certificate`]: what an SSH certificate is checked for before the shared admission.
//! - [`server`]: the accept loop and the russh handler (`Conn`): login, channels,
//!   forwarding refused or allowed by the role, `ssh -J`.
//! - [`bridge`]: one relayed session (opened and closed by the lifecycle) or forwarded
//!   port; [`pump`] moves its bytes through the recording.
//! - [`upstream`]: the relay as the target's SSH client, with the upstream CA;
//!   [`host_keys`]: which target host keys are trusted.
//! - [`commands`]: how an exec request splits into commands for `blocked_commands`;
//!   [`sftp`]: reading sftp requests for the recording.
//! - [`RelayKeys`] and the algorithms offered each way.
//!
//! The core must never import this room; this room decides nothing about grants
//! itself, and asks the core each time.

pub mod bridge;
pub mod certificate;
pub mod commands;
pub mod host_keys;
pub mod pump;
pub mod server;
pub mod sftp;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use russh::{MethodKind, MethodSet};

use crate::ca::Ca;
use crate::error::Result;
use crate::relay::instance::Instance;

/// Whether a live SSH session of a role must connect again to run under `new`: the
/// upstream certificate it logged in with carries the role's principals, extensions
/// (port forwarding, a pty), forced command and source addresses as they were. Its
/// command lists are read at each command and need no new session.
pub(crate) fn must_reconnect(
    old: &crate::config::RoleConfig,
    new: &crate::config::RoleConfig,
) -> bool {
    old.principals != new.principals
        || old.extensions != new.extensions
        || old.force_command != new.force_command
        || old.source_address != new.source_address
}

/// The relay's keys: its own host key, and the upstream CA targets trust; and the id
/// of this relay instance (kept in the data dir), which each session row carries.
pub struct RelayKeys {
    pub host: Ca,
    pub upstream_ca: Ca,
    pub instance: Instance,
}

impl RelayKeys {
    /// Loads (or makes) both keys. With `ca.passphrase_file` they are kept encrypted
    /// at rest with the CA key's passphrase: whoever reads the data dir must not get the
    /// key every target trusts.
    pub fn load(
        config: &crate::config::RelayConfig,
        ca: &crate::config::CaConfig,
        data_dir: &std::path::Path,
    ) -> Result<Self> {
        let at = |p: &Option<std::path::PathBuf>, name: &str| crate::config::CaConfig {
            key_file: Some(p.clone().unwrap_or_else(|| data_dir.join(name))),
            passphrase_file: ca.passphrase_file.clone(),
        };
        Ok(RelayKeys {
            instance: Instance::load(data_dir)?,
            host: Ca::load_or_create(&at(&config.host_key_file, "relay_host_key"), data_dir)?,
            upstream_ca: Ca::load_or_create(
                &at(&config.upstream_ca_key_file, "relay_upstream_ca"),
                data_dir,
            )?,
        })
    }
}

/// The relay's SSH server settings: public keys (certificates) only, its host key, the
/// idle timeout, the algorithms it offers engineers.
pub(crate) fn server_config(
    keys: &RelayKeys,
    limits: &crate::config::RelayConfig,
) -> Arc<russh::server::Config> {
    let mut methods = MethodSet::empty();
    methods.push(MethodKind::PublicKey);
    Arc::new(russh::server::Config {
        methods,
        keys: vec![keys.host.private_key().clone()],
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::from_millis(0)),
        max_auth_attempts: 6,
        // An authenticated connection with nothing flowing; before authentication the
        // login grace time (LoginGrace) applies.
        inactivity_timeout: Some(limits.idle_timeout),
        nodelay: true,
        preferred: engineer_algorithms(),
        ..Default::default()
    })
}

/// What the relay offers engineers: AES only, GCM first. OpenSSH picks its own first
/// choice among these (aes128-ctr with hmac-sha2-256-etm; `twokey ssh --relay` asks for
/// AES-GCM), and on AES-NI machines both move data faster through the relay than
/// ChaCha20-Poly1305, which it does not offer. Every SSH client has AES-CTR.
fn engineer_algorithms() -> russh::Preferred {
    use russh::cipher;
    russh::Preferred {
        // No RFC 4253 `zlib`, which starts before authentication and exposes the
        // decompressor to anyone who connects; `zlib@openssh.com` starts only after a
        // login succeeds.
        compression: std::borrow::Cow::Borrowed(&[
            russh::compression::NONE,
            russh::compression::ZLIB_LEGACY,
        ]),
        ..ciphers(&[
            cipher::AES_256_GCM,
            cipher::AES_128_GCM,
            cipher::AES_256_CTR,
            cipher::AES_192_CTR,
            cipher::AES_128_CTR,
        ])
    }
}

/// AES-GCM first towards the target, where the relay is the client and so chooses:
/// with AES-NI it costs the relay less CPU than ChaCha20-Poly1305.
fn upstream_algorithms() -> russh::Preferred {
    use russh::cipher;
    ciphers(&[
        cipher::AES_256_GCM,
        cipher::AES_128_GCM,
        cipher::CHACHA20_POLY1305,
        cipher::AES_256_CTR,
        cipher::AES_128_CTR,
    ])
}

/// russh's defaults with these ciphers, in this order.
fn ciphers(names: &'static [russh::cipher::Name]) -> russh::Preferred {
    russh::Preferred {
        cipher: std::borrow::Cow::Borrowed(names),
        ..Default::default()
    }
}
