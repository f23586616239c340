//! The `[email]` and `[slack]` sections: where notifications go and the files their
//! secrets are read from. It never sends anything, and its `Debug` never shows a secret.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, Secret};

#[derive(Debug, Clone, PartialEq, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Deserialize)]
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{Config, demo_config_toml};

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
}
