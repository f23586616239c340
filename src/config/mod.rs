//! The typed configuration: one TOML file, `TWOKEY_*` environment overrides, and
//! validation that names the offending key and what to do about it.
//!
//! This module owns parsing and checking its own values only: one file per section,
//! defaults written once (serde and `Default` share them), durations parsed at load
//! ([`parse_duration`]), every secret a [`Secret`] whose `Debug` is redacted. It imports
//! no module above it: the rules `ca`, `dbcreds` and `policy` apply to their settings
//! are theirs (`check_config`, run by `server::check_config`).

mod audit;
mod auth;
mod ca;
mod demo;
mod duration;
mod notify;
mod relay;
mod reload;
mod resources;
mod secret;
mod server;
mod validation;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use audit::AuditConfig;
pub use auth::{AuthConfig, DevUser, OidcConfig};
pub use ca::CaConfig;
pub use demo::demo_config_toml;
pub use duration::parse_duration;
pub use notify::{EmailConfig, SlackConfig, SmtpTls};
pub use relay::{
    DEFAULT_MAX_PG_MESSAGE_BYTES, DEFAULT_MAX_RECORDING_BYTES, MIN_MAX_RECORDING_BYTES,
    RelayConfig, RelayPostgresConfig,
};
pub use reload::{Reload, reload};
pub use resources::{
    DbAccess, MaskMethod, MaskRule, PolicyConfig, ResourceConfig, ResourceKind, ReviewPolicy,
    RoleConfig, SqlPolicy,
};
pub use secret::Secret;
pub use server::ServerConfig;

/// Everything twokey runs with. `Default` is what an empty file means: every section's
/// defaults come from the same functions serde uses (a test holds the two equal).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub resources: Vec<ResourceConfig>,
    /// Email notifications; none are sent without this section.
    #[serde(default)]
    pub email: Option<EmailConfig>,
    /// Slack notifications with Approve/Deny buttons.
    #[serde(default)]
    pub slack: Option<SlackConfig>,
    /// The SSH user certificate authority.
    #[serde(default)]
    pub ca: CaConfig,
    /// The SSH relay: on when this section is present.
    #[serde(default)]
    pub relay: Option<RelayConfig>,
    /// The audit log's signing key and how often checkpoints are signed.
    #[serde(default)]
    pub audit: AuditConfig,
}

/// A configuration problem, naming the key and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

/// A [`ConfigError::Invalid`] naming `key`; the modules that check their own settings
/// (`ca`, `dbcreds`, `policy`) report with it too.
pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}
/// serde's words for a value of the wrong kind or an unexpected value, without the
/// value itself (it could be a secret written in the wrong place, and this is logged):
/// ``invalid type: integer `123456`, expected a string`` becomes `invalid type:
/// integer, expected a string` (and so for a quoted string). Names of fields and
/// variants are kept.
fn without_values(message: &str) -> String {
    if !(message.starts_with("invalid type: ") || message.starts_with("invalid value: ")) {
        return message.to_string();
    }
    let (head, tail) = message.split_once(", expected").unwrap_or((message, ""));
    let head = match [head.find(" `"), head.find(" \"")]
        .into_iter()
        .flatten()
        .min()
    {
        Some(at) => &head[..at],
        None => head,
    };
    if tail.is_empty() {
        head.to_string()
    } else {
        format!("{head}, expected{tail}")
    }
}

impl Config {
    /// Reads, applies `TWOKEY_*` overrides, and runs the config's own checks
    /// ([`Config::validate`]); `server::check_config` runs those and the checks of the
    /// modules that use the values.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let config = Config::read(path)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and applies `TWOKEY_*` overrides, without validating: for callers that run
    /// every check themselves (`server::check_config`).
    pub fn read(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::parse(&text, &path.display().to_string())?;
        config.apply_env(|k| std::env::var(k).ok())?;
        Ok(config)
    }

    /// Parses TOML; unknown keys and values of the wrong kind (a duration that is not
    /// one, say) are errors that name the key and its line.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            if key == "." || key.is_empty() {
                // Not TOML at all: toml's own message names the line. Its excerpt of
                // the file is left out: the line could hold a secret, and this is
                // logged.
                let full = inner.to_string();
                let mut lines = full.lines().map(str::trim).filter(|l| !l.is_empty());
                let at = lines.next().unwrap_or_default().to_string();
                let why = full
                    .lines()
                    .map(str::trim)
                    .rfind(|l| !l.is_empty() && !l.contains('|'))
                    .unwrap_or_default();
                return ConfigError::Parse {
                    path: origin.to_string(),
                    message: if why.is_empty() || why == at {
                        at
                    } else {
                        format!("{at}: {why}")
                    },
                };
            }
            let line = inner
                .span()
                .map(|span| {
                    let upto = text.get(..span.start).unwrap_or(text);
                    format!(" ({origin}, line {})", upto.matches('\n').count() + 1)
                })
                .unwrap_or_default();
            invalid(
                key,
                format!("{}{line}", without_values(inner.message().trim_end())),
            )
        })
    }

    /// `TWOKEY_LISTEN`, `TWOKEY_PUBLIC_URL`, `TWOKEY_DATA_DIR`, `TWOKEY_DATABASE_URL`
    /// (or `TWOKEY_DATABASE_URL_FILE`, read from a file so it stays out of `ps`).
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = var("TWOKEY_LISTEN") {
            self.server.listen = v;
        }
        if let Some(v) = var("TWOKEY_PUBLIC_URL") {
            self.server.public_url = Some(v);
        }
        if let Some(v) = var("TWOKEY_DATA_DIR") {
            self.server.data_dir = PathBuf::from(v);
        }
        if let Some(v) = var("TWOKEY_DATABASE_URL") {
            self.server.database_url = Some(Secret::new("TWOKEY_DATABASE_URL", &v)?);
        } else if let Some(file) = var("TWOKEY_DATABASE_URL_FILE") {
            self.server.database_url = Some(Secret::from_file(
                "TWOKEY_DATABASE_URL_FILE",
                Path::new(&file),
            )?);
        }
        Ok(())
    }

    /// `server.listen` as an address; never a stand-in for one that does not parse.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server
            .listen
            .parse()
            .map_err(|_| invalid("server.listen", "must be IP:PORT, e.g. \"127.0.0.1:8080\""))
    }

    /// `server.database_url`, else `sqlite://DATA_DIR/twokey.db`.
    pub fn database_url(&self) -> Secret {
        match &self.server.database_url {
            Some(url) => url.clone(),
            None => Secret::generated(format!(
                "sqlite://{}",
                self.server.data_dir.join("twokey.db").display()
            )),
        }
    }

    /// `server.trusted_proxies`, parsed (checked in validate()).
    pub fn trusted_proxies(&self) -> Vec<std::net::IpAddr> {
        self.server
            .trusted_proxies
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    pub fn secure_cookies(&self) -> bool {
        self.server
            .public_url
            .as_deref()
            .is_some_and(|u| u.starts_with("https://"))
    }

    pub fn outbox_interval(&self) -> Duration {
        self.server.outbox_interval
    }

    pub fn reconcile_interval(&self) -> Duration {
        self.server.reconcile_interval
    }

    pub fn sweep_interval(&self) -> Duration {
        self.server.sweep_interval
    }

    pub fn token_ttl(&self) -> Duration {
        self.auth.token_ttl
    }

    pub fn cli_token_ttl(&self) -> Duration {
        self.auth.cli_token_ttl
    }

    pub fn groups_max_age(&self) -> Duration {
        self.auth.groups_max_age
    }

    pub fn session_lifetime(&self) -> Duration {
        self.auth.session_lifetime
    }

    /// The base URL for links in messages.
    pub fn public_url(&self) -> String {
        match &self.server.public_url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None => format!("http://{}", self.server.listen),
        }
    }

    /// Where the identity provider sends the browser back to.
    pub fn oidc_redirect_url(&self) -> String {
        let base = self
            .server
            .public_url
            .as_deref()
            .map(str::to_string)
            .unwrap_or_else(|| format!("http://{}", server::default_listen()));
        format!("{}/auth/oidc/callback", base.trim_end_matches('/'))
    }

    pub fn session_idle_timeout(&self) -> Duration {
        self.auth.session_idle_timeout
    }

    /// The pending TTL that applies to a role: its own, else `policy.pending_ttl`.
    pub fn pending_ttl(&self, role: &RoleConfig) -> Duration {
        role.pending_ttl.unwrap_or(self.policy.pending_ttl)
    }

    pub fn resource(&self, name: &str) -> Option<&ResourceConfig> {
        self.resources.iter().find(|r| r.name == name)
    }

    pub fn role(&self, resource: &str, role: &str) -> Option<(&ResourceConfig, &RoleConfig)> {
        let r = self.resource(resource)?;
        let role = r.roles.iter().find(|x| x.name == role)?;
        Some((r, role))
    }

    /// The PostgreSQL relay's settings, when it is on.
    pub fn relay_postgres(&self) -> Option<&RelayPostgresConfig> {
        self.relay.as_ref().and_then(|r| r.postgres.as_ref())
    }

    /// How engineers reach a PostgreSQL resource: as it says, else through the relay
    /// when the PostgreSQL relay is on (the stricter path), else directly.
    pub fn db_access(&self, resource: &ResourceConfig) -> DbAccess {
        resource
            .access
            .unwrap_or(if self.relay_postgres().is_some() {
                DbAccess::Relay
            } else {
                DbAccess::Direct
            })
    }

    /// Where clients reach the PostgreSQL relay, as `host:port`: `public_address`, else
    /// the host of `server.public_url` (else of `listen`) with the port of `listen`.
    pub fn relay_postgres_address(&self) -> Option<String> {
        let pg = self.relay_postgres()?;
        if let Some(a) = &pg.public_address {
            return Some(a.clone());
        }
        let port = pg.listen.rsplit_once(':').map_or("6432", |(_, p)| p);
        let host = self
            .server
            .public_url
            .as_deref()
            .and_then(|u| reqwest::Url::parse(u).ok())
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_else(|| match pg.listen.rsplit_once(':').map_or("", |(h, _)| h) {
                "" | "0.0.0.0" | "[::]" => "127.0.0.1".to_string(),
                h => h.to_string(),
            });
        Some(format!("{host}:{port}"))
    }

    pub fn dev_user(&self, email: &str) -> Option<&DevUser> {
        self.auth
            .dev_users
            .iter()
            .find(|u| u.email.eq_ignore_ascii_case(email))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_value_of_the_wrong_kind_is_named_by_its_key_without_quoting_it() {
        let err = Config::parse("[auth]\ndev_login = \"hunter2\"\n", "twokey.toml").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("auth.dev_login") && text.contains("expected a boolean"),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn a_file_that_is_not_toml_is_named_by_its_line_without_quoting_it() {
        let err = Config::parse("[server]\nsecret = \"hunter2\n", "twokey.toml").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("twokey.toml") && text.contains("line 2"),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
    }

    fn demo() -> Config {
        Config::parse(
            &demo_config_toml("127.0.0.1:8080", Path::new("/tmp/x")),
            "demo",
        )
        .unwrap()
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[server]\nlisten = \"127.0.0.1:1\"\nlistne = 1\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listne"), "{err}");
    }

    #[test]
    fn env_overrides_apply() {
        let mut c = demo();
        c.apply_env(|k| (k == "TWOKEY_LISTEN").then(|| "127.0.0.1:9999".to_string()))
            .unwrap();
        assert_eq!(c.listen_addr().unwrap().port(), 9999);
        let err = c
            .apply_env(|k| (k == "TWOKEY_DATABASE_URL_FILE").then(|| "/nonexistent/x".to_string()))
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("TWOKEY_DATABASE_URL_FILE: cannot read"),
            "{err}"
        );
    }

    #[test]
    fn every_promised_override_lands() {
        let dir = tempfile::tempdir().unwrap();
        let url_file = dir.path().join("url");
        std::fs::write(&url_file, "postgres://u:pw@db/from-file\n").unwrap();
        let url_file = url_file.display().to_string();
        type Read = fn(&Config) -> String;
        type Vars = &'static [(&'static str, &'static str)];
        let url: Read = |c| c.database_url().expose().to_string();
        // (variables set, what lands); README "Configuration" promises each one.
        let cases: &[(Vars, Read, &str)] = &[
            (
                &[("TWOKEY_LISTEN", "127.0.0.1:9999")],
                |c| c.listen_addr().unwrap().to_string(),
                "127.0.0.1:9999",
            ),
            (
                &[("TWOKEY_PUBLIC_URL", "https://twokey.example.com")],
                |c| c.public_url(),
                "https://twokey.example.com",
            ),
            (
                &[("TWOKEY_DATA_DIR", "/srv/twokey")],
                |c| c.server.data_dir.display().to_string(),
                "/srv/twokey",
            ),
            (
                &[("TWOKEY_DATA_DIR", "/srv/twokey")],
                url,
                "sqlite:///srv/twokey/twokey.db",
            ),
            (
                &[("TWOKEY_DATABASE_URL", "postgres://u:pw@db/env")],
                url,
                "postgres://u:pw@db/env",
            ),
            (
                &[("TWOKEY_DATABASE_URL_FILE", "")],
                url,
                "postgres://u:pw@db/from-file",
            ),
            // Given both, the value wins over the file.
            (
                &[
                    ("TWOKEY_DATABASE_URL", "postgres://u:pw@db/env"),
                    ("TWOKEY_DATABASE_URL_FILE", ""),
                ],
                url,
                "postgres://u:pw@db/env",
            ),
        ];
        for (vars, read, want) in cases {
            let mut c = demo();
            let before = read(&c);
            assert_ne!(before, *want, "{vars:?} would change nothing");
            c.apply_env(|k| {
                vars.iter()
                    .find(|(name, _)| *name == k)
                    .map(|(name, v)| match *name {
                        "TWOKEY_DATABASE_URL_FILE" => url_file.clone(),
                        _ => v.to_string(),
                    })
            })
            .unwrap();
            c.validate().unwrap();
            assert_eq!(read(&c), *want, "{vars:?}");
        }
        // Nothing set: nothing changes.
        let mut c = demo();
        c.apply_env(|_| None).unwrap();
        assert_eq!(format!("{c:?}"), format!("{:?}", demo()));
        // An empty value or file is refused, naming the variable; so is a missing file.
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let empty = empty.display().to_string();
        for (name, value, want) in [
            (
                "TWOKEY_DATABASE_URL",
                "",
                "TWOKEY_DATABASE_URL: must not be empty",
            ),
            (
                "TWOKEY_DATABASE_URL_FILE",
                empty.as_str(),
                "TWOKEY_DATABASE_URL_FILE: the file is empty",
            ),
            (
                "TWOKEY_DATABASE_URL_FILE",
                "/nonexistent/x",
                "TWOKEY_DATABASE_URL_FILE: cannot read /nonexistent/x: ",
            ),
        ] {
            let err = demo()
                .apply_env(|k| (k == name).then(|| value.to_string()))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(want), "{err}");
        }
    }

    #[test]
    fn defaults_are_what_an_empty_file_means() {
        let empty = Config::parse("", "t").unwrap();
        assert_eq!(format!("{:?}", Config::default()), format!("{empty:?}"));
        let sections = Config::parse("[server]\n[auth]\n[policy]\n[ca]\n[audit]\n", "t").unwrap();
        assert_eq!(format!("{:?}", Config::default()), format!("{sections:?}"));
        // The relay's Default (used by tests that build one) matches the file's
        // defaults once its required listen address is given.
        let relay = Config::parse("[relay]\nlisten = \"127.0.0.1:2222\"\n", "t").unwrap();
        assert_eq!(
            format!("{:?}", relay.relay.unwrap()),
            format!("{:?}", RelayConfig::default())
        );
        // And the values are the documented ones, not just equal to each other.
        let c = Config::default();
        assert_eq!(c.server.listen, "127.0.0.1:8080");
        assert_eq!(c.server.data_dir, PathBuf::from("./twokey-data"));
        assert_eq!(c.sweep_interval(), Duration::from_secs(1));
        assert_eq!(c.outbox_interval(), Duration::from_secs(2));
        assert_eq!(c.reconcile_interval(), Duration::from_secs(60));
        assert_eq!(c.auth.admin_groups, ["admins"]);
        assert_eq!(c.session_idle_timeout(), Duration::from_secs(8 * 3600));
        assert_eq!(c.session_lifetime(), Duration::from_secs(12 * 3600));
        assert_eq!(c.token_ttl(), Duration::from_secs(7 * 86400));
        assert_eq!(c.cli_token_ttl(), Duration::from_secs(12 * 3600));
        assert_eq!(c.groups_max_age(), Duration::from_secs(86400));
        assert_eq!(c.policy.pending_ttl, Duration::from_secs(24 * 3600));
        assert_eq!(c.audit.checkpoint_interval(), Duration::from_secs(60));
        assert_eq!(c.audit.checkpoint_every, 100);
        assert_eq!(
            c.database_url().expose(),
            "sqlite://./twokey-data/twokey.db"
        );
        assert_eq!(
            c.oidc_redirect_url(),
            "http://127.0.0.1:8080/auth/oidc/callback"
        );
    }

    #[test]
    fn debug_redacts_database_url() {
        let mut c = demo();
        c.server.database_url = Some(Secret::new("k", "postgres://u:hunter2@db/twokey").unwrap());
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
