//! [`Control`]: list, add, remove, pause, resume and trigger entries at run time.

use chrono::{DateTime, Utc};

use celeriac_core::beat::{DynBeatStore, Row};
use celeriac_core::{Error, Result};

use crate::entry::{Entry, EntrySpec};
use crate::schedule::Zone;

/// Changes entries through the store; the running leader picks them up on its next pass
/// (within one poll interval).
///
/// ```
/// # async fn demo() -> celeriac_core::Result<()> {
/// use celeriac_beat::{Control, EntrySpec, MemoryStore};
/// let control = Control::new(std::sync::Arc::new(MemoryStore::new()), Vec::new());
/// let mut spec = EntrySpec::new("tasks.ping");
/// spec.every = Some(30.0);
/// control.add("ping", &spec).await?;
/// control.pause("ping").await?;
/// control.trigger("ping").await?;
/// assert_eq!(control.list().await?.len(), 1);
/// # Ok(()) }
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(demo()).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct Control {
    store: DynBeatStore,
    declared: Vec<Entry>,
}

/// One entry as [`Control::list`] shows it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EntryInfo {
    /// The name.
    pub name: String,
    /// The task sent.
    pub task: String,
    /// The schedule, as text.
    pub schedule: String,
    /// Declared in code or config (`false`: added at run time).
    pub declared: bool,
    /// Paused.
    pub paused: bool,
    /// The last tick handled.
    pub last_run_at: Option<DateTime<Utc>>,
    /// Tasks sent so far.
    pub total_run_count: u64,
    /// The next tick, as far as the store's state tells.
    pub next_run_at: Option<DateTime<Utc>>,
    /// Why a run-time entry is ignored, if it is.
    pub invalid: Option<String>,
}

impl Control {
    /// A control over `store`, knowing the `declared` entries (code and config).
    pub fn new(store: DynBeatStore, declared: Vec<Entry>) -> Control {
        Control { store, declared }
    }

    fn is_declared(&self, name: &str) -> bool {
        self.declared.iter().any(|e| e.name == name)
    }

    async fn exists(&self, name: &str) -> Result<()> {
        if self.is_declared(name) {
            return Ok(());
        }
        let (_, specs) = crate::store::load(&*self.store).await?;
        if specs.contains_key(name) {
            Ok(())
        } else {
            Err(Error::config(format!("no beat entry named {name:?}")))
        }
    }

    /// Every entry, declared ones first, with its state.
    pub async fn list(&self) -> Result<Vec<EntryInfo>> {
        let (rows, specs) = crate::store::load(&*self.store).await?;
        let zone = Zone::Utc;
        let info = |e: &Entry, row: Option<&Row>, declared: bool| {
            let state = row.and_then(|r| r.state.as_ref());
            EntryInfo {
                name: e.name.clone(),
                task: e.task.clone(),
                schedule: e.schedule.to_string(),
                declared,
                paused: row.is_some_and(|r| r.paused),
                last_run_at: state.and_then(|s| s.last_run_at),
                total_run_count: state.map_or(0, |s| s.total_run_count),
                next_run_at: state
                    .and_then(|s| e.schedule.next_tick(s.last_run_at, s.since, &zone)),
                invalid: None,
            }
        };
        let mut out: Vec<EntryInfo> = self
            .declared
            .iter()
            .map(|e| info(e, rows.get(&e.name), true))
            .collect();
        for (name, spec) in &specs {
            if self.is_declared(name) {
                continue;
            }
            let row = rows.get(name);
            match Entry::from_spec(name, spec) {
                Ok(e) => out.push(info(&e, row, false)),
                Err(err) => out.push(EntryInfo {
                    name: name.clone(),
                    task: spec.task.clone(),
                    schedule: String::new(),
                    declared: false,
                    paused: row.is_some_and(|r| r.paused),
                    last_run_at: None,
                    total_run_count: 0,
                    next_run_at: None,
                    invalid: Some(err.to_string()),
                }),
            }
        }
        Ok(out)
    }

    /// Adds (or replaces) a run-time entry; it is checked first. Entries declared in code or
    /// config cannot be replaced.
    pub async fn add(&self, name: &str, spec: &EntrySpec) -> Result<()> {
        if self.is_declared(name) {
            return Err(Error::config(format!(
                "beat entry {name:?} is declared in code or config; change it there"
            )));
        }
        Entry::from_spec(name, spec)?;
        self.store
            .put_entry(name, &crate::store::to_json(spec)?)
            .await
    }

    /// Removes a run-time entry.
    pub async fn remove(&self, name: &str) -> Result<()> {
        if self.is_declared(name) {
            return Err(Error::config(format!(
                "beat entry {name:?} is declared in code or config; pause it instead"
            )));
        }
        if self.store.remove_entry(name).await? {
            Ok(())
        } else {
            Err(Error::config(format!("no beat entry named {name:?}")))
        }
    }

    /// Pauses an entry: its ticks pass without sending until it is resumed.
    pub async fn pause(&self, name: &str) -> Result<()> {
        self.exists(name).await?;
        self.store.set_paused(name, true).await
    }

    /// Resumes a paused entry (ticks missed meanwhile are not sent).
    pub async fn resume(&self, name: &str) -> Result<()> {
        self.exists(name).await?;
        self.store.set_paused(name, false).await
    }

    /// Sends an entry once now, whatever its schedule (even when paused).
    pub async fn trigger(&self, name: &str) -> Result<()> {
        self.exists(name).await?;
        self.store.trigger(name).await
    }
}
