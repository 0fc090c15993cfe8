//! The `[beat]` table of `celeriac.toml`.

use std::collections::BTreeMap;
use std::time::Duration;

use celeriac_core::{Error, Result};
use serde::Deserialize;

use crate::entry::{Entry, EntrySpec};
use crate::runner::BeatOptions;
use crate::schedule::Zone;

/// Beat settings and entries from `celeriac.toml`:
///
/// ```toml
/// [beat]
/// timezone = "Europe/Paris"     # crontab zone of entries naming none; default UTC
/// missed = "catch_up"           # or "skip": what to do with ticks missed while down
/// grace = 30                    # seconds a tick may be late and still count as on time
/// lease = 15                    # seconds; a new leader takes over this long after a crash
/// poll_interval = 1             # seconds between looks for run-time changes
/// store = "sqlite://beat.db"    # default: the broker URL
///
/// [beat.schedule.cleanup]
/// task = "tasks.cleanup"
/// every = 300
///
/// [beat.schedule.report]
/// task = "tasks.report"
/// crontab = "0 7 * * mon-fri"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BeatConfig {
    /// Zone name.
    pub timezone: Option<String>,
    /// `catch_up` or `skip`.
    pub missed: Option<String>,
    /// Seconds.
    pub grace: Option<f64>,
    /// Seconds.
    pub lease: Option<f64>,
    /// Seconds.
    pub poll_interval: Option<f64>,
    /// Store URL.
    pub store: Option<String>,
    /// Entries by name.
    pub schedule: BTreeMap<String, EntrySpec>,
}

fn secs(field: &str, v: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero() || field == "grace")
        .ok_or_else(|| {
            Error::config(format!(
                "invalid beat.{field} {v}: must be a positive number of seconds"
            ))
        })
}

impl BeatConfig {
    /// Reads the `[beat]` table of a whole `celeriac.toml` text (other tables are ignored);
    /// an absent table is the default.
    pub fn from_toml_str(text: &str) -> Result<BeatConfig> {
        let doc: toml::Table = toml::from_str(text)
            .map_err(|e| Error::config("invalid celeriac.toml").with_source(e))?;
        match doc.get("beat") {
            None => Ok(BeatConfig::default()),
            Some(v) => BeatConfig::from_value(v.clone()),
        }
    }

    /// Reads a `[beat]` table already parsed.
    pub fn from_value(value: toml::Value) -> Result<BeatConfig> {
        value
            .try_into()
            .map_err(|e| Error::config("invalid [beat] table").with_source(e))
    }

    /// Reads the `[beat]` table of a loaded [`celeriac_core::Config`] (its `beat` field).
    pub fn from_table(table: &toml::Table) -> Result<BeatConfig> {
        Self::from_value(toml::Value::Table(table.clone()))
    }

    /// The entries, each checked; the error names the entry, the field and the reason.
    pub fn entries(&self) -> Result<Vec<Entry>> {
        self.schedule
            .iter()
            .map(|(name, spec)| Entry::from_spec(name, spec))
            .collect()
    }

    /// `options` with this table's settings applied.
    pub fn apply(&self, mut options: BeatOptions) -> Result<BeatOptions> {
        if let Some(z) = &self.timezone {
            options.zone =
                Zone::named(z).map_err(|e| Error::config(format!("invalid beat.timezone: {e}")))?;
        }
        if let Some(m) = &self.missed {
            options.missed = m.parse()?;
        }
        if let Some(g) = self.grace {
            options.grace = Some(secs("grace", g)?);
        }
        if let Some(l) = self.lease {
            options.lease = secs("lease", l)?;
        }
        if let Some(p) = self.poll_interval {
            options.poll_interval = secs("poll_interval", p)?;
        }
        Ok(options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::MissedTicks;

    #[test]
    fn reads_the_beat_table_only() {
        let text = r#"
            broker_url = "sqlite://x.db"
            [worker]
            concurrency = 2
            [beat]
            timezone = "America/New_York"
            missed = "skip"
            lease = 5
            [beat.schedule.ping]
            task = "tasks.ping"
            every = 10
            [beat.schedule.report]
            task = "tasks.report"
            crontab = "0 7 * * mon-fri"
        "#;
        let c = BeatConfig::from_toml_str(text).unwrap();
        let entries = c.entries().unwrap();
        assert_eq!(entries.len(), 2);
        let o = c.apply(BeatOptions::default()).unwrap();
        assert_eq!(o.missed, MissedTicks::Skip);
        assert_eq!(o.lease, Duration::from_secs(5));
        assert_eq!(o.zone.name(), "America/New_York");
        assert_eq!(
            BeatConfig::from_toml_str("").unwrap(),
            BeatConfig::default()
        );
    }

    #[test]
    fn bad_tables_say_what_is_wrong() {
        let e = BeatConfig::from_toml_str("[beat]\nleese = 3").unwrap_err();
        let src = std::error::Error::source(&e).unwrap().to_string();
        assert!(src.contains("leese"), "{src}");
        let c =
            BeatConfig::from_toml_str("[beat.schedule.x]\ntask = \"t\"\ncrontab = \"* 25 * * *\"")
                .unwrap();
        let e = c.entries().unwrap_err().to_string();
        assert!(
            e.contains("\"x\"") && e.contains("hour") && e.contains("out of range"),
            "{e}"
        );
        let c = BeatConfig::from_toml_str("[beat]\nmissed = \"sometimes\"").unwrap();
        assert!(c.apply(BeatOptions::default()).is_err());
        let table: toml::Table = toml::from_str("timezone = \"Mars/Olympus\"").unwrap();
        let c = BeatConfig::from_table(&table).unwrap();
        let e = c.apply(BeatOptions::default()).unwrap_err().to_string();
        assert!(e.contains("beat.timezone"), "{e}");
        let table: toml::Table = toml::from_str("leese = 3").unwrap();
        assert!(BeatConfig::from_table(&table).is_err());
        let c = BeatConfig::from_toml_str("[beat]\nlease = 0").unwrap();
        assert!(
            c.apply(BeatOptions::default())
                .unwrap_err()
                .to_string()
                .contains("beat.lease")
        );
    }
}
