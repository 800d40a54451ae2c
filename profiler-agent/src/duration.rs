//! Durations in config files as humantime strings (`15s`, `500ms`, `5m`), read and written
//! back the same way so that `check-config` prints what a user would type.

use std::time::Duration;

use serde::{Deserialize as _, Deserializer, Serializer};

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
}

pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*value).to_string())
}

/// The same, refusing zero: for periods something waits on.
pub mod positive {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = super::deserialize(d)?;
        if v.is_zero() {
            return Err(serde::de::Error::custom("must be positive"));
        }
        Ok(v)
    }

    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        super::serialize(value, s)
    }
}
