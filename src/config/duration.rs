//! Durations in the file: parsed once, at load, into [`Duration`]s. Nothing else in
//! twokey parses a configured duration; it never falls back to a default for a bad one.

use std::time::Duration;

use super::{ConfigError, invalid};

pub(super) fn check_nonzero(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(invalid(key, "must be longer than zero"));
    }
    Ok(())
}

/// Durations in the file are text (`"50ms"`, `"30s"`, `"1h30m"`, see
/// [`parse_duration`]), parsed once, here, at load: the rest of twokey only ever sees a
/// [`Duration`], so no later reader can re-parse one and fall back to a default. A bad
/// value fails the load, and [`Config::parse`] names its key.
pub(super) mod duration_setting {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// [`duration_setting`] for a setting that may be absent.
pub(super) mod optional_duration_setting {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| super::parse_duration(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Parses `"90"` (seconds), `"50ms"`, `"45s"`, `"30m"`, `"1h30m"`, `"2h"`, `"1d"`:
/// whole numbers, each with a unit (`ms`, `s`, `m`, `h`, `d`), largest first or not,
/// at most a year in all.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad =
        || format!("{s:?} is not a duration; write e.g. \"50ms\", \"30m\", \"1h30m\" or seconds");
    if s.is_empty() {
        return Err("a duration is required, e.g. \"30m\"".into());
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = s.parse().map_err(|_| bad())?;
        return capped(s, secs.checked_mul(1000).ok_or_else(bad)?);
    }
    let mut total_ms: u64 = 0;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit_ms = match c {
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                1
            }
            's' => 1000,
            'm' => 60_000,
            'h' => 3_600_000,
            'd' => 86_400_000,
            _ => return Err(bad()),
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        total_ms = n
            .checked_mul(unit_ms)
            .and_then(|v| total_ms.checked_add(v))
            .ok_or_else(bad)?;
        num.clear();
    }
    if !num.is_empty() {
        return Err(bad());
    }
    capped(s, total_ms)
}

fn capped(s: &str, ms: u64) -> Result<Duration, String> {
    // Cap far beyond any sane grant so arithmetic on timestamps cannot overflow.
    if ms > 366 * 86_400_000 {
        return Err(format!("{s:?} is longer than a year"));
    }
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::super::{Config, demo_config_toml};

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
    }
}
