//! Where beat instances meet: the leader lease, the state of every entry, and the entries and
//! controls changed at run time.
//!
//! A [`BeatStore`] is shared by every beat instance of an application. It holds
//!
//! - one **lease**: a holder, an expiry, and a **fencing token** that grows each time the lease
//!   changes hands (or lapses and is taken again);
//! - per entry, the **state** the leader writes ([`EntryState`]: last tick, run count,
//!   the fire in flight) and the **controls** the command line writes (paused, manual trigger
//!   count, and for entries added at run time their [`EntrySpec`]).
//!
//! The leader's writes are guarded by its lease: [`BeatStore::save`] succeeds only while the
//! stored token is the leader's and the lease has not expired, in the same transaction as the
//! write. A leader that was paused (a long GC, a suspended VM) and lost its lease therefore
//! cannot record a fire, and since it records a fire *before* sending it, it cannot send one
//! either.

mod memory;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use celeriac_core::{BoxFuture, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::entry::EntrySpec;

pub use memory::MemoryStore;
#[cfg(feature = "redis")]
pub use redis::RedisStore;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;

/// A beat store chosen at run time.
pub type DynStore = Arc<dyn BeatStore>;

/// The leader lease as one instance holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lease {
    /// The instance holding it.
    pub holder: String,
    /// The fencing token: larger for every new term.
    pub token: u64,
    /// When it lapses unless renewed.
    pub expires_at: DateTime<Utc>,
}

impl Lease {
    /// A lease (for store implementations).
    pub fn new(holder: impl Into<String>, token: u64, expires_at: DateTime<Utc>) -> Self {
        Lease {
            holder: holder.into(),
            token,
            expires_at,
        }
    }
}

/// What the leader records about an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct EntryState {
    /// The last tick handled (fired, or skipped by the policy or a pause).
    pub last_run_at: Option<DateTime<Utc>>,
    /// When a leader first saw the entry: an interval's first tick counts from here.
    pub since: DateTime<Utc>,
    /// Tasks sent for this entry.
    pub total_run_count: u64,
    /// Manual triggers handled (compared with [`Row::triggers`]).
    pub triggers_done: u64,
    /// A fire recorded but not yet confirmed as sent.
    pub pending: Option<Pending>,
}

impl EntryState {
    /// The state of an entry first seen at `since`.
    pub fn new(since: DateTime<Utc>) -> Self {
        EntryState {
            last_run_at: None,
            since,
            total_run_count: 0,
            triggers_done: 0,
            pending: None,
        }
    }
}

/// A fire recorded by a leader before sending.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Pending {
    /// The task id sent.
    pub task_id: String,
    /// The tick it stands for.
    pub tick: DateTime<Utc>,
    /// The fencing token of the leader that recorded it.
    pub token: u64,
}

/// Everything a store holds about one entry name.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Row {
    /// For entries added at run time: their definition.
    pub spec: Option<EntrySpec>,
    /// Paused entries fire no tick (ticks passing meanwhile are skipped).
    pub paused: bool,
    /// Manual triggers requested so far.
    pub triggers: u64,
    /// The leader's record.
    pub state: Option<EntryState>,
}

/// The store shared by beat instances. See the [module docs](self).
///
/// Times are passed in by the caller (its clock), so tests can run on virtual time and every
/// instance judges expiry by the same rule.
pub trait BeatStore: Send + Sync + fmt::Debug + 'static {
    /// Takes the lease for `holder` if it is free or lapsed (a new term: a larger token), or
    /// renews it if `holder` holds it; `None` when another instance holds it.
    fn acquire<'a>(
        &'a self,
        holder: &'a str,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Lease>>>;

    /// Gives the lease up now (a clean shutdown), if `lease` is still the current one.
    fn release<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<()>>;

    /// Every row, by entry name.
    fn load(&self) -> BoxFuture<'_, Result<BTreeMap<String, Row>>>;

    /// Writes the state of `name` if `lease` is still current and unexpired at `now`; returns
    /// whether it was written.
    fn save<'a>(
        &'a self,
        lease: &'a Lease,
        now: DateTime<Utc>,
        name: &'a str,
        state: &'a EntryState,
    ) -> BoxFuture<'a, Result<bool>>;

    /// Adds or replaces a run-time entry (its state starts afresh).
    fn put_entry<'a>(&'a self, name: &'a str, spec: &'a EntrySpec) -> BoxFuture<'a, Result<()>>;

    /// Removes a run-time entry and its state; returns whether it existed.
    fn remove_entry<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool>>;

    /// Pauses or resumes `name`.
    fn set_paused<'a>(&'a self, name: &'a str, paused: bool) -> BoxFuture<'a, Result<()>>;

    /// Asks the leader to send `name` once now, whatever its schedule.
    fn trigger<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>>;
}

/// The URL schemes of Redis (the broker's forms: TCP, unix socket, TLS refused clearly).
#[cfg(feature = "redis")]
const REDIS_SCHEMES: [&str; 5] = ["redis", "rediss", "unix", "redis+socket", "socket"];

/// Opens the store a URL names: `sqlite://path` (the broker's file; tables
/// `celeriac_beat_*`), `redis://…` (the broker's Redis; keys `celeriac.beat.*` under the URL's
/// `global_keyprefix`) or `memory://` (one process only).
pub async fn open_store(url: &str) -> Result<DynStore> {
    if url.starts_with("memory://") {
        return Ok(Arc::new(MemoryStore::new()));
    }
    #[cfg(feature = "sqlite")]
    if url.starts_with("sqlite://") {
        return Ok(Arc::new(SqliteStore::open_url(url).await?));
    }
    let scheme = url.split("://").next().unwrap_or(url);
    #[cfg(feature = "redis")]
    if url.contains("://") && REDIS_SCHEMES.contains(&scheme) {
        return Ok(Arc::new(RedisStore::open(url).await?));
    }
    let mut known = vec!["memory"];
    if cfg!(feature = "sqlite") {
        known.push("sqlite");
    }
    if cfg!(feature = "redis") {
        known.push("redis");
    }
    Err(celeriac_core::Error::config(format!(
        "no beat store for {scheme}:// (known: {}); set `store` in [beat], e.g. \
         store = \"sqlite://beat.db\"",
        known.join(", ")
    )))
}
