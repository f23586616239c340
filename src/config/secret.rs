//! [`Secret`]: the one type every secret in the configuration is held in (database
//! URLs, the OIDC client secret, the SMTP password, Slack's bot token and signing
//! secret, key passphrases, database admin passwords).
//!
//! It never prints its value: `Debug` shows `Secret(***)`, there is no `Display`, and
//! the value comes out only through [`Secret::expose`], so every place that uses one
//! says so. Errors name the key and the file, never the value.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Deserializer};

use super::{ConfigError, invalid};

/// A secret value, trimmed of trailing whitespace (the newline `echo` and editors
/// leave) and never empty.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A secret given directly (a TOML string or an environment variable named `key`).
    pub fn new(key: &str, value: &str) -> Result<Secret, ConfigError> {
        Secret::checked(value).ok_or_else(|| invalid(key, "must not be empty"))
    }

    /// A secret read from the file `path`, given by the setting `key` (`*_file`, or an
    /// environment variable `*_FILE`): the file keeps it out of the config and of `ps`.
    pub fn from_file(key: &str, path: &Path) -> Result<Secret, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
        Secret::checked(&text).ok_or_else(|| invalid(key, "the file is empty"))
    }

    /// [`Secret::from_file`] for a setting that may be absent.
    pub fn from_optional_file(
        key: &str,
        path: Option<&Path>,
    ) -> Result<Option<Secret>, ConfigError> {
        path.map(|p| Secret::from_file(key, p)).transpose()
    }

    /// The value, for the one place that hands it to a peer (a connection, a header,
    /// a key decryption). Never log or render it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A value twokey makes itself (the default SQLite URL): never empty.
    pub(super) fn generated(value: String) -> Secret {
        Secret(value)
    }

    fn checked(text: &str) -> Option<Secret> {
        let value = text.trim_end();
        (!value.is_empty()).then(|| Secret(value.to_string()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// From a TOML string; an empty one is refused ([`super::Config::parse`] names the key).
impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        let text = String::deserialize(d)?;
        Secret::checked(&text).ok_or_else(|| serde::de::Error::custom("must not be empty"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_read_trimmed_and_an_empty_one_refused_naming_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let cases: &[(&str, Option<&str>)] = &[
            ("hunter2", Some("hunter2")),
            ("hunter2\n", Some("hunter2")),
            ("hunter2\r\n", Some("hunter2")),
            ("hunter2 \t\n\n", Some("hunter2")),
            // Only the end is trimmed: a leading space may be part of a password.
            (" hunter 2\n", Some(" hunter 2")),
            ("", None),
            ("\n", None),
            (" \r\n\t", None),
        ];
        for (i, (content, want)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("s{i}"));
            std::fs::write(&path, content).unwrap();
            let got = Secret::from_file("email.password_file", &path);
            match want {
                Some(v) => assert_eq!(got.unwrap().expose(), *v, "{content:?}"),
                None => assert_eq!(
                    got.unwrap_err().to_string(),
                    "email.password_file: the file is empty",
                    "{content:?}"
                ),
            }
        }
        let missing = dir.path().join("absent");
        let err = Secret::from_file("slack.bot_token_file", &missing)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!(
                "slack.bot_token_file: cannot read {}: ",
                missing.display()
            )),
            "{err}"
        );
        assert_eq!(
            Secret::from_optional_file("ca.passphrase_file", None).unwrap(),
            None
        );
        assert_eq!(
            Secret::from_optional_file("ca.passphrase_file", Some(&dir.path().join("s0")))
                .unwrap()
                .map(|s| s.expose().to_string()),
            Some("hunter2".to_string())
        );
    }

    #[test]
    fn a_value_given_directly_is_checked() {
        for (value, want) in [
            ("postgres://u:pw@db/x", Some("postgres://u:pw@db/x")),
            ("s3cret\n", Some("s3cret")),
            ("", None),
            ("  ", None),
        ] {
            let got = Secret::new("TWOKEY_DATABASE_URL", value);
            match want {
                Some(v) => assert_eq!(got.unwrap().expose(), v),
                None => assert_eq!(
                    got.unwrap_err().to_string(),
                    "TWOKEY_DATABASE_URL: must not be empty"
                ),
            }
        }
    }

    #[derive(Debug, Deserialize)]
    struct Holder {
        #[allow(dead_code)]
        client_secret: Secret,
    }

    #[test]
    fn debug_never_prints_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "hunter2\n").unwrap();
        let from_toml: Holder = toml::from_str("client_secret = \"hunter2\"").unwrap();
        let secrets = [
            Secret::new("k", "hunter2").unwrap(),
            Secret::from_file("k", &path).unwrap(),
            from_toml.client_secret.clone(),
        ];
        for s in &secrets {
            assert_eq!(s.expose(), "hunter2");
            assert_eq!(format!("{s:?}"), "Secret(***)");
            assert_eq!(format!("{s:#?}"), "Secret(***)");
            assert!(!format!("{:?}", Some(s)).contains("hunter2"));
        }
        assert!(!format!("{from_toml:?}").contains("hunter2"));
    }

    #[test]
    fn an_empty_toml_string_is_refused() {
        for text in ["client_secret = \"\"", "client_secret = \" \\n\""] {
            let err = toml::from_str::<Holder>(text).unwrap_err().to_string();
            assert!(err.contains("must not be empty"), "{text}: {err}");
        }
        let err = toml::from_str::<Holder>("client_secret = 5")
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid type"), "{err}");
    }
}
