//! The `[email]` and `[slack]` sections: where notifications go and the files their
//! secrets are read from. It never sends anything, and its `Debug` never shows a secret.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ConfigError, invalid};

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
