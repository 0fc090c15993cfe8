//! Celery's time format: ISO-8601 as Python's `datetime.isoformat()` writes it.
//!
//! We emit `YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00` (microseconds omitted when zero, never `Z`) and
//! accept `Z`, any offset, and naive values (taken as UTC, as protocol 2 has no `utc` flag).

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};

use crate::error::{Error, Result};

/// Formats a time the way Python's `isoformat()` does for an aware UTC datetime.
pub fn format(t: DateTime<Utc>) -> String {
    let t = t.with_nanosecond_truncated();
    let micros = t.timestamp_subsec_micros();
    if micros == 0 {
        t.to_rfc3339_opts(SecondsFormat::Secs, false)
    } else {
        t.to_rfc3339_opts(SecondsFormat::Micros, false)
    }
}

/// The current time, truncated to microseconds (what Celery's format keeps).
pub fn now_micros() -> DateTime<Utc> {
    Utc::now().with_nanosecond_truncated()
}

/// Parses an ISO-8601 time with any offset, `Z`, or none (naive is UTC).
pub fn parse(s: &str) -> Result<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    // Python allows a space separator and naive values.
    let normalized = s.replacen(' ', "T", 1);
    if let Ok(t) = DateTime::parse_from_rfc3339(&normalized) {
        return Ok(t.with_timezone(&Utc));
    }
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(&normalized, fmt) {
            return Ok(t.and_utc());
        }
    }
    Err(Error::protocol(format!("invalid iso-8601 time {s:?}")))
}

trait TruncateNanos {
    fn with_nanosecond_truncated(self) -> Self;
}

impl TruncateNanos for DateTime<Utc> {
    fn with_nanosecond_truncated(self) -> Self {
        use chrono::Timelike;
        let micros = self.nanosecond() / 1_000 * 1_000;
        self.with_nanosecond(micros).unwrap_or(self)
    }
}

/// Serde helpers for `Option<DateTime<Utc>>` in Celery's format.
pub mod opt_serde {
    use chrono::{DateTime, Utc};
    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};

    /// Serializes `None` as null and a time in Celery's format.
    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&super::format(*t)),
            None => s.serialize_none(),
        }
    }

    /// Accepts null, any ISO-8601 string, or a number of Unix seconds; an empty string and
    /// 0 are no time at all (Python's `maybe_iso8601` treats every false value as none).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        d.deserialize_any(TimeVisitor)
    }

    struct TimeVisitor;

    impl<'de> Visitor<'de> for TimeVisitor {
        type Value = Option<DateTime<Utc>>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an ISO-8601 time, a number of Unix seconds, or null")
        }

        fn visit_none<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(TimeVisitor)
        }

        fn visit_str<E: Error>(self, s: &str) -> Result<Self::Value, E> {
            if s.is_empty() {
                return Ok(None);
            }
            super::parse(s).map(Some).map_err(E::custom)
        }

        fn visit_u64<E: Error>(self, n: u64) -> Result<Self::Value, E> {
            self.visit_f64(n as f64)
        }

        fn visit_i64<E: Error>(self, n: i64) -> Result<Self::Value, E> {
            self.visit_f64(n as f64)
        }

        fn visit_f64<E: Error>(self, secs: f64) -> Result<Self::Value, E> {
            if secs == 0.0 {
                return Ok(None);
            }
            let micros = secs * 1e6;
            // The range chrono can hold (and NaN, which fails both comparisons).
            if !(-8.2e18..=8.2e18).contains(&micros) {
                return Err(E::custom(format!("unix time {secs} is out of range")));
            }
            DateTime::from_timestamp_micros(micros as i64)
                .map(Some)
                .ok_or_else(|| E::custom(format!("unix time {secs} is out of range")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn formats_like_python_isoformat() {
        let t = Utc.with_ymd_and_hms(2026, 1, 5, 10, 15, 30).unwrap();
        assert_eq!(format(t), "2026-01-05T10:15:30+00:00");
        let t = t + chrono::Duration::microseconds(250_000);
        assert_eq!(format(t), "2026-01-05T10:15:30.250000+00:00");
        let t = t + chrono::Duration::nanoseconds(999);
        assert_eq!(format(t), "2026-01-05T10:15:30.250000+00:00");
    }

    #[test]
    fn parses_every_variant_celery_accepts() {
        let want = Utc.with_ymd_and_hms(2026, 1, 5, 10, 15, 30).unwrap();
        for s in [
            "2026-01-05T10:15:30+00:00",
            "2026-01-05T10:15:30Z",
            "2026-01-05T11:15:30+01:00",
            "2026-01-05T10:15:30",
            "2026-01-05 10:15:30",
        ] {
            assert_eq!(parse(s).unwrap(), want, "{s}");
        }
        assert_eq!(
            parse("2026-01-05T10:15:30.250000+00:00")
                .unwrap()
                .timestamp_subsec_micros(),
            250_000
        );
        assert!(parse("yesterday").is_err());
    }
}
