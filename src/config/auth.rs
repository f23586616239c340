//! The `[auth]` section: demo sign-in and its users, OpenID Connect, admin groups, and
//! how long browser sessions and API tokens last. It never signs anyone in, and its
//! `Debug` never shows the OIDC client secret.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::duration::duration_setting;
use super::{ConfigError, Secret, invalid};

#[derive(Debug, Clone, PartialEq, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The issuer URL; discovery is read from `ISSUER/.well-known/openid-configuration`.
    pub issuer: String,
    pub client_id: String,
    #[serde(default)]
    pub client_secret: Option<Secret>,
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

impl OidcConfig {
    /// The client secret, from the config or its file.
    pub fn secret(&self) -> Result<Option<Secret>, ConfigError> {
        match (&self.client_secret, &self.client_secret_file) {
            (Some(_), Some(_)) => Err(invalid(
                "auth.oidc.client_secret_file",
                "set client_secret or client_secret_file, not both",
            )),
            (Some(s), None) => Ok(Some(s.clone())),
            (None, Some(path)) => Secret::from_file("auth.oidc.client_secret_file", path).map(Some),
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

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevUser {
    pub email: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
}

fn yes() -> bool {
    true
}
