//! Time zones: UTC, or an IANA zone read from the system's tz database.
//!
//! Zones come from the TZif files the operating system keeps (`/usr/share/zoneinfo`, the
//! `tzdata` package on Debian), parsed by the small `tz-rs` crate, rather than from a copy of
//! the database compiled into the binary: that keeps compile times down and follows the
//! system's updates. A zone that is not installed is a start-up error naming it.

use std::fmt;
use std::sync::Arc;

use celeriac_core::{Error, Result};
use chrono::{DateTime, NaiveDateTime, TimeZone as _, Utc};

/// A time zone in which crontab fields are matched: UTC or an IANA zone such as
/// `Europe/Paris`.
///
/// ```
/// use celeriac_beat::Zone;
/// assert_eq!(Zone::named("UTC").unwrap(), Zone::Utc);
/// assert!(Zone::named("Mars/Olympus_Mons").is_err());
/// ```
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum Zone {
    /// Coordinated Universal Time (the default, as in Celery).
    #[default]
    Utc,
    /// An IANA zone.
    Iana(Arc<Iana>),
}

/// An IANA zone, loaded from the system's tz database.
pub struct Iana {
    name: String,
    tz: tz::TimeZone,
}

impl fmt::Debug for Iana {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl fmt::Debug for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl PartialEq for Zone {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Zone {}

/// How a local wall-clock time maps to instants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Local {
    /// Exactly one instant.
    Single(DateTime<Utc>),
    /// The wall clock was set back: the time happens twice (earlier, later).
    Repeated(DateTime<Utc>, DateTime<Utc>),
    /// The wall clock jumped over it; the instant is the end of the gap.
    Skipped(DateTime<Utc>),
}

impl Zone {
    /// The zone named `name`: `UTC` (also `Etc/UTC`, `Z`), or an IANA name such as
    /// `America/New_York` found in the system's tz database.
    pub fn named(name: &str) -> Result<Zone> {
        let name = name.trim();
        if matches!(
            name,
            "UTC" | "utc" | "Etc/UTC" | "Z" | "GMT" | "Etc/GMT" | "UCT"
        ) {
            return Ok(Zone::Utc);
        }
        // tz-rs also reads POSIX TZ rules ("EST5EDT,M3.2.0,M11.1.0"); only zone names are
        // meant here, so a rule-like name must still be a file of the tz database.
        if name.is_empty() || name.starts_with(['/', '.']) || name.contains("..") {
            return Err(Error::config(format!("unknown time zone {name:?}")));
        }
        let tz = tz::TimeZone::from_posix_tz(name).map_err(|e| {
            Error::config(format!(
                "unknown time zone {name:?} (is the tz database, e.g. the tzdata package, installed?)"
            ))
            .with_source(Box::new(e) as celeriac_core::BoxError)
        })?;
        Ok(Zone::Iana(Arc::new(Iana {
            name: name.to_owned(),
            tz,
        })))
    }

    /// The zone's name.
    pub fn name(&self) -> &str {
        match self {
            Zone::Utc => "UTC",
            Zone::Iana(z) => &z.name,
        }
    }

    /// Seconds east of UTC at instant `unix` (seconds).
    fn offset_at(&self, unix: i64) -> i64 {
        match self {
            Zone::Utc => 0,
            Zone::Iana(z) => {
                z.tz.find_local_time_type(unix)
                    .map_or(0, |t| i64::from(t.ut_offset()))
            }
        }
    }

    /// The wall-clock time at `t`.
    pub fn to_local(&self, t: DateTime<Utc>) -> NaiveDateTime {
        let off = self.offset_at(t.timestamp());
        t.naive_utc() + chrono::Duration::seconds(off)
    }

    /// The instants a wall-clock time stands for.
    pub(crate) fn resolve(&self, local: NaiveDateTime) -> Local {
        let Zone::Iana(_) = self else {
            return Local::Single(local.and_utc());
        };
        let l = local.and_utc().timestamp();
        let sub = local.and_utc().timestamp_subsec_nanos();
        // Offsets in force a day either side cover every real transition (none is closer to
        // another than that); each offset `o` that maps `l - o` back to `l` gives an instant.
        let mut offsets = [self.offset_at(l - 86_400), self.offset_at(l + 86_400)];
        offsets.sort_unstable();
        let mut found: Vec<i64> = offsets
            .iter()
            .filter(|&&o| self.offset_at(l - o) == o)
            .map(|&o| l - o)
            .collect();
        found.sort_unstable();
        found.dedup();
        let at = |s: i64| {
            Utc.timestamp_opt(s, sub)
                .single()
                .unwrap_or(DateTime::<Utc>::MIN_UTC)
        };
        match found.as_slice() {
            [one] => Local::Single(at(*one)),
            [a, .., b] => Local::Repeated(at(*a), at(*b)),
            [] => {
                // A gap: the transition lies between the instants the two offsets give.
                let (lo_off, hi_off) = (offsets[0], offsets[1]);
                let (mut lo, mut hi) = (l - hi_off, l - lo_off);
                let after = self.offset_at(hi);
                while hi - lo > 1 {
                    let mid = lo + (hi - lo) / 2;
                    if self.offset_at(mid) == after {
                        hi = mid;
                    } else {
                        lo = mid;
                    }
                }
                Local::Skipped(at(hi).with_nanosecond_zero())
            }
        }
    }
}

trait NanoZero {
    fn with_nanosecond_zero(self) -> Self;
}

impl NanoZero for DateTime<Utc> {
    fn with_nanosecond_zero(self) -> Self {
        use chrono::Timelike;
        self.with_nanosecond(0).unwrap_or(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    fn local(y: i32, m: u32, d: u32, h: u32, min: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(y, m, d)
            .unwrap()
            .and_hms_opt(h, min, 0)
            .unwrap()
    }

    fn utc(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
        local(y, m, d, h, min).and_utc()
    }

    #[test]
    fn new_york_gaps_and_repeats() {
        let z = Zone::named("America/New_York").unwrap();
        assert_eq!(
            z.resolve(local(2026, 1, 10, 12, 0)),
            Local::Single(utc(2026, 1, 10, 17, 0))
        );
        // 2026-03-08 02:00 EST -> 03:00 EDT: 02:30 does not exist; the gap ends at 07:00 UTC.
        assert_eq!(
            z.resolve(local(2026, 3, 8, 2, 30)),
            Local::Skipped(utc(2026, 3, 8, 7, 0))
        );
        // 2026-11-01 02:00 EDT -> 01:00 EST: 01:30 happens at 05:30 and 06:30 UTC.
        assert_eq!(
            z.resolve(local(2026, 11, 1, 1, 30)),
            Local::Repeated(utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 6, 30))
        );
        assert_eq!(
            z.to_local(utc(2026, 11, 1, 6, 30)),
            local(2026, 11, 1, 1, 30)
        );
    }

    #[test]
    fn unknown_zones_are_errors() {
        for bad in ["Mars/Base", "", "../etc/passwd", "/etc/passwd"] {
            let e = Zone::named(bad).unwrap_err();
            assert!(e.to_string().contains("unknown time zone"), "{e}");
        }
        assert_eq!(Zone::named("Etc/UTC").unwrap(), Zone::Utc);
    }
}
