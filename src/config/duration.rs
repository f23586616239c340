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
