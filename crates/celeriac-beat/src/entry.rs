//! Entries: what to send (task, arguments, options) and when (a [`Schedule`]).

use std::time::Duration;

use celeriac_core::canvas::{Expires, SendOptions};
use celeriac_core::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::schedule::{Crontab, Schedule, at, every};

/// One periodic task: a name, the task to send, its arguments and send options, and its
/// schedule.
///
/// ```
/// use std::time::Duration;
/// use celeriac_beat::{Entry, every};
///
/// let e = Entry::new("cleanup", "tasks.cleanup", every(Duration::from_secs(300)))
///     .args(vec![serde_json::json!("tmp")])
///     .queue("maintenance")
///     .expires(Duration::from_secs(60));
/// assert_eq!(e.name(), "cleanup");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub(crate) name: String,
    pub(crate) task: String,
    pub(crate) schedule: Schedule,
    pub(crate) args: Vec<Value>,
    pub(crate) kwargs: Map<String, Value>,
    /// The app's send options (`celeriac_core::canvas::SendOptions`); a relative `expires`
    /// counts from the tick.
    pub(crate) options: SendOptions,
}

impl Entry {
    /// An entry sending task `task` on `schedule`, with no arguments.
    pub fn new(name: impl Into<String>, task: impl Into<String>, schedule: Schedule) -> Self {
        Entry {
            name: name.into(),
            task: task.into(),
            schedule,
            args: Vec::new(),
            kwargs: Map::new(),
            options: SendOptions::default(),
        }
    }

    /// Positional arguments, already encoded.
    #[must_use]
    pub fn args(mut self, args: Vec<Value>) -> Self {
        self.args = args;
        self
    }

    /// Keyword arguments, already encoded.
    #[must_use]
    pub fn kwargs(mut self, kwargs: Map<String, Value>) -> Self {
        self.kwargs = kwargs;
        self
    }

    /// Sends to `queue`.
    #[must_use]
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.options.queue = Some(queue.into());
        self
    }

    /// Priority 0 to 9; values above 9 count as 9.
    #[must_use]
    pub fn priority(mut self, priority: u8) -> Self {
        self.options.priority = Some(priority.min(9));
        self
    }

    /// Each sent task expires this long after its tick.
    #[must_use]
    pub fn expires(mut self, after: Duration) -> Self {
        self.options.expires = Some(Expires::In(after));
        self
    }

    /// The entry's name, unique in a beat.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The task name sent.
    pub fn task(&self) -> &str {
        &self.task
    }

    /// The schedule.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// Positional arguments.
    pub fn get_args(&self) -> &[Value] {
        &self.args
    }

    /// Keyword arguments.
    pub fn get_kwargs(&self) -> &Map<String, Value> {
        &self.kwargs
    }

    /// Send options (the app's [`SendOptions`]; a relative `expires` counts from the tick).
    pub fn options(&self) -> &SendOptions {
        &self.options
    }

    /// Checks the entry; the error names the entry, the field and the reason.
    pub fn validate(&self) -> Result<()> {
        let wrap = |e: Error| Error::config(format!("beat entry {:?}: {e}", self.name));
        if self.name.trim().is_empty() {
            return Err(Error::config("beat entry with an empty name"));
        }
        if self.task.trim().is_empty() {
            return Err(wrap(Error::config("task must not be empty")));
        }
        self.schedule.validate().map_err(wrap)
    }

    /// Builds an entry from its declarative form (a `[beat.schedule.NAME]` table, or what
    /// `beat add` stores).
    pub fn from_spec(name: &str, spec: &EntrySpec) -> Result<Entry> {
        let wrap = |e: Error| Error::config(format!("beat entry {name:?}: {e}"));
        let time = |field: &str, s: &str| {
            celeriac_core::time::parse(s).map_err(|_| {
                wrap(Error::config(format!(
                    "invalid {field} {s:?}: not an ISO-8601 time"
                )))
            })
        };
        let chosen = [
            spec.every.is_some(),
            spec.crontab.is_some(),
            spec.at.is_some(),
        ];
        let mut schedule = match (&spec.every, &spec.crontab, &spec.at) {
            _ if chosen.iter().filter(|c| **c).count() != 1 => {
                return Err(wrap(Error::config(
                    "give exactly one of `every` (seconds), `crontab` or `at`",
                )));
            }
            (Some(secs), _, _) => {
                let d = Duration::try_from_secs_f64(*secs).map_err(|_| {
                    wrap(Error::config(format!(
                        "invalid interval {secs}: must be a positive number of seconds"
                    )))
                })?;
                every(d).relative(spec.relative.unwrap_or(false))
            }
            (_, Some(cron), _) => Schedule::from(cron.to_crontab().map_err(wrap)?),
            (_, _, Some(t)) => at(time("at", t)?),
            _ => unreachable_schedule()?,
        };
        if spec.relative.is_some() && spec.every.is_none() {
            return Err(wrap(Error::config("`relative` applies to `every` only")));
        }
        if let Some(z) = &spec.timezone {
            schedule = schedule.timezone(z).map_err(wrap)?;
        }
        if let Some(s) = &spec.start {
            schedule = schedule.start(time("start", s)?);
        }
        if let Some(e) = &spec.end {
            schedule = schedule.end(time("end", e)?);
        }
        let mut entry = Entry::new(name, spec.task.clone(), schedule)
            .args(spec.args.clone())
            .kwargs(spec.kwargs.clone());
        entry.options.queue = spec.queue.clone();
        if let Some(p) = spec.priority {
            if p > 9 {
                return Err(wrap(Error::config(format!(
                    "invalid priority {p}: must be 0 to 9"
                ))));
            }
            entry.options.priority = Some(p);
        }
        if let Some(x) = spec.expires {
            let after = Duration::try_from_secs_f64(x).map_err(|_| {
                wrap(Error::config(format!(
                    "invalid expires {x}: must be a non-negative number of seconds"
                )))
            })?;
            entry.options.expires = Some(Expires::In(after));
        }
        entry.validate()?;
        Ok(entry)
    }
}

fn unreachable_schedule() -> Result<Schedule> {
    Err(Error::config("no schedule"))
}

/// The declarative form of an entry: a `[beat.schedule.NAME]` table in `celeriac.toml`, or the
/// JSON that `beat add` stores. Exactly one of `every`, `crontab` and `at` is set.
///
/// ```toml
/// [beat.schedule.report]
/// task = "tasks.report"
/// crontab = "0 7 * * mon-fri"       # minute hour day_of_month month_of_year day_of_week
/// timezone = "Europe/Paris"
/// kwargs = { kind = "daily" }
/// queue = "reports"
/// expires = 3600
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct EntrySpec {
    /// The task name.
    pub task: String,
    /// Interval in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<f64>,
    /// Celery's `relative` for intervals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relative: Option<bool>,
    /// A crontab: the classic five-field text, or a table of Celery's field names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crontab: Option<CrontabSpec>,
    /// A one-off time (ISO-8601).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// IANA zone for this entry (default: the beat's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// No tick before this time (ISO-8601).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    /// No tick after this time (ISO-8601).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
    /// Positional arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<Value>,
    /// Keyword arguments.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub kwargs: Map<String, Value>,
    /// Queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Priority 0-9.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// Seconds after the tick at which the task expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<f64>,
}

impl EntrySpec {
    /// A spec sending `task`; set one schedule field before use.
    pub fn new(task: impl Into<String>) -> Self {
        EntrySpec {
            task: task.into(),
            ..EntrySpec::default()
        }
    }
}

/// A crontab in a spec: `"*/5 * * * *"` or `{ minute = "*/5", hour = 9, day_of_week = [1, 3] }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CrontabSpec {
    /// Classic text: minute hour day_of_month month_of_year day_of_week.
    Text(String),
    /// Celery's named fields; missing ones are `*`.
    Fields(CrontabFields),
}

/// Celery's crontab arguments by name; each is a text, a number or a list of numbers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
#[allow(missing_docs)]
pub struct CrontabFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minute: Option<FieldSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hour: Option<FieldSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day_of_week: Option<FieldSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day_of_month: Option<FieldSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub month_of_year: Option<FieldSpec>,
}

/// One crontab field: `"1-5"`, `3` or `[1, 3, 5]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
#[allow(missing_docs)]
pub enum FieldSpec {
    Text(String),
    Number(u32),
    List(Vec<u32>),
}

impl FieldSpec {
    fn text(f: Option<&FieldSpec>) -> String {
        match f {
            None => "*".to_owned(),
            Some(FieldSpec::Text(s)) => s.clone(),
            Some(FieldSpec::Number(n)) => n.to_string(),
            Some(FieldSpec::List(l)) => l.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
        }
    }
}

impl CrontabSpec {
    /// The checked crontab.
    pub fn to_crontab(&self) -> Result<Crontab> {
        match self {
            CrontabSpec::Text(t) => Crontab::parse(t),
            CrontabSpec::Fields(f) => Crontab::builder()
                .minute(FieldSpec::text(f.minute.as_ref()))
                .hour(FieldSpec::text(f.hour.as_ref()))
                .day_of_week(FieldSpec::text(f.day_of_week.as_ref()))
                .day_of_month(FieldSpec::text(f.day_of_month.as_ref()))
                .month_of_year(FieldSpec::text(f.month_of_year.as_ref()))
                .build(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml_text: &str) -> EntrySpec {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn specs_become_entries() {
        let e = Entry::from_spec(
            "r",
            &spec(
                r#"
                task = "tasks.report"
                crontab = { minute = 0, hour = "7", day_of_week = [1, 2, 3, 4, 5] }
                timezone = "Europe/Paris"
                args = [1, "a"]
                kwargs = { kind = "daily" }
                queue = "reports"
                priority = 3
                expires = 3600
                "#,
            ),
        )
        .unwrap();
        assert_eq!(e.task(), "tasks.report");
        assert_eq!(
            e.schedule().to_string(),
            "crontab 0 7 * * 1,2,3,4,5 [Europe/Paris]"
        );
        assert_eq!(
            e.options().expires,
            Some(Expires::In(Duration::from_secs(3600)))
        );
        assert_eq!(e.get_args().len(), 2);
        let e = Entry::from_spec("i", &spec("task = \"t\"\nevery = 2.5\nrelative = true")).unwrap();
        assert_eq!(e.schedule().to_string(), "every 2.5s (relative)");
    }

    #[test]
    fn bad_specs_name_the_entry_and_the_field() {
        let cases = [
            ("task = \"t\"", "exactly one of"),
            (
                "task = \"t\"\nevery = 1\nat = \"2026-01-01T00:00:00Z\"",
                "exactly one of",
            ),
            ("task = \"t\"\nevery = -1", "invalid interval"),
            ("task = \"t\"\nevery = 0", "invalid interval 0s"),
            ("task = \"t\"\ncrontab = \"61 * * * *\"", "minute"),
            (
                "task = \"t\"\ncrontab = { day_of_week = \"8\" }",
                "day_of_week",
            ),
            (
                "task = \"t\"\nevery = 1\ntimezone = \"Nowhere/Land\"",
                "unknown time zone",
            ),
            ("task = \"t\"\nat = \"soon\"", "invalid at"),
            ("task = \"t\"\nevery = 1\npriority = 12", "invalid priority"),
            ("task = \"\"\nevery = 1", "task must not be empty"),
        ];
        for (text, want) in cases {
            let e = Entry::from_spec("x", &spec(text)).unwrap_err().to_string();
            assert!(
                e.contains("beat entry \"x\"") && e.contains(want),
                "{text}: {e}"
            );
        }
        assert!(toml::from_str::<EntrySpec>("task = \"t\"\nevry = 1").is_err());
    }
}
