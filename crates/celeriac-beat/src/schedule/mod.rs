//! When an entry fires: [`every`] interval, [`crontab`] expression, or once [`at`] a time,
//! with an optional time zone, start and end.

mod crontab;
mod zone;

use std::fmt;
use std::time::Duration;

use celeriac_core::{Error, Result};
use chrono::{DateTime, NaiveTime, Timelike, Utc};

pub use crontab::{Crontab, CrontabBuilder};
pub use zone::{Iana, Zone};

/// When an entry fires.
///
/// ```
/// use std::time::Duration;
/// use celeriac_beat::{at, crontab, every};
///
/// let s = every(Duration::from_secs(30));
/// let nightly = crontab("0", "4", "*", "*", "*").unwrap().timezone("Europe/Paris").unwrap();
/// let once = at("2030-01-01T00:00:00Z".parse().unwrap());
/// # let _ = (s, nightly, once);
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Schedule {
    kind: Kind,
    zone: Option<Zone>,
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
}

#[derive(Clone, PartialEq, Eq)]
enum Kind {
    Every { every: Duration, relative: bool },
    Cron(Crontab),
    At(DateTime<Utc>),
}

/// Fires every `interval`, counted from the last run (the first run is one interval after the
/// entry is first seen). An interval of zero is rejected when the beat starts.
pub fn every(interval: Duration) -> Schedule {
    Schedule::new(Kind::Every {
        every: interval,
        relative: false,
    })
}

/// Fires when all five fields match, with Celery's semantics (see [`Crontab`]); note Celery's
/// argument order, day of week before day of month.
pub fn crontab(
    minute: &str,
    hour: &str,
    day_of_week: &str,
    day_of_month: &str,
    month_of_year: &str,
) -> Result<Schedule> {
    let c = Crontab::builder()
        .minute(minute)
        .hour(hour)
        .day_of_week(day_of_week)
        .day_of_month(day_of_month)
        .month_of_year(month_of_year)
        .build()?;
    Ok(Schedule::from(c))
}

/// Fires once, at `time` (or as soon as a beat runs after it, under the missed-tick policy).
pub fn at(time: DateTime<Utc>) -> Schedule {
    Schedule::new(Kind::At(time))
}

impl From<Crontab> for Schedule {
    fn from(c: Crontab) -> Self {
        Schedule::new(Kind::Cron(c))
    }
}

impl Schedule {
    fn new(kind: Kind) -> Self {
        Schedule {
            kind,
            zone: None,
            start: None,
            end: None,
        }
    }

    /// For [`every`]: Celery's `relative` option. The due time `last_run + interval` is
    /// rounded down to the interval's resolution (whole days, hours, minutes or seconds, in
    /// the schedule's zone), so `every(1h).relative(true)` fires on the hour.
    #[must_use]
    pub fn relative(mut self, relative: bool) -> Self {
        if let Kind::Every { relative: r, .. } = &mut self.kind {
            *r = relative;
        }
        self
    }

    /// Matches crontab fields (and rounds relative intervals) in `zone` instead of the beat's
    /// zone.
    #[must_use]
    pub fn zone(mut self, zone: Zone) -> Self {
        self.zone = Some(zone);
        self
    }

    /// Like [`Schedule::zone`], with a zone name; fails if the zone is unknown.
    pub fn timezone(self, name: &str) -> Result<Self> {
        Ok(self.zone(Zone::named(name)?))
    }

    /// No tick before `start`; an interval's first tick is `start` itself.
    #[must_use]
    pub fn start(mut self, start: DateTime<Utc>) -> Self {
        self.start = Some(start);
        self
    }

    /// No tick after `end`.
    #[must_use]
    pub fn end(mut self, end: DateTime<Utc>) -> Self {
        self.end = Some(end);
        self
    }

    /// The zone set on this schedule, if any.
    pub fn get_zone(&self) -> Option<&Zone> {
        self.zone.as_ref()
    }

    /// Checks what a builder cannot: a zero interval, an end before the start.
    pub fn validate(&self) -> Result<()> {
        if let Kind::Every { every, .. } = &self.kind {
            if every.is_zero() {
                return Err(Error::config("invalid interval 0s: must be positive"));
            }
            if chrono::Duration::from_std(*every).is_err() {
                return Err(Error::config(format!(
                    "invalid interval {every:?}: too long"
                )));
            }
        }
        if let (Some(s), Some(e)) = (self.start, self.end) {
            if e < s {
                return Err(Error::config(format!(
                    "invalid end {}: before the start {}",
                    celeriac_core::time::format(e),
                    celeriac_core::time::format(s)
                )));
            }
        }
        Ok(())
    }

    /// Whether this is a one-off [`at`] schedule.
    pub fn is_one_off(&self) -> bool {
        matches!(self.kind, Kind::At(_))
    }

    /// The first tick after `last` (`None`: never ran, for [`at`]; an interval or crontab
    /// then counts from `since`, when the entry was first seen). `None` when no tick is left.
    pub fn next_tick(
        &self,
        last: Option<DateTime<Utc>>,
        since: DateTime<Utc>,
        default_zone: &Zone,
    ) -> Option<DateTime<Utc>> {
        let zone = self.zone.as_ref().unwrap_or(default_zone);
        let anchor = last.unwrap_or(since);
        let t = match &self.kind {
            Kind::At(t) => last.is_none().then_some(*t),
            Kind::Every { every, relative } => match self.start {
                Some(s) if anchor < s => Some(s),
                _ => {
                    let due = anchor + chrono::Duration::from_std(*every).ok()?;
                    Some(if *relative {
                        round_down(due, *every, zone)
                    } else {
                        due
                    })
                }
            },
            Kind::Cron(c) => match self.start {
                Some(s) if anchor < s => c.next_after(s - chrono::Duration::nanoseconds(1), zone),
                _ => c.next_after(anchor, zone),
            },
        };
        t.filter(|t| self.end.is_none_or(|e| *t <= e))
    }

    /// The last tick at or before `now`, given that `due` (a tick) is at or before `now`.
    pub(crate) fn latest_tick(
        &self,
        due: DateTime<Utc>,
        now: DateTime<Utc>,
        default_zone: &Zone,
    ) -> DateTime<Utc> {
        if let Kind::Every {
            every,
            relative: false,
        } = &self.kind
        {
            let step = chrono::Duration::from_std(*every).unwrap_or(chrono::Duration::MAX);
            let (Some(step_ns), Some(behind)) =
                (step.num_nanoseconds(), (now - due).num_nanoseconds())
            else {
                return due;
            };
            let n = behind / step_ns.max(1);
            let latest = due + chrono::Duration::nanoseconds(n.saturating_mul(step_ns));
            return if self.end.is_some_and(|e| latest > e) {
                self.walk(due, now, default_zone)
            } else {
                latest
            };
        }
        self.walk(due, now, default_zone)
    }

    fn walk(&self, due: DateTime<Utc>, now: DateTime<Utc>, zone: &Zone) -> DateTime<Utc> {
        let mut t = due;
        // Bounded: past that, the anchor simply becomes `now`, which is not a tick but has the
        // same next tick for a crontab.
        for _ in 0..10_000 {
            match self.next_tick(Some(t), t, zone) {
                Some(n) if n <= now => t = n,
                _ => return t,
            }
        }
        now
    }
}

/// Rounds `t` down to the resolution of `every`, in `zone` (Celery's `delta_resolution`).
fn round_down(t: DateTime<Utc>, every: Duration, zone: &Zone) -> DateTime<Utc> {
    let local = zone.to_local(t);
    let secs = every.as_secs();
    let rounded = if secs >= 86_400 {
        local.date().and_time(NaiveTime::MIN)
    } else if secs >= 3600 {
        local
            .with_minute(0)
            .and_then(|l| l.with_second(0))
            .unwrap_or(local)
    } else if secs >= 60 {
        local.with_second(0).unwrap_or(local)
    } else {
        local
    }
    .with_nanosecond(0)
    .unwrap_or(local);
    match zone.resolve(rounded) {
        zone::Local::Single(u) | zone::Local::Skipped(u) => u,
        zone::Local::Repeated(first, _) => first,
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Every { every, relative } => {
                write!(f, "every {}", humantime(*every))?;
                if *relative {
                    f.write_str(" (relative)")?;
                }
            }
            Kind::Cron(c) => write!(f, "crontab {c}")?,
            Kind::At(t) => write!(f, "at {}", celeriac_core::time::format(*t))?,
        }
        if let Some(z) = &self.zone {
            write!(f, " [{}]", z.name())?;
        }
        if let Some(s) = self.start {
            write!(f, " from {}", celeriac_core::time::format(s))?;
        }
        if let Some(e) = self.end {
            write!(f, " until {}", celeriac_core::time::format(e))?;
        }
        Ok(())
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({self})")
    }
}

fn humantime(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 != 0 {
        format!("{}s", d.as_secs_f64())
    } else {
        format!("{}s", d.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        celeriac_core::time::parse(s).unwrap()
    }

    #[test]
    fn intervals_count_from_the_last_run_or_the_first_sight() {
        let s = every(Duration::from_secs(90));
        let z = Zone::Utc;
        let since = t("2026-01-01T00:00:10Z");
        assert_eq!(
            s.next_tick(None, since, &z),
            Some(t("2026-01-01T00:01:40Z"))
        );
        assert_eq!(
            s.next_tick(Some(t("2026-01-01T00:05:00Z")), since, &z),
            Some(t("2026-01-01T00:06:30Z"))
        );
        // Celery's `relative`: rounded down to whole minutes.
        let r = every(Duration::from_secs(60)).relative(true);
        assert_eq!(
            r.next_tick(Some(t("2026-01-01T00:05:42Z")), since, &z),
            Some(t("2026-01-01T00:06:00Z"))
        );
        let daily = every(Duration::from_secs(86_400)).relative(true);
        let paris = Zone::named("Europe/Paris").unwrap();
        assert_eq!(
            daily.next_tick(Some(t("2026-01-01T15:00:00Z")), since, &paris),
            Some(t("2026-01-01T23:00:00Z"))
        );
    }

    #[test]
    fn start_end_and_one_off() {
        let z = Zone::Utc;
        let since = t("2026-01-01T00:00:00Z");
        let s = every(Duration::from_secs(60))
            .start(t("2026-02-01T00:00:00Z"))
            .end(t("2026-02-01T00:02:00Z"));
        assert_eq!(
            s.next_tick(None, since, &z),
            Some(t("2026-02-01T00:00:00Z"))
        );
        assert_eq!(
            s.next_tick(Some(t("2026-02-01T00:01:00Z")), since, &z),
            Some(t("2026-02-01T00:02:00Z"))
        );
        assert_eq!(
            s.next_tick(Some(t("2026-02-01T00:02:00Z")), since, &z),
            None
        );
        let c =
            Schedule::from(Crontab::parse("0 * * * *").unwrap()).start(t("2026-03-01T10:00:00Z"));
        assert_eq!(
            c.next_tick(None, since, &z),
            Some(t("2026-03-01T10:00:00Z"))
        );
        let once = at(t("2025-06-01T00:00:00Z"));
        assert_eq!(
            once.next_tick(None, since, &z),
            Some(t("2025-06-01T00:00:00Z"))
        );
        assert_eq!(
            once.next_tick(Some(t("2025-06-01T00:00:00Z")), since, &z),
            None
        );
    }

    #[test]
    fn latest_tick_collapses_missed_ticks() {
        let z = Zone::Utc;
        let s = every(Duration::from_secs(10));
        assert_eq!(
            s.latest_tick(t("2026-01-01T00:00:10Z"), t("2026-01-01T00:01:05Z"), &z),
            t("2026-01-01T00:01:00Z")
        );
        let c = Schedule::from(Crontab::parse("*/5 * * * *").unwrap());
        assert_eq!(
            c.latest_tick(t("2026-01-01T00:05:00Z"), t("2026-01-01T01:02:00Z"), &z),
            t("2026-01-01T01:00:00Z")
        );
    }

    #[test]
    fn bad_schedules_are_rejected() {
        let e = every(Duration::ZERO).validate().unwrap_err();
        assert!(e.to_string().contains("interval"), "{e}");
        let e = every(Duration::from_secs(1))
            .start(t("2026-01-02T00:00:00Z"))
            .end(t("2026-01-01T00:00:00Z"))
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("before the start"), "{e}");
    }
}
