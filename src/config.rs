//! The typed configuration: one TOML file, `TWOKEY_*` environment overrides, and
//! validation that names the offending key and what to do about it.
//!
//! This module owns parsing and checking only. It never logs a secret: `Debug` on
//! anything that may hold one is redacted by hand.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::policy::parse_duration;

/// Everything twokey runs with.
#[derive(Debug, Clone, Deserialize)]
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

/// The key that signs checkpoints of the audit chain head. It must not live in the
/// database: whoever can write the database can recompute every hash, but cannot sign.
#[derive(Debug, Clone, Deserialize)]
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
            .unwrap_or_else(|| crate::audit::checkpoint::default_key_path(data_dir))
    }

    /// The passphrase of the signing key: its own, else the CA's.
    pub fn passphrase(&self, ca: &CaConfig) -> Result<Option<String>, ConfigError> {
        let Some(p) = &self.passphrase_file else {
            return ca.passphrase();
        };
        let text = std::fs::read_to_string(p).map_err(|e| {
            invalid(
                "audit.passphrase_file",
                format!("cannot read {}: {e}", p.display()),
            )
        })?;
        let pass = text.trim_end_matches(['\n', '\r']).to_string();
        if pass.is_empty() {
            return Err(invalid("audit.passphrase_file", "the file is empty"));
        }
        Ok(Some(pass))
    }

    /// How long between periodic checkpoints.
    pub fn checkpoint_interval(&self) -> Duration {
        self.checkpoint_interval
    }
}

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
            .unwrap_or_else(|| crate::ca::default_key_path(data_dir))
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

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    /// The bot token (`xoxb-…`), in a file.
    pub bot_token_file: PathBuf,
    /// The app's signing secret, in a file.
    pub signing_secret_file: PathBuf,
    /// Where requests are posted.
    pub channel: String,
    /// The workspace (`T…`) whose clicks count; clicks from any other are refused.
    /// Required: one app's signing secret is shared by every workspace it is in.
    pub team_id: String,
    /// Slack's Web API; tests point it at a local server.
    #[serde(default = "default_slack_api")]
    pub api_base: String,
}

fn default_slack_api() -> String {
    "https://slack.com/api".into()
}

impl fmt::Debug for SlackConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlackConfig")
            .field("bot_token_file", &self.bot_token_file)
            .field("signing_secret_file", &self.signing_secret_file)
            .field("channel", &self.channel)
            .field("team_id", &self.team_id)
            .field("api_base", &self.api_base)
            .finish()
    }
}

impl SlackConfig {
    /// (bot token, signing secret), read from their files.
    pub fn secrets(&self) -> Result<(String, String), ConfigError> {
        let read = |key: &str, p: &Path| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .map_err(|e| invalid(key, format!("cannot read {}: {e}", p.display())))
        };
        let token = read("slack.bot_token_file", &self.bot_token_file)?;
        if token.is_empty() {
            return Err(invalid("slack.bot_token_file", "the file is empty"));
        }
        let secret = read("slack.signing_secret_file", &self.signing_secret_file)?;
        if secret.is_empty() {
            return Err(invalid("slack.signing_secret_file", "the file is empty"));
        }
        Ok((token, secret))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain SMTP upgraded with STARTTLS (port 587).
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No encryption: only for a relay on this machine or in tests.
    None,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// `twokey <twokey@example.com>`.
    pub from: String,
    /// Deliver into the built-in dev mailbox page instead of SMTP (demo only).
    #[serde(default)]
    pub dev_mailbox: bool,
    #[serde(default)]
    pub smtp_host: Option<String>,
    #[serde(default)]
    pub smtp_port: Option<u16>,
    #[serde(default = "default_smtp_tls")]
    pub tls: SmtpTls,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

fn default_smtp_tls() -> SmtpTls {
    SmtpTls::Starttls
}
fn default_outbox_interval() -> Duration {
    Duration::from_secs(2)
}

impl fmt::Debug for EmailConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmailConfig")
            .field("from", &self.from)
            .field("dev_mailbox", &self.dev_mailbox)
            .field("smtp_host", &self.smtp_host)
            .field("smtp_port", &self.smtp_port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password_file", &self.password_file)
            .finish()
    }
}

impl EmailConfig {
    pub fn password(&self) -> Result<Option<String>, ConfigError> {
        match &self.password_file {
            None => Ok(None),
            Some(p) => std::fs::read_to_string(p)
                .map(|s| Some(s.trim_end_matches(['\n', '\r']).to_string()))
                .map_err(|e| {
                    invalid(
                        "email.password_file",
                        format!("cannot read {}: {e}", p.display()),
                    )
                }),
        }
    }
}

#[derive(Clone, Deserialize)]
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
    /// other backends, hence the redacted `Debug`.
    #[serde(default)]
    pub database_url: Option<String>,
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

fn default_reconcile_interval() -> Duration {
    Duration::from_secs(60)
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("listen", &self.listen)
            .field("public_url", &self.public_url)
            .field("data_dir", &self.data_dir)
            .field(
                "database_url",
                &self.database_url.as_ref().map(|_| "<redacted>"),
            )
            .field("sweep_interval", &self.sweep_interval)
            .field("outbox_interval", &self.outbox_interval)
            .field("reconcile_interval", &self.reconcile_interval)
            .field("trusted_proxies", &self.trusted_proxies)
            .finish()
    }
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

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("./twokey-data")
}
fn default_sweep_interval() -> Duration {
    Duration::from_secs(1)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Sign-in by picking a listed user, with no password. For demos only: every
    /// page shows a warning banner while it is on.
    #[serde(default)]
    pub dev_login: bool,
    #[serde(default)]
    pub dev_users: Vec<DevUser>,
    /// Members of these groups may see every request and the audit log. Being an
    /// admin never lets anyone approve their own request.
    #[serde(default = "default_admin_groups")]
    pub admin_groups: Vec<String>,
    /// Idle time after which a browser session is dropped.
    #[serde(default = "default_session_idle", with = "duration_setting")]
    pub session_idle_timeout: Duration,
    /// Longest a browser session lasts after sign-in, however active.
    #[serde(default = "default_session_lifetime", with = "duration_setting")]
    pub session_lifetime: Duration,
    /// Sign-in with the company's OpenID Connect provider.
    #[serde(default)]
    pub oidc: Option<OidcConfig>,
    /// The longest any API token works after it is made (checked at every use, so
    /// lowering it ends longer-lived tokens too), and the life of `token create`
    /// tokens unless `--ttl` asks for less.
    #[serde(default = "default_token_ttl", with = "duration_setting")]
    pub token_ttl: Duration,
    /// How long a token from `twokey login` works; at most `token_ttl`.
    #[serde(default = "default_cli_token_ttl", with = "duration_setting")]
    pub cli_token_ttl: Duration,
    /// Groups from an identity provider are trusted this long after the sign-in that
    /// fetched them; after that, acting needs a fresh sign-in (so removal from a group
    /// at the provider reaches API tokens too).
    #[serde(default = "default_groups_max_age", with = "duration_setting")]
    pub groups_max_age: Duration,
}

fn default_token_ttl() -> Duration {
    Duration::from_secs(7 * 86400)
}
fn default_cli_token_ttl() -> Duration {
    Duration::from_secs(12 * 3600)
}
fn default_groups_max_age() -> Duration {
    Duration::from_secs(86400)
}

/// An OpenID Connect provider (Okta, Entra ID, Google, Keycloak, Dex, ...).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The issuer URL; discovery is read from `ISSUER/.well-known/openid-configuration`.
    pub issuer: String,
    pub client_id: String,
    #[serde(default)]
    pub client_secret: Option<String>,
    /// Read the client secret from this file instead (keeps it out of the config).
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// Shown on the sign-in button.
    #[serde(default = "default_oidc_name")]
    pub display_name: String,
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// The claim (in the ID token or userinfo) that lists the user's groups.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    #[serde(default = "default_email_claim")]
    pub email_claim: String,
    /// When set, only emails in these domains may sign in.
    #[serde(default)]
    pub allowed_email_domains: Vec<String>,
    /// Refuse sign-in unless the provider says `email_verified: true` (default). Turn
    /// off only for a provider that never sends the claim and only issues emails it
    /// controls.
    #[serde(default = "yes")]
    pub require_verified_email: bool,
    /// IdP group → twokey groups. Required while `groups_claim` is set: only mapped
    /// groups count, so a group anyone can create at the provider (say, `admins`)
    /// grants nothing unless it is mapped here.
    #[serde(default)]
    pub group_map: std::collections::BTreeMap<String, Vec<String>>,
}

impl fmt::Debug for OidcConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OidcConfig")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("client_secret_file", &self.client_secret_file)
            .field("scopes", &self.scopes)
            .field("groups_claim", &self.groups_claim)
            .field("email_claim", &self.email_claim)
            .field("allowed_email_domains", &self.allowed_email_domains)
            .field("group_map", &self.group_map)
            .finish()
    }
}

impl OidcConfig {
    /// The client secret, from the config or its file.
    pub fn secret(&self) -> Result<Option<String>, ConfigError> {
        match (&self.client_secret, &self.client_secret_file) {
            (Some(_), Some(_)) => Err(invalid(
                "auth.oidc.client_secret_file",
                "set client_secret or client_secret_file, not both",
            )),
            (Some(s), None) => Ok(Some(s.clone())),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|s| Some(s.trim().to_string()))
                .map_err(|e| {
                    invalid(
                        "auth.oidc.client_secret_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                }),
            (None, None) => Ok(None),
        }
    }
}

fn default_oidc_name() -> String {
    "your identity provider".into()
}
fn default_scopes() -> Vec<String> {
    vec![
        "openid".into(),
        "email".into(),
        "profile".into(),
        "groups".into(),
    ]
}
fn default_groups_claim() -> String {
    "groups".into()
}
fn default_email_claim() -> String {
    "email".into()
}
fn default_session_lifetime() -> Duration {
    Duration::from_secs(12 * 3600)
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            dev_login: false,
            dev_users: Vec::new(),
            admin_groups: default_admin_groups(),
            session_idle_timeout: default_session_idle(),
            session_lifetime: default_session_lifetime(),
            oidc: None,
            token_ttl: default_token_ttl(),
            cli_token_ttl: default_cli_token_ttl(),
            groups_max_age: default_groups_max_age(),
        }
    }
}

fn default_admin_groups() -> Vec<String> {
    vec!["admins".into()]
}
fn default_session_idle() -> Duration {
    Duration::from_secs(8 * 3600)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevUser {
    pub email: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// How long a request may wait for approval before it expires.
    #[serde(default = "default_pending_ttl", with = "duration_setting")]
    pub pending_ttl: Duration,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            pending_ttl: default_pending_ttl(),
        }
    }
}

fn default_pending_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceKind {
    Ssh,
    Postgres,
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResourceKind::Ssh => "ssh",
            ResourceKind::Postgres => "postgres",
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceConfig {
    pub name: String,
    pub kind: ResourceKind,
    #[serde(default)]
    pub description: String,
    /// Where engineers connect: `host:port` (`twokey ssh` uses it).
    #[serde(default)]
    pub address: Option<String>,
    /// The SSH host's public key (`ssh-ed25519 AAAA…`), pinned by `twokey ssh` and the
    /// relay. Without it the relay trusts only a key an admin confirmed (web: Host keys).
    #[serde(default)]
    pub host_key: Option<String>,
    /// PostgreSQL: the database grants log in to.
    #[serde(default)]
    pub database: Option<String>,
    /// PostgreSQL: the role twokey administers the target as (it creates and drops
    /// the per-grant roles: CREATEROLE and the grants the README lists; checked
    /// against the live target at start-up and by `check-config`).
    #[serde(default)]
    pub admin_user: Option<String>,
    /// PostgreSQL: a file holding the admin role's password.
    #[serde(default)]
    pub admin_password_file: Option<PathBuf>,
    /// PostgreSQL: TLS of twokey's admin connection: `verify-full` (default: the
    /// certificate must be signed by a trusted CA and name the host), `require`
    /// (encrypted, server not verified), `prefer` or `disable`.
    #[serde(default)]
    pub tls: Option<String>,
    /// PostgreSQL: a PEM file of the CA(s) that sign the target's certificate, trusted
    /// beside the public web CAs (libpq's `sslrootcert`).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// PostgreSQL: at a grant's end, objects its role created go to this role
    /// (`REASSIGN OWNED`); without it they are dropped with the role (`DROP OWNED`).
    #[serde(default)]
    pub reassign_owned_to: Option<String>,
    #[serde(default)]
    pub roles: Vec<RoleConfig>,
}

impl ResourceConfig {
    /// The admin password, read from its file.
    pub fn admin_password(&self, key: &str) -> Result<String, ConfigError> {
        let Some(p) = &self.admin_password_file else {
            return Err(invalid(format!("{key}.admin_password_file"), "is required"));
        };
        let text = std::fs::read_to_string(p).map_err(|e| {
            invalid(
                format!("{key}.admin_password_file"),
                format!("cannot read {}: {e}", p.display()),
            )
        })?;
        Ok(text.trim_end_matches(['\n', '\r']).to_string())
    }

    /// Whether twokey manages database logins for this resource.
    pub fn manages_db_roles(&self) -> bool {
        self.kind == ResourceKind::Postgres && self.admin_user.is_some()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Groups whose members may ask for this role.
    pub requester_groups: Vec<String>,
    /// Groups whose members may approve it.
    pub approver_groups: Vec<String>,
    /// Distinct approvers needed.
    #[serde(default = "one")]
    pub min_approvals: u32,
    /// When true, every listed approver group must be represented among the approvers.
    #[serde(default)]
    pub all_groups: bool,
    /// Longest grant, e.g. `"4h"`.
    #[serde(with = "duration_setting")]
    pub max_duration: Duration,
    /// Overrides `policy.pending_ttl` for this role.
    #[serde(default, with = "optional_duration_setting")]
    pub pending_ttl: Option<Duration>,
    #[serde(default)]
    pub require_ticket: bool,
    /// Fewest characters a reason may have (after trimming).
    #[serde(default = "default_reason_min")]
    pub reason_min_chars: usize,
    /// SSH: the logins a certificate is valid for (never empty, never a wildcard).
    #[serde(default)]
    pub principals: Vec<String>,
    /// SSH: certificate extensions allowed (default `["permit-pty"]`).
    #[serde(default = "default_extensions")]
    pub extensions: Vec<String>,
    /// SSH: the only command the certificate may run.
    #[serde(default)]
    pub force_command: Option<String>,
    /// SSH: addresses (CIDR) the certificate may be used from.
    #[serde(default)]
    pub source_address: Vec<String>,
    /// PostgreSQL: existing roles the grant's login becomes a member of (`IN ROLE`).
    #[serde(default)]
    pub db_roles: Vec<String>,
    /// PostgreSQL: statements run when the login is created, with `{role}` standing for
    /// its quoted name, e.g. `"GRANT SELECT ON public.orders TO {role}"`. Written by the
    /// admin who writes this file; no user input ever reaches them.
    #[serde(default)]
    pub db_grants: Vec<String>,
    /// PostgreSQL: most concurrent connections of the login.
    #[serde(default = "default_connection_limit")]
    pub connection_limit: i32,
    /// SSH relay: exec commands refused for this role (`*` matches anything), e.g.
    /// `["rm -rf *", "shutdown*"]`. Interactive shells cannot be held to this.
    #[serde(default)]
    pub blocked_commands: Vec<String>,
}

fn default_connection_limit() -> i32 {
    5
}

fn default_extensions() -> Vec<String> {
    vec!["permit-pty".into()]
}

fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}
fn default_reason_min() -> usize {
    3
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

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

fn check_ssh_role(key: &str, role: &RoleConfig) -> Result<(), ConfigError> {
    if role.principals.is_empty() {
        return Err(invalid(
            format!("{key}.principals"),
            "an ssh role must list the logins its certificates are for, e.g. [\"deploy\"]",
        ));
    }
    if let Some(p) = role
        .principals
        .iter()
        .find(|p| !crate::ca::valid_principal(p))
    {
        return Err(invalid(
            format!("{key}.principals"),
            format!("{p:?} is not a login name (no wildcards, commas or spaces)"),
        ));
    }
    if let Some(e) = role
        .extensions
        .iter()
        .find(|e| !crate::ca::KNOWN_EXTENSIONS.contains(&e.as_str()))
    {
        return Err(invalid(
            format!("{key}.extensions"),
            format!(
                "unknown extension {e:?}; known: {}",
                crate::ca::KNOWN_EXTENSIONS.join(", ")
            ),
        ));
    }
    if role
        .force_command
        .as_deref()
        .is_some_and(|c| c.trim().is_empty() || c.contains('\n'))
    {
        return Err(invalid(
            format!("{key}.force_command"),
            "must be one non-empty line",
        ));
    }
    for a in &role.source_address {
        if !valid_cidr(a) {
            return Err(invalid(
                format!("{key}.source_address"),
                format!("{a:?} is not an address or CIDR, e.g. \"10.0.0.0/8\""),
            ));
        }
    }
    Ok(())
}

fn valid_cidr(s: &str) -> bool {
    let (addr, bits) = match s.split_once('/') {
        Some((a, b)) => (a, Some(b)),
        None => (s, None),
    };
    let Ok(ip) = addr.parse::<std::net::IpAddr>() else {
        return false;
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    bits.is_none_or(|b| b.parse::<u8>().is_ok_and(|n| n <= max))
}

impl Config {
    /// Reads, applies `TWOKEY_*` overrides, and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::parse(&text, &path.display().to_string())?;
        config.apply_env(|k| std::env::var(k).ok())?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML; unknown keys and values of the wrong kind (a duration that is not
    /// one, say) are errors that name the key and its line.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            if key == "." || key.is_empty() {
                // Not TOML at all: toml's own message shows the line.
                return ConfigError::Parse {
                    path: origin.to_string(),
                    message: inner.to_string(),
                };
            }
            let line = inner
                .span()
                .map(|span| {
                    let upto = text.get(..span.start).unwrap_or(text);
                    format!(" ({origin}, line {})", upto.matches('\n').count() + 1)
                })
                .unwrap_or_default();
            invalid(key, format!("{}{line}", inner.message().trim_end()))
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
            self.server.database_url = Some(v);
        } else if let Some(file) = var("TWOKEY_DATABASE_URL_FILE") {
            let v = std::fs::read_to_string(&file).map_err(|e| {
                invalid(
                    "TWOKEY_DATABASE_URL_FILE",
                    format!("cannot read {file}: {e}"),
                )
            })?;
            self.server.database_url = Some(v.trim().to_string());
        }
        Ok(())
    }

    /// Checks every rule a running server relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server
            .listen
            .parse::<SocketAddr>()
            .map_err(|_| invalid("server.listen", "must be IP:PORT, e.g. \"127.0.0.1:8080\""))?;
        if let Some(url) = &self.server.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid(
                "server.public_url",
                "must start with http:// or https://",
            ));
        }
        for (i, p) in self.server.trusted_proxies.iter().enumerate() {
            if p.parse::<std::net::IpAddr>().is_err() {
                return Err(invalid(
                    format!("server.trusted_proxies[{i}]"),
                    format!("{p:?} is not an IP address (one proxy's, e.g. \"10.0.0.5\")"),
                ));
            }
        }
        check_nonzero("audit.checkpoint_interval", self.audit.checkpoint_interval)?;
        if self.audit.checkpoint_every == 0 {
            return Err(invalid("audit.checkpoint_every", "must be at least 1"));
        }
        if let Some(relay) = &self.relay {
            if relay.listen.parse::<SocketAddr>().is_err() {
                return Err(invalid(
                    "relay.listen",
                    format!("{:?} is not an address like 0.0.0.0:2222", relay.listen),
                ));
            }
            check_nonzero("relay.login_grace_time", relay.login_grace_time)?;
            check_nonzero("relay.idle_timeout", relay.idle_timeout)?;
            if relay.max_connections == 0 || relay.max_connections_per_ip == 0 {
                return Err(invalid(
                    "relay.max_connections",
                    "max_connections and max_connections_per_ip must be at least 1",
                ));
            }
            // A cap of (nearly) nothing would keep no output at all: refused, not
            // quietly taken as "record nothing".
            if relay.max_recording_bytes < MIN_MAX_RECORDING_BYTES {
                return Err(invalid(
                    "relay.max_recording_bytes",
                    format!(
                        "{} is too small: at least {MIN_MAX_RECORDING_BYTES} (64 KiB)",
                        relay.max_recording_bytes
                    ),
                ));
            }
        }
        if let Some(slack) = &self.slack {
            slack.secrets()?;
            if slack.channel.trim().is_empty() {
                return Err(invalid(
                    "slack.channel",
                    "must name a channel, e.g. \"#access-requests\" or its id",
                ));
            }
            let team = &slack.team_id;
            if !(2..=32).contains(&team.len())
                || !team
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
            {
                return Err(invalid(
                    "slack.team_id",
                    "must be the workspace's id, e.g. \"T0123ABCD\" (in Slack: workspace settings, or the team_id of any interaction)",
                ));
            }
            // Plain http only to loopback (tests): the bot token rides on every call.
            let api_ok = reqwest::Url::parse(&slack.api_base).is_ok_and(|u| {
                u.scheme() == "https" || (u.scheme() == "http" && u.host_str() == Some("127.0.0.1"))
            });
            if !api_ok {
                return Err(invalid(
                    "slack.api_base",
                    "must be https (http only for 127.0.0.1 in tests)",
                ));
            }
        }
        check_nonzero("policy.pending_ttl", self.policy.pending_ttl)?;
        check_nonzero("auth.session_idle_timeout", self.auth.session_idle_timeout)?;
        check_nonzero("auth.session_lifetime", self.auth.session_lifetime)?;
        check_nonzero("auth.token_ttl", self.auth.token_ttl)?;
        check_nonzero("auth.cli_token_ttl", self.auth.cli_token_ttl)?;
        if self.cli_token_ttl() > self.token_ttl() {
            return Err(invalid(
                "auth.cli_token_ttl",
                "must not be longer than auth.token_ttl, which caps every token",
            ));
        }
        check_nonzero("auth.groups_max_age", self.auth.groups_max_age)?;
        if let Some(oidc) = &self.auth.oidc {
            if !(oidc.issuer.starts_with("https://") || oidc.issuer.starts_with("http://")) {
                return Err(invalid("auth.oidc.issuer", "must be an http(s) URL"));
            }
            if oidc.client_id.trim().is_empty() {
                return Err(invalid("auth.oidc.client_id", "must not be empty"));
            }
            oidc.secret()?;
            if !oidc.scopes.iter().any(|s| s == "openid") {
                return Err(invalid("auth.oidc.scopes", "must include \"openid\""));
            }
            // Passing IdP group names through would let whoever may create or join a
            // group at the provider (often self-service) name themselves an approver
            // or admin here. The operator must say which groups mean what.
            if !oidc.groups_claim.is_empty() && oidc.group_map.is_empty() {
                return Err(invalid(
                    "auth.oidc.group_map",
                    format!(
                        "is required when groups come from the identity provider (groups_claim = {:?}): map each provider group to twokey groups, e.g. [auth.oidc.group_map] \"okta-sre\" = [\"engineers\"]; unmapped groups grant nothing. Set groups_claim = \"\" to take no groups from the provider",
                        oidc.groups_claim
                    ),
                ));
            }
            if self.server.public_url.is_none() {
                return Err(invalid(
                    "server.public_url",
                    "is required with auth.oidc: the provider redirects back to PUBLIC_URL/auth/oidc/callback",
                ));
            }
        }
        if let Some(email) = &self.email {
            if !email.from.contains('@') {
                return Err(invalid(
                    "email.from",
                    "must be an address, e.g. \"twokey <twokey@example.com>\"",
                ));
            }
            if !email.dev_mailbox && email.smtp_host.as_deref().is_none_or(str::is_empty) {
                return Err(invalid(
                    "email.smtp_host",
                    "is required unless dev_mailbox = true",
                ));
            }
            if email.dev_mailbox && !self.auth.dev_login {
                return Err(invalid(
                    "email.dev_mailbox",
                    "is for demos only: it needs auth.dev_login = true",
                ));
            }
            email.password()?;
            if self.server.public_url.is_none() && !email.dev_mailbox {
                return Err(invalid(
                    "server.public_url",
                    "is required with email: links in messages point there",
                ));
            }
        }
        if self.auth.dev_login && self.auth.dev_users.is_empty() {
            return Err(invalid(
                "auth.dev_users",
                "dev_login is on but no dev_users are listed",
            ));
        }
        let mut emails = HashSet::new();
        for (i, u) in self.auth.dev_users.iter().enumerate() {
            let key = format!("auth.dev_users[{i}].email");
            if !looks_like_email(&u.email) {
                return Err(invalid(
                    key,
                    format!("{:?} is not an email address", u.email),
                ));
            }
            if !emails.insert(u.email.to_lowercase()) {
                return Err(invalid(key, format!("{} is listed twice", u.email)));
            }
        }
        let mut names = HashSet::new();
        for (i, r) in self.resources.iter().enumerate() {
            let key = format!("resources[{i}]");
            check_name(&format!("{key}.name"), &r.name)?;
            if !names.insert(r.name.as_str()) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("resource {:?} is declared twice", r.name),
                ));
            }
            if r.roles.is_empty() {
                return Err(invalid(
                    format!("{key}.roles"),
                    format!(
                        "resource {:?} has no roles; add [[resources.roles]]",
                        r.name
                    ),
                ));
            }
            let mut role_names = HashSet::new();
            for (j, role) in r.roles.iter().enumerate() {
                let key = format!("{key}.roles[{j}]");
                check_name(&format!("{key}.name"), &role.name)?;
                if !role_names.insert(role.name.as_str()) {
                    return Err(invalid(
                        format!("{key}.name"),
                        format!("role {:?} is declared twice on {:?}", role.name, r.name),
                    ));
                }
                if role.requester_groups.is_empty() {
                    return Err(invalid(
                        format!("{key}.requester_groups"),
                        "must list at least one group",
                    ));
                }
                if role.approver_groups.is_empty() {
                    return Err(invalid(
                        format!("{key}.approver_groups"),
                        "must list at least one group",
                    ));
                }
                if role.min_approvals == 0 {
                    return Err(invalid(
                        format!("{key}.min_approvals"),
                        "must be at least 1 (use break-glass for self-service)",
                    ));
                }
                if role.all_groups && (role.min_approvals as usize) < role.approver_groups.len() {
                    return Err(invalid(
                        format!("{key}.min_approvals"),
                        format!(
                            "all_groups needs one approver per group, so min_approvals must be at least {}",
                            role.approver_groups.len()
                        ),
                    ));
                }
                if role.max_duration < Duration::from_secs(crate::policy::MIN_GRANT_SECS) {
                    return Err(invalid(
                        format!("{key}.max_duration"),
                        "must be at least 1m",
                    ));
                }
                if let Some(ttl) = role.pending_ttl {
                    check_nonzero(&format!("{key}.pending_ttl"), ttl)?;
                }
                if r.kind == ResourceKind::Ssh {
                    check_ssh_role(&key, role)?;
                }
                if r.manages_db_roles() {
                    if role.db_roles.is_empty() && role.db_grants.is_empty() {
                        return Err(invalid(
                            format!("{key}.db_roles"),
                            "list the database roles a grant's login joins (or db_grants)",
                        ));
                    }
                    if let Some(g) = role.db_grants.iter().find(|g| !g.contains("{role}")) {
                        return Err(invalid(
                            format!("{key}.db_grants"),
                            format!("{g:?} must say {{role}} where the login goes"),
                        ));
                    }
                    if role.connection_limit < 1 {
                        return Err(invalid(
                            format!("{key}.connection_limit"),
                            "must be at least 1",
                        ));
                    }
                }
            }
            if r.manages_db_roles() {
                // twokey owns the prefix: its own admin or a role it grants must never be
                // mistaken for a grant's login.
                let owned = r
                    .admin_user
                    .iter()
                    .chain(r.reassign_owned_to.iter())
                    .chain(r.roles.iter().flat_map(|role| role.db_roles.iter()));
                if let Some(n) = owned
                    .into_iter()
                    .find(|n| n.starts_with(crate::dbcreds::ROLE_PREFIX))
                {
                    return Err(invalid(
                        format!("{key}.admin_user"),
                        format!(
                            "{n:?}: names starting with twokey_ are reserved for grants' logins"
                        ),
                    ));
                }
                if r.address.is_none() {
                    return Err(invalid(
                        format!("{key}.address"),
                        "is required: host:port of the database",
                    ));
                }
                if r.database.as_deref().is_none_or(str::is_empty) {
                    return Err(invalid(
                        format!("{key}.database"),
                        "is required with admin_user",
                    ));
                }
                r.admin_password(&key)?;
                let tls = r.tls.as_deref().unwrap_or(crate::dbcreds::DEFAULT_TLS);
                if !matches!(tls, "disable" | "prefer" | "require" | "verify-full") {
                    return Err(invalid(
                        format!("{key}.tls"),
                        "must be verify-full (the default), require, prefer or disable",
                    ));
                }
                if let Some(ca) = &r.tls_ca_file {
                    if tls == "disable" {
                        return Err(invalid(
                            format!("{key}.tls_ca_file"),
                            "has no effect with tls = \"disable\": remove one of them",
                        ));
                    }
                    let pem = std::fs::read_to_string(ca).map_err(|e| {
                        invalid(
                            format!("{key}.tls_ca_file"),
                            format!("cannot read {}: {e}", ca.display()),
                        )
                    })?;
                    if !pem.contains("-----BEGIN CERTIFICATE-----") {
                        return Err(invalid(
                            format!("{key}.tls_ca_file"),
                            format!("{} holds no PEM certificate", ca.display()),
                        ));
                    }
                }
            }
            if let Some(addr) = &r.address
                && addr
                    .rsplit_once(':')
                    .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(invalid(format!("{key}.address"), "must be host:port"));
            }
            if let Some(hk) = &r.host_key
                && ssh_key::PublicKey::from_openssh(hk.trim()).is_err()
            {
                return Err(invalid(
                    format!("{key}.host_key"),
                    "must be an OpenSSH public key line, e.g. from /etc/ssh/ssh_host_ed25519_key.pub",
                ));
            }
        }
        Ok(())
    }

    /// What `serve` (and `check-config`) demand beyond [`Config::validate`]: demo
    /// sign-in (anyone signs in as anyone, admins included, with no password) only on a
    /// loopback address that no reverse proxy publishes. `twokey demo` does not call
    /// this: the demo is that, with a banner on every page.
    pub fn validate_for_serve(&self) -> Result<(), ConfigError> {
        if !self.auth.dev_login {
            return Ok(());
        }
        let listen_loopback = self
            .server
            .listen
            .parse::<SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
        if !listen_loopback {
            return Err(invalid(
                "auth.dev_login",
                format!(
                    "demo sign-in lets anyone sign in as anyone: it is refused on server.listen = {:?}, which is not a loopback address; use `twokey demo`, listen on 127.0.0.1, or turn it off",
                    self.server.listen
                ),
            ));
        }
        // Behind a proxy the loopback listener is public after all: the public URL says.
        if let Some(url) = &self.server.public_url {
            let host = reqwest::Url::parse(url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_string))
                .unwrap_or_default();
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = host.eq_ignore_ascii_case("localhost")
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                return Err(invalid(
                    "auth.dev_login",
                    format!(
                        "demo sign-in lets anyone sign in as anyone: it is refused with server.public_url = {url:?}, which is not a loopback address; use `twokey demo` or turn it off"
                    ),
                ));
            }
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

    pub fn database_url(&self) -> String {
        match &self.server.database_url {
            Some(url) => url.clone(),
            None => format!(
                "sqlite://{}",
                self.server.data_dir.join("twokey.db").display()
            ),
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
            .unwrap_or("http://127.0.0.1:8080");
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

    pub fn dev_user(&self, email: &str) -> Option<&DevUser> {
        self.auth
            .dev_users
            .iter()
            .find(|u| u.email.eq_ignore_ascii_case(email))
    }
}

impl RoleConfig {
    pub fn max_duration(&self) -> Duration {
        self.max_duration
    }
}

fn check_nonzero(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(invalid(key, "must be longer than zero"));
    }
    Ok(())
}

/// Durations in the file are text (`"50ms"`, `"30s"`, `"1h30m"`, see
/// [`parse_duration`]), parsed once, here, at load: the rest of twokey only ever sees a
/// [`Duration`], so no later reader can re-parse one and fall back to a default. A bad
/// value fails the load, and [`Config::parse`] names its key.
mod duration_setting {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// [`duration_setting`] for a setting that may be absent.
mod optional_duration_setting {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| super::parse_duration(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

fn check_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("{name:?} must be 1-64 characters of a-z, 0-9, '-', '_' or '.'"),
        ))
    }
}

fn looks_like_email(s: &str) -> bool {
    match s.split_once('@') {
        Some((local, domain)) => !local.is_empty() && domain.contains('.') && !s.contains(' '),
        None => false,
    }
}

/// The configuration `twokey demo` writes and runs with.
pub fn demo_config_toml(listen: &str, data_dir: &Path) -> String {
    let data_dir = toml::Value::String(data_dir.display().to_string());
    format!(
        r#"# Written by `twokey demo`. Edit and run `twokey serve --config <this file>`.
# Demo sign-in needs no password: never turn it on for real users.

[server]
listen = "{listen}"
data_dir = {data_dir}

[auth]
dev_login = true
admin_groups = ["admins"]

[[auth.dev_users]]
email = "alice@example.com"
name = "Alice (requester)"
groups = ["engineers"]

[[auth.dev_users]]
email = "bob@example.com"
name = "Bob (approver)"
groups = ["sre-leads"]

[[auth.dev_users]]
email = "carol@example.com"
name = "Carol (approver)"
groups = ["sre-leads"]

[[auth.dev_users]]
email = "dave@example.com"
name = "Dave (admin)"
groups = ["admins"]

[email]
from = "twokey demo <twokey@example.com>"
# Messages land in the built-in mailbox page (/dev/mailbox) instead of SMTP.
dev_mailbox = true

[policy]
pending_ttl = "24h"

[[resources]]
name = "demo-db"
kind = "postgres"
description = "Demo PostgreSQL database"

[[resources.roles]]
name = "read"
description = "Read-only access"
requester_groups = ["engineers", "admins"]
approver_groups = ["sre-leads"]
min_approvals = 1
max_duration = "4h"

[[resources]]
name = "demo-ssh"
kind = "ssh"
description = "Demo SSH host"
address = "127.0.0.1:22"

[[resources.roles]]
name = "admin"
description = "Root shell"
requester_groups = ["engineers", "admins"]
approver_groups = ["sre-leads"]
min_approvals = 2
max_duration = "1h"
require_ticket = true
# Certificates for this role log in as "admin", with a terminal and nothing else.
principals = ["admin"]
extensions = ["permit-pty"]
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> Config {
        Config::parse(
            &demo_config_toml("127.0.0.1:8080", Path::new("/tmp/x")),
            "demo",
        )
        .unwrap()
    }

    #[test]
    fn demo_config_is_valid() {
        let c = demo();
        c.validate().unwrap();
        assert!(c.auth.dev_login);
        let (_, role) = c.role("demo-ssh", "admin").unwrap();
        assert_eq!(role.min_approvals, 2);
        assert!(role.require_ticket);
        assert_eq!(role.max_duration(), Duration::from_secs(3600));
    }

    #[test]
    fn example_config_parses_and_validates() {
        let text = include_str!("../twokey.example.toml");
        Config::parse(text, "twokey.example.toml")
            .unwrap()
            .validate()
            .unwrap();
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[server]\nlisten = \"127.0.0.1:1\"\nlistne = 1\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listne"), "{err}");
    }

    #[test]
    fn postgres_settings_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "x").unwrap();
        let base = demo_config_toml("127.0.0.1:8080", Path::new("/tmp/x"));
        let with = |resource_extra: &str, role_extra: &str| {
            let text = base
                .replacen(
                    "description = \"Demo PostgreSQL database\"",
                    &format!("description = \"Demo PostgreSQL database\"\n{resource_extra}"),
                    1,
                )
                .replacen(
                    "max_duration = \"4h\"",
                    &format!("max_duration = \"4h\"\n{role_extra}"),
                    1,
                );
            Config::parse(&text, "t")
                .and_then(|c| c.validate())
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let good = format!(
            "address = \"127.0.0.1:5432\"\ndatabase = \"app\"\nadmin_user = \"twokey\"\nadmin_password_file = {:?}",
            pw.display().to_string()
        );
        with(&good, "db_roles = [\"readonly\"]").unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        with(
            &format!("{good}\ntls_ca_file = {:?}", ca.display().to_string()),
            "db_roles = [\"readonly\"]",
        )
        .unwrap();
        for (resource, role, key) in [
            (
                good.replace("database = \"app\"\n", ""),
                "db_roles = [\"r\"]",
                "resources[0].database",
            ),
            (
                good.replace("address = \"127.0.0.1:5432\"\n", ""),
                "db_roles = [\"r\"]",
                "resources[0].address",
            ),
            (
                format!("{good}\ntls = \"sometimes\""),
                "db_roles = [\"r\"]",
                "resources[0].tls",
            ),
            (
                format!("{good}\ntls_ca_file = \"/no/such/ca.pem\""),
                "db_roles = [\"r\"]",
                "resources[0].tls_ca_file",
            ),
            (
                // The password file is no certificate.
                format!("{good}\ntls_ca_file = {:?}", pw.display().to_string()),
                "db_roles = [\"r\"]",
                "resources[0].tls_ca_file",
            ),
            (
                format!(
                    "{good}\ntls = \"disable\"\ntls_ca_file = {:?}",
                    ca.display().to_string()
                ),
                "db_roles = [\"r\"]",
                "resources[0].tls_ca_file",
            ),
            (
                good.replace("pw\"", "absent\""),
                "db_roles = [\"r\"]",
                "resources[0].admin_password_file",
            ),
            (good.clone(), "", "resources[0].roles[0].db_roles"),
            (
                good.clone(),
                "db_grants = [\"GRANT SELECT ON t TO x\"]",
                "resources[0].roles[0].db_grants",
            ),
            (
                good.clone(),
                "db_roles = [\"r\"]\nconnection_limit = 0",
                "resources[0].roles[0].connection_limit",
            ),
        ] {
            let err = with(&resource, role).unwrap_err();
            assert!(err.starts_with(key), "{key}: {err}");
        }
    }

    #[test]
    fn slack_settings_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        let secret = dir.path().join("secret");
        std::fs::write(&token, "xoxb-1\n").unwrap();
        std::fs::write(&secret, "").unwrap();
        let base = demo_config_toml("127.0.0.1:8080", Path::new("/tmp/x"));
        let with = |section: String| {
            Config::parse(&format!("{base}\n{section}"), "t")
                .and_then(|c| c.validate())
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let slack = |channel: &str, api: &str, secret_file: &Path| {
            format!(
                "[slack]\nbot_token_file = {:?}\nsigning_secret_file = {:?}\nchannel = {channel:?}\nteam_id = \"T0TEAM\"\napi_base = {api:?}\n",
                token.display().to_string(),
                secret_file.display().to_string()
            )
        };
        let err = with(slack("#a", "https://slack.com/api", &secret)).unwrap_err();
        assert!(err.starts_with("slack.signing_secret_file"), "{err}");
        let missing = dir.path().join("absent");
        let err = with(slack("#a", "https://slack.com/api", &missing)).unwrap_err();
        assert!(err.starts_with("slack.signing_secret_file"), "{err}");
        assert!(!err.contains("xoxb"), "{err}");
        std::fs::write(&secret, "s3cret").unwrap();
        with(slack("#a", "https://slack.com/api", &secret)).unwrap();
        let err = with(slack(" ", "https://slack.com/api", &secret)).unwrap_err();
        assert!(err.starts_with("slack.channel"), "{err}");
        for bad in ["", "t0team", "T0 TEAM", "T0TEAM\\n"] {
            let section = slack("#a", "https://slack.com/api", &secret)
                .replace("team_id = \"T0TEAM\"", &format!("team_id = \"{bad}\""));
            let err = with(section).unwrap_err();
            assert!(err.starts_with("slack.team_id"), "{bad:?}: {err}");
        }
        let without =
            slack("#a", "https://slack.com/api", &secret).replace("team_id = \"T0TEAM\"\n", "");
        let err = with(without).unwrap_err();
        assert!(err.contains("team_id"), "{err}");
        for bad in [
            "http://slack.example/api",
            "http://127.0.0.1.evil.example/api",
            "slack.com",
        ] {
            let err = with(slack("#a", bad, &secret)).unwrap_err();
            assert!(err.starts_with("slack.api_base"), "{bad}: {err}");
        }
        let err = with(format!(
            "{}verify = false\n",
            slack("#a", "https://slack.com/api", &secret)
        ))
        .unwrap_err();
        assert!(err.contains("verify"), "{err}");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "min_approvals = 1",
                "min_approvals = 0",
                "resources[0].roles[0].min_approvals",
            ),
            (
                "max_duration = \"4h\"",
                "max_duration = \"4 hours\"",
                "resources[0].roles[0].max_duration",
            ),
            (
                "max_duration = \"4h\"",
                "max_duration = \"10s\"",
                "resources[0].roles[0].max_duration",
            ),
            (
                "approver_groups = [\"sre-leads\"]\nmin_approvals = 1",
                "approver_groups = []\nmin_approvals = 1",
                "resources[0].roles[0].approver_groups",
            ),
            (
                "listen = \"127.0.0.1:8080\"",
                "listen = \"localhost\"",
                "server.listen",
            ),
            (
                "name = \"demo-db\"",
                "name = \"demo db\"",
                "resources[0].name",
            ),
            (
                "name = \"demo-ssh\"",
                "name = \"demo-db\"",
                "resources[1].name",
            ),
            (
                "pending_ttl = \"24h\"",
                "pending_ttl = \"0s\"",
                "policy.pending_ttl",
            ),
            (
                "email = \"bob@example.com\"",
                "email = \"alice@example.com\"",
                "auth.dev_users[1].email",
            ),
            (
                "principals = [\"admin\"]",
                "principals = []",
                "resources[1].roles[0].principals",
            ),
            (
                "principals = [\"admin\"]",
                "principals = [\"*\"]",
                "resources[1].roles[0].principals",
            ),
            (
                "principals = [\"admin\"]",
                "principals = [\"admin,root\"]",
                "resources[1].roles[0].principals",
            ),
            (
                "extensions = [\"permit-pty\"]",
                "extensions = [\"permit-anything\"]",
                "resources[1].roles[0].extensions",
            ),
            (
                "extensions = [\"permit-pty\"]",
                "extensions = [\"permit-pty\"]\nsource_address = [\"10.0.0.0/33\"]",
                "resources[1].roles[0].source_address",
            ),
            (
                "extensions = [\"permit-pty\"]",
                "extensions = [\"permit-pty\"]\nforce_command = \" \"",
                "resources[1].roles[0].force_command",
            ),
            (
                "address = \"127.0.0.1:22\"",
                "address = \"127.0.0.1\"",
                "resources[1].address",
            ),
            (
                "address = \"127.0.0.1:22\"",
                "address = \"127.0.0.1:22\"\nhost_key = \"ssh-ed25519 nope\"",
                "resources[1].host_key",
            ),
        ];
        let base = demo_config_toml("127.0.0.1:8080", Path::new("/tmp/x"));
        for (from, to, key) in cases {
            assert!(base.contains(from), "{from}");
            let text = base.replacen(from, to, 1);
            let err = Config::parse(&text, "t")
                .and_then(|c| c.validate())
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(key), "{to}: {err}");
        }
    }

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
    fn durations_are_parsed_once_at_load_or_refused_naming_their_key() {
        let base = demo_config_toml("127.0.0.1:8080", Path::new("/tmp/x"));
        let with =
            |section: &str, line: &str| base.replacen(section, &format!("{section}\n{line}"), 1);
        // Valid: each setting holds the typed value, sub-second ones included.
        type Read = fn(&Config) -> Duration;
        let ok: &[(&str, &str, Read, u64)] = &[
            (
                "[server]",
                "outbox_interval = \"50ms\"",
                |c| c.outbox_interval(),
                50,
            ),
            (
                "[server]",
                "sweep_interval = \"250ms\"",
                |c| c.sweep_interval(),
                250,
            ),
            (
                "[server]",
                "sweep_interval = \"0s\"",
                |c| c.sweep_interval(),
                0,
            ),
            (
                "[server]",
                "reconcile_interval = \"1m30s\"",
                |c| c.reconcile_interval(),
                90_000,
            ),
            (
                "[auth]",
                "token_ttl = \"7d\"",
                |c| c.token_ttl(),
                7 * 86_400_000,
            ),
            (
                "[auth]",
                "session_idle_timeout = \"1500ms\"",
                |c| c.session_idle_timeout(),
                1500,
            ),
            (
                "[auth]",
                "groups_max_age = \"90\"",
                |c| c.groups_max_age(),
                90_000,
            ),
            ("[policy]", "", |c| c.policy.pending_ttl, 24 * 3_600_000),
        ];
        for (section, line, get, ms) in ok {
            let c = Config::parse(&with(section, line), "t").unwrap();
            c.validate().unwrap();
            assert_eq!(get(&c), Duration::from_millis(*ms), "{line}");
        }
        let c = Config::parse(&base, "t").unwrap();
        assert_eq!(c.outbox_interval(), Duration::from_secs(2), "the default");
        let role = &c.resources[0].roles[0];
        assert_eq!(role.max_duration(), Duration::from_secs(4 * 3600));
        assert_eq!(c.pending_ttl(role), Duration::from_secs(24 * 3600));

        // Invalid: refused, the key named, never replaced by a default.
        let bad: &[(&str, &str, &str)] = &[
            (
                "[server]",
                "outbox_interval = \"2 seconds\"",
                "server.outbox_interval: \"2 seconds\" is not a duration",
            ),
            (
                "[server]",
                "outbox_interval = \"5us\"",
                "server.outbox_interval: \"5us\" is not a duration",
            ),
            (
                "[server]",
                "sweep_interval = \"1.5s\"",
                "server.sweep_interval: ",
            ),
            (
                "[server]",
                "reconcile_interval = 60",
                "server.reconcile_interval: invalid type",
            ),
            (
                "[auth]",
                "token_ttl = \"400d\"",
                "auth.token_ttl: \"400d\" is longer than a year",
            ),
            (
                "[auth]",
                "session_lifetime = \"0ms\"",
                "auth.session_lifetime: must be longer than zero",
            ),
            (
                "[auth]",
                "groups_max_age = \"\"",
                "auth.groups_max_age: a duration is required",
            ),
            (
                "[auth]",
                "session_idle_timeout = \"8hours\"",
                "auth.session_idle_timeout: ",
            ),
        ];
        for (section, line, want) in bad {
            let err = Config::parse(&with(section, line), "t.toml")
                .and_then(|c| c.validate())
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(want), "{line}: {err}");
        }
        let err = Config::parse(&with("[server]", "outbox_interval = \"2x\""), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("(t.toml, line 5)"), "{err}");
        let text = base.replacen(
            "max_duration = \"1h\"",
            "max_duration = \"1h\"\npending_ttl = \"soon\"",
            1,
        );
        let err = Config::parse(&text, "t").unwrap_err().to_string();
        assert!(
            err.starts_with("resources[1].roles[0].pending_ttl: \"soon\""),
            "{err}"
        );
        let text = base.replacen("max_duration = \"1h\"", "max_duration = \"59s\"", 1);
        let err = Config::parse(&text, "t")
            .and_then(|c| c.validate())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("resources[1].roles[0].max_duration: must be at least 1m"),
            "{err}"
        );
    }

    #[test]
    fn all_groups_needs_enough_approvals() {
        let base = demo_config_toml("127.0.0.1:8080", Path::new("/tmp/x"));
        let text = base.replacen(
            "approver_groups = [\"sre-leads\"]\nmin_approvals = 1",
            "approver_groups = [\"sre-leads\", \"dbas\"]\nall_groups = true\nmin_approvals = 1",
            1,
        );
        let err = Config::parse(&text, "t").unwrap().validate().unwrap_err();
        assert!(err.to_string().contains("at least 2"), "{err}");
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
    fn debug_redacts_database_url() {
        let mut c = demo();
        c.server.database_url = Some("postgres://u:hunter2@db/twokey".into());
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
