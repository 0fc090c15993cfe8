//! Crontab expressions with Celery's semantics, and their next fire time.

use std::fmt;

use celeriac_core::{Error, Result};
use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveDateTime, Utc};

use super::zone::{Local, Zone};

const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];

/// How many years ahead the next fire time is searched for (a 29 February that must also be
/// a given weekday can be 40 years away).
const HORIZON_YEARS: i32 = 400;

/// A crontab schedule with Celery's field semantics.
///
/// Fields and ranges: `minute` 0–59, `hour` 0–23, `day_of_week` 0–6 with **0 = Sunday**
/// (names `sun`..`sat`; 7 is invalid), `day_of_month` 1–31, `month_of_year` 1–12 (names
/// `jan`..`dec`). Each field is `*`, `n`, `a-b` (wrapping round when `b < a`: `fri-mon`),
/// `*/s`, `a-b/s`, or a comma-separated list of those. **All five fields must match**: unlike
/// classic cron, day of month and day of week are ANDed, as in Celery.
///
/// ```
/// use celeriac_beat::Crontab;
/// // 09:30 on weekdays.
/// let c = Crontab::builder().minute("30").hour("9").day_of_week("mon-fri").build().unwrap();
/// assert_eq!(c.to_string(), "30 9 * * mon-fri");
/// let err = Crontab::builder().day_of_week("7").build().unwrap_err();
/// assert!(err.to_string().contains("day_of_week"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Crontab {
    minute: Field,
    hour: Field,
    day_of_week: Field,
    day_of_month: Field,
    month_of_year: Field,
    source: [String; 5],
}

/// A crontab being built: five field texts, checked by [`CrontabBuilder::build`].
#[derive(Debug, Clone)]
pub struct CrontabBuilder {
    fields: [String; 5],
}

/// The set of values one field allows, as a bit set.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Field(u64);

impl Field {
    fn has(self, v: u32) -> bool {
        v < 64 && self.0 & (1 << v) != 0
    }

    fn values(self) -> impl Iterator<Item = u32> {
        (0..64).filter(move |v| self.has(*v))
    }
}

struct Spec {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const SPECS: [Spec; 5] = [
    Spec {
        name: "minute",
        min: 0,
        max: 59,
        names: &[],
    },
    Spec {
        name: "hour",
        min: 0,
        max: 23,
        names: &[],
    },
    Spec {
        name: "day_of_week",
        min: 0,
        max: 6,
        names: &DAYS,
    },
    Spec {
        name: "day_of_month",
        min: 1,
        max: 31,
        names: &[],
    },
    Spec {
        name: "month_of_year",
        min: 1,
        max: 12,
        names: &MONTHS,
    },
];

impl Default for CrontabBuilder {
    fn default() -> Self {
        CrontabBuilder {
            fields: std::array::from_fn(|_| "*".to_owned()),
        }
    }
}

impl CrontabBuilder {
    /// The minute field (default `*`).
    #[must_use]
    pub fn minute(mut self, spec: impl Into<String>) -> Self {
        self.fields[0] = spec.into();
        self
    }

    /// The hour field (default `*`).
    #[must_use]
    pub fn hour(mut self, spec: impl Into<String>) -> Self {
        self.fields[1] = spec.into();
        self
    }

    /// The day-of-week field, 0 = Sunday (default `*`).
    #[must_use]
    pub fn day_of_week(mut self, spec: impl Into<String>) -> Self {
        self.fields[2] = spec.into();
        self
    }

    /// The day-of-month field (default `*`).
    #[must_use]
    pub fn day_of_month(mut self, spec: impl Into<String>) -> Self {
        self.fields[3] = spec.into();
        self
    }

    /// The month-of-year field (default `*`).
    #[must_use]
    pub fn month_of_year(mut self, spec: impl Into<String>) -> Self {
        self.fields[4] = spec.into();
        self
    }

    /// Checks every field; the error names the field and the reason.
    pub fn build(self) -> Result<Crontab> {
        let mut parsed = [Field(0); 5];
        for (i, spec) in SPECS.iter().enumerate() {
            parsed[i] = parse_field(spec, &self.fields[i]).map_err(|reason| {
                Error::config(format!(
                    "invalid crontab field {} {:?}: {reason}",
                    spec.name, self.fields[i]
                ))
            })?;
        }
        let c = Crontab {
            minute: parsed[0],
            hour: parsed[1],
            day_of_week: parsed[2],
            day_of_month: parsed[3],
            month_of_year: parsed[4],
            source: self.fields,
        };
        // A day that no selected month has can never match: say so now, not never.
        let longest = c
            .month_of_year
            .values()
            .map(|m| if m == 2 { 29 } else { days_in(2001, m) })
            .max()
            .unwrap_or(0);
        if c.day_of_month.values().all(|d| d > longest) {
            return Err(Error::config(format!(
                "invalid crontab field day_of_month {:?}: no selected month has that day",
                c.source[3]
            )));
        }
        Ok(c)
    }
}

impl Crontab {
    /// A builder with every field `*` (every minute).
    pub fn builder() -> CrontabBuilder {
        CrontabBuilder::default()
    }

    /// Parses the classic five-field text `minute hour day_of_month month_of_year
    /// day_of_week` (note the order; the fields are still ANDed, Celery's way).
    ///
    /// ```
    /// let c = celeriac_beat::Crontab::parse("*/15 8-18 * * mon-fri").unwrap();
    /// assert_eq!(c.to_string(), "*/15 8-18 * * mon-fri");
    /// ```
    pub fn parse(text: &str) -> Result<Crontab> {
        let parts: Vec<&str> = text.split_whitespace().collect();
        let [minute, hour, dom, month, dow] = parts.as_slice() else {
            return Err(Error::config(format!(
                "invalid crontab {text:?}: expected five fields (minute hour day_of_month \
                 month_of_year day_of_week), found {}",
                parts.len()
            )));
        };
        Crontab::builder()
            .minute(*minute)
            .hour(*hour)
            .day_of_month(*dom)
            .month_of_year(*month)
            .day_of_week(*dow)
            .build()
    }

    fn matches_day(&self, d: NaiveDate) -> bool {
        self.month_of_year.has(d.month())
            && self.day_of_month.has(d.day())
            && self.day_of_week.has(d.weekday().num_days_from_sunday())
    }

    /// The first fire time strictly after `after`, matching the fields in `zone`'s wall time.
    ///
    /// Daylight saving time: a wall time that does not exist (the clock jumped over it) fires
    /// at the end of the gap, so a daily job is never lost; a wall time that happens twice
    /// (the clock was set back) fires once, at its first occurrence.
    pub fn next_after(&self, after: DateTime<Utc>, zone: &Zone) -> Option<DateTime<Utc>> {
        let start = zone.to_local(after);
        // A day earlier: near a transition the first candidate can sit on the previous date.
        let mut day = start.date().pred_opt()?;
        let last = day.with_year(day.year() + HORIZON_YEARS)?;
        while day <= last {
            if !self.month_of_year.has(day.month()) {
                // Jump to the first day of the next month.
                let (y, m) = if day.month() == 12 {
                    (day.year() + 1, 1)
                } else {
                    (day.year(), day.month() + 1)
                };
                day = NaiveDate::from_ymd_opt(y, m, 1)?;
                continue;
            }
            if self.matches_day(day) {
                if let Some(t) = self.first_in_day(day, after, start, zone) {
                    return Some(t);
                }
            }
            day = day.succ_opt()?;
        }
        None
    }

    fn first_in_day(
        &self,
        day: NaiveDate,
        after: DateTime<Utc>,
        start: NaiveDateTime,
        zone: &Zone,
    ) -> Option<DateTime<Utc>> {
        for h in self.hour.values() {
            for m in self.minute.values() {
                let local = day.and_hms_opt(h, m, 0)?;
                // Wall times far before the start cannot map after it; skip them cheaply.
                if local + Duration::hours(26) < start {
                    continue;
                }
                let at = match zone.resolve(local) {
                    Local::Single(t) | Local::Skipped(t) => t,
                    // Fired once, at the first occurrence; the second is never a new tick.
                    Local::Repeated(first, _) => first,
                };
                if at > after {
                    return Some(at);
                }
            }
        }
        None
    }
}

impl fmt::Display for Crontab {
    /// The classic order: minute hour day_of_month month_of_year day_of_week.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.source;
        write!(f, "{} {} {} {} {}", s[0], s[1], s[3], s[4], s[2])
    }
}

impl fmt::Debug for Crontab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Crontab({self})")
    }
}

fn days_in(year: i32, month: u32) -> u32 {
    let next = if month == 12 {
        NaiveDate::from_ymd_opt(year + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(year, month + 1, 1)
    };
    next.and_then(|n| n.pred_opt()).map_or(31, |d| d.day())
}

fn parse_field(spec: &Spec, text: &str) -> std::result::Result<Field, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty field".to_owned());
    }
    let mut set = 0u64;
    for part in text.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err("empty list item".to_owned());
        }
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .trim()
                    .parse()
                    .map_err(|_| format!("step {s:?} is not a number"))?;
                if step == 0 {
                    return Err("a step must be at least 1".to_owned());
                }
                (r.trim(), Some(step))
            }
            None => (part, None),
        };
        let values: Vec<u32> = if range == "*" {
            (spec.min..=spec.max).collect()
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (number(spec, a)?, number(spec, b)?);
            if b < a {
                (a..=spec.max).chain(spec.min..=b).collect()
            } else {
                (a..=b).collect()
            }
        } else {
            if step.is_some() {
                return Err(format!(
                    "a step needs `*` or a range before `/` (write `{range}-{}/..`)",
                    spec.max
                ));
            }
            vec![number(spec, range)?]
        };
        for v in values.into_iter().step_by(step.unwrap_or(1) as usize) {
            set |= 1 << v;
        }
    }
    Ok(Field(set))
}

fn number(spec: &Spec, text: &str) -> std::result::Result<u32, String> {
    let text = text.trim();
    let v = match text.parse::<u32>() {
        Ok(v) => v,
        Err(_) => {
            let lower = text.to_ascii_lowercase();
            let abbrev = lower.get(..3).unwrap_or(&lower);
            let i = spec
                .names
                .iter()
                .position(|n| *n == abbrev)
                .ok_or_else(|| format!("{text:?} is not a number or a known name"))?;
            return Ok(u32::try_from(i).unwrap_or(0) + spec.min);
        }
    };
    if v < spec.min || v > spec.max {
        return Err(format!(
            "{v} is out of range {}-{}{}",
            spec.min,
            spec.max,
            if spec.name == "day_of_week" && v == 7 {
                " (0 is Sunday)"
            } else {
                ""
            }
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        celeriac_core::time::parse(s).unwrap()
    }

    fn fields(c: &Crontab) -> [Vec<u32>; 5] {
        [
            c.minute.values().collect(),
            c.hour.values().collect(),
            c.day_of_week.values().collect(),
            c.day_of_month.values().collect(),
            c.month_of_year.values().collect(),
        ]
    }

    #[test]
    fn celery_field_syntax() {
        let c = Crontab::builder()
            .minute("*/15")
            .hour("22-2/2")
            .day_of_week("fri-mon")
            .day_of_month("*/10")
            .month_of_year("Jan,mar-apr,12")
            .build()
            .unwrap();
        assert_eq!(
            fields(&c),
            [
                vec![0, 15, 30, 45],
                vec![0, 2, 22],
                vec![0, 1, 5, 6],
                vec![1, 11, 21, 31],
                vec![1, 3, 4, 12],
            ]
        );
        let c = Crontab::builder()
            .day_of_week("Sunday,sat")
            .build()
            .unwrap();
        assert_eq!(fields(&c)[2], vec![0, 6]);
    }

    #[test]
    fn bad_fields_name_the_field_and_the_reason() {
        let cases = [
            (
                Crontab::builder().minute("60"),
                "minute",
                "out of range 0-59",
            ),
            (Crontab::builder().hour("x"), "hour", "not a number"),
            (
                Crontab::builder().day_of_week("7"),
                "day_of_week",
                "0 is Sunday",
            ),
            (
                Crontab::builder().day_of_month("0"),
                "day_of_month",
                "out of range",
            ),
            (
                Crontab::builder().month_of_year("*/0"),
                "month_of_year",
                "step",
            ),
            (Crontab::builder().minute("5/10"), "minute", "a step needs"),
            (Crontab::builder().minute("1,,2"), "minute", "empty"),
            (
                Crontab::builder().day_of_month("30").month_of_year("feb"),
                "day_of_month",
                "no selected month",
            ),
        ];
        for (b, field, reason) in cases {
            let e = b.build().unwrap_err().to_string();
            assert!(e.contains(field) && e.contains(reason), "{e}");
        }
        assert!(
            Crontab::parse("* * *")
                .unwrap_err()
                .to_string()
                .contains("five fields")
        );
    }

    /// (crontab, zone, after, expected next) — the table the issue asks for.
    #[test]
    fn next_fire_table() {
        let cases: &[(&str, &str, &str, &str)] = &[
            (
                "* * * * *",
                "UTC",
                "2026-01-01T00:00:00Z",
                "2026-01-01T00:01:00Z",
            ),
            (
                "* * * * *",
                "UTC",
                "2026-01-01T00:00:30Z",
                "2026-01-01T00:01:00Z",
            ),
            (
                "0 0 * * *",
                "UTC",
                "2026-01-31T12:00:00Z",
                "2026-02-01T00:00:00Z",
            ),
            // Month ends: the 31st skips short months.
            (
                "0 12 31 * *",
                "UTC",
                "2026-01-31T12:00:00Z",
                "2026-03-31T12:00:00Z",
            ),
            (
                "0 0 30 * *",
                "UTC",
                "2026-01-30T00:00:00Z",
                "2026-03-30T00:00:00Z",
            ),
            (
                "0 0 31 12 *",
                "UTC",
                "2026-06-01T00:00:00Z",
                "2026-12-31T00:00:00Z",
            ),
            // Year end.
            (
                "0 0 1 1 *",
                "UTC",
                "2026-12-31T23:59:00Z",
                "2027-01-01T00:00:00Z",
            ),
            // 29 February: the next leap year.
            (
                "0 0 29 2 *",
                "UTC",
                "2024-02-29T00:00:00Z",
                "2028-02-29T00:00:00Z",
            ),
            // ... that is also a Monday (ANDed): 2044.
            (
                "0 0 29 2 mon",
                "UTC",
                "2026-01-01T00:00:00Z",
                "2044-02-29T00:00:00Z",
            ),
            // Day of week and day of month are ANDed: Friday the 13th.
            (
                "0 9 13 * fri",
                "UTC",
                "2026-01-01T00:00:00Z",
                "2026-02-13T09:00:00Z",
            ),
            (
                "0 9 13 * 5",
                "UTC",
                "2026-02-13T09:00:00Z",
                "2026-03-13T09:00:00Z",
            ),
            // 0 = Sunday; 2026-01-04 is a Sunday.
            (
                "30 6 * * 0",
                "UTC",
                "2026-01-01T00:00:00Z",
                "2026-01-04T06:30:00Z",
            ),
            // Wrapping ranges.
            (
                "0 23-1 * * *",
                "UTC",
                "2026-01-01T01:30:00Z",
                "2026-01-01T23:00:00Z",
            ),
            (
                "0 0 * * fri-mon",
                "UTC",
                "2026-01-06T00:00:00Z",
                "2026-01-09T00:00:00Z",
            ),
            // A zone: 09:00 in Paris is 08:00 UTC in winter, 07:00 in summer.
            (
                "0 9 * * *",
                "Europe/Paris",
                "2026-01-10T12:00:00Z",
                "2026-01-11T08:00:00Z",
            ),
            (
                "0 9 * * *",
                "Europe/Paris",
                "2026-07-10T12:00:00Z",
                "2026-07-11T07:00:00Z",
            ),
            // DST starts (New York, 2026-03-08 02:00 -> 03:00): 02:30 does not exist and
            // fires at the end of the gap, 03:00 EDT = 07:00 UTC.
            (
                "30 2 * * *",
                "America/New_York",
                "2026-03-07T12:00:00Z",
                "2026-03-08T07:00:00Z",
            ),
            // ... the next day it is 02:30 EDT again.
            (
                "30 2 * * *",
                "America/New_York",
                "2026-03-08T07:00:00Z",
                "2026-03-09T06:30:00Z",
            ),
            // Every 30 minutes across the gap: 01:30 EST, then the gap's 02:00 and 02:30
            // collapse into one fire at 03:00 EDT, then 03:30.
            (
                "*/30 * * * *",
                "America/New_York",
                "2026-03-08T06:30:00Z",
                "2026-03-08T07:00:00Z",
            ),
            (
                "*/30 * * * *",
                "America/New_York",
                "2026-03-08T07:00:00Z",
                "2026-03-08T07:30:00Z",
            ),
            // DST ends (2026-11-01 02:00 EDT -> 01:00 EST): 01:30 happens twice and fires
            // once, at 01:30 EDT = 05:30 UTC.
            (
                "30 1 * * *",
                "America/New_York",
                "2026-10-31T12:00:00Z",
                "2026-11-01T05:30:00Z",
            ),
            (
                "30 1 * * *",
                "America/New_York",
                "2026-11-01T05:30:00Z",
                "2026-11-02T06:30:00Z",
            ),
            // Hourly across the repeat: 01:00 EDT, then the second 01:00 is skipped: 02:00 EST.
            (
                "0 * * * *",
                "America/New_York",
                "2026-11-01T05:00:00Z",
                "2026-11-01T07:00:00Z",
            ),
            // Southern hemisphere, and a DST-free day boundary: Sydney 2026-10-04 02:00 -> 03:00.
            (
                "15 2 * * *",
                "Australia/Sydney",
                "2026-10-03T12:00:00Z",
                "2026-10-03T16:00:00Z",
            ),
        ];
        for (cron, zone, after, want) in cases {
            let c = Crontab::parse(cron).unwrap();
            let z = Zone::named(zone).unwrap();
            let got = c.next_after(t(after), &z);
            assert_eq!(
                got,
                Some(t(want)),
                "{cron} in {zone} after {after}: got {got:?}, want {want}"
            );
        }
    }
}
