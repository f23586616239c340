//! The `[email]` and `[slack]` sections: where notifications go and the files their
//! secrets are read from. It never sends anything, and its `Debug` never shows a secret.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, Secret};

#[derive(Debug, Clone, Deserialize)]
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

impl SlackConfig {
    /// (bot token, signing secret), read from their files.
    pub fn secrets(&self) -> Result<(Secret, Secret), ConfigError> {
        let token = Secret::from_file("slack.bot_token_file", &self.bot_token_file)?;
        let secret = Secret::from_file("slack.signing_secret_file", &self.signing_secret_file)?;
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

#[derive(Debug, Clone, Deserialize)]
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
impl EmailConfig {
    /// The SMTP password, read from `password_file`.
    pub fn password(&self) -> Result<Option<Secret>, ConfigError> {
        Secret::from_optional_file("email.password_file", self.password_file.as_deref())
    }
}
