//! Durations in the file: parsed once, at load, into [`Duration`]s. Nothing else in
//! twokey parses a configured duration; it never falls back to a default for a bad one.

use std::time::Duration;

use super::{ConfigError, invalid};

pub use crate::policy::parse_duration;

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
