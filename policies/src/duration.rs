//! Human durations in policy files (`500ms`, `30s`, `5m`, `1h`, `1h30m`).
//! Kept as strings on the wire so YAML, JSON Schema and the CRD all agree.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written as one or more `<number><unit>` parts, units `ms`, `s`, `m`, `h`, `d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub std::time::Duration);

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("invalid duration `{0}`: expected a number followed by a unit (ms, s, m, h, d), e.g. `30s` or `1h30m`")]
    Syntax(String),
    #[error("duration `{0}` is too large: durations are at most {max} (100 years)", max = Duration::MAX)]
    Overflow(String),
}

impl Duration {
    /// The longest duration a policy or flag may write (100 years of 365 days). Parsing refuses
    /// anything longer, so no arithmetic on a parsed duration (a deadline, a doubling backoff, a
    /// wall-clock conversion) can overflow; every field has a much smaller bound of its own.
    pub const MAX: Duration = Duration::from_secs(100 * 365 * 86_400);

    pub const fn from_secs(secs: u64) -> Self {
        Duration(std::time::Duration::from_secs(secs))
    }

    pub const fn from_millis(ms: u64) -> Self {
        Duration(std::time::Duration::from_millis(ms))
    }

    pub fn as_std(&self) -> std::time::Duration {
        self.0
    }
}

impl From<Duration> for std::time::Duration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        if text.is_empty() {
            return Err(DurationError::Empty);
        }
        let syntax = || DurationError::Syntax(s.to_string());
        let overflow = || DurationError::Overflow(s.to_string());
        let mut total_ms: u64 = 0;
        let mut rest = text;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(syntax());
            }
            let number: u64 = rest[..digits].parse().map_err(|_| overflow())?;
            rest = &rest[digits..];
            let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            let factor_ms: u64 = match &rest[..unit_len] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                _ => return Err(syntax()),
            };
            rest = &rest[unit_len..];
            let part = number.checked_mul(factor_ms).ok_or_else(overflow)?;
            total_ms = total_ms.checked_add(part).ok_or_else(overflow)?;
            if total_ms > Duration::MAX.0.as_millis() as u64 {
                return Err(overflow());
            }
        }
        Ok(Duration::from_millis(total_ms))
    }
}

impl fmt::Display for Duration {
    /// Prints the shortest exact form: `90s` becomes `1m30s`, `1500ms` stays `1500ms`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        if !ms.is_multiple_of(1000) {
            return write!(f, "{ms}ms");
        }
        let mut secs = ms / 1000;
        for (unit, size) in [("d", 86_400u128), ("h", 3_600), ("m", 60)] {
            if secs >= size {
                write!(f, "{}{unit}", secs / size)?;
                secs %= size;
            }
        }
        if secs > 0 {
            write!(f, "{secs}s")?;
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^([0-9]+(ms|s|m|h|d))+$",
            "description": "A duration such as 500ms, 30s, 5m, 1h or 1h30m."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_compounds() {
        let ms = |s: &str| s.parse::<Duration>().map(|d| d.0.as_millis());
        assert_eq!(ms("500ms"), Ok(500));
        assert_eq!(ms("30s"), Ok(30_000));
        assert_eq!(ms("5m"), Ok(300_000));
        assert_eq!(ms("1h"), Ok(3_600_000));
        assert_eq!(ms("1h30m"), Ok(5_400_000));
        assert_eq!(ms("2d"), Ok(172_800_000));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "10", "s", "1x", "1.5s", "-1s", "1s2", "99999999999999999999s"] {
            assert!(bad.parse::<Duration>().is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn refuses_more_than_a_hundred_years() {
        assert_eq!("36500d".parse::<Duration>(), Ok(Duration::MAX));
        for absurd in ["36501d", "100000000d", "36500d1ms", "18446744073709551615ms"] {
            let err = absurd.parse::<Duration>().expect_err(absurd);
            assert_eq!(err, DurationError::Overflow(absurd.into()));
            assert!(err.to_string().contains("at most 36500d (100 years)"), "{err}");
        }
    }

    #[test]
    fn display_round_trips() {
        for text in ["0s", "500ms", "1500ms", "30s", "1m30s", "1h", "1d2h3m4s"] {
            let d: Duration = text.parse().unwrap();
            assert_eq!(d.to_string(), text);
            assert_eq!(d.to_string().parse::<Duration>().unwrap(), d);
        }
    }
}
