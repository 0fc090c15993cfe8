//! The beat store contract: where the beat instances of an application meet — the leader lease,
//! the state of every periodic entry, and the entries and controls changed at run time.
//!
//! This module is for driver authors: a driver crate implements [`BeatStore`] next to its
//! broker (celeriac-sqlite keeps it in the broker's file, celeriac-redis in the broker's Redis)
//! and registers it in [`Drivers`](crate::Drivers) with
//! [`Drivers::add_beat_store`](crate::Drivers::add_beat_store), so that `celeriac-beat`, which
//! runs the schedules, knows no driver. Users reach the stores through `celeriac::beat` and a
//! URL; [`MemoryBeatStore`](crate::memory::MemoryBeatStore) serves tests and single-process use.
//!
//! A [`BeatStore`] is shared by every beat instance of an application. It holds
//!
//! - one **lease**: a holder, an expiry, and a **fencing token** that grows each time the lease
//!   changes hands (or lapses and is taken again);
//! - per entry, the **state** the leader writes ([`EntryState`]: last tick, run count, the fire
//!   in flight) and the **controls** the command line writes (paused, manual trigger count, and
//!   for entries added at run time their definition, as JSON).
//!
//! # A key design decision: a lease with a fencing token, checked in the write's transaction
//!
//! Every beat instance runs the loop and competes for the one lease; the holder fires. The
//! leader's writes are guarded by its lease: [`BeatStore::save`] succeeds only while the stored
//! token and holder are the leader's and the lease has not expired, checked in the same
//! transaction (or atomic script) as the write. A leader that was paused (a long GC, a suspended
//! VM) and lost its lease therefore cannot record a fire, and since beat records a fire *before*
//! sending it, it cannot send one either. Every store follows the same rule, written once here:
//! [`next_lease`] for taking and renewing, [`lease_holds`] for the write check.
//!
//! Times are passed in by the caller (its clock), so tests can run on virtual time and every
//! instance judges expiry by the same rule.
//!
//! The definition of an entry added at run time is opaque to a store: a JSON document
//! ([`Row::spec`]) that celeriac-beat writes and reads back unchanged. Parsing it into a
//! schedule is beat's job, so this crate needs no schedule code.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::broker::BoxFuture;
use crate::error::Result;

/// A beat store chosen at run time.
pub type DynBeatStore = Arc<dyn BeatStore>;

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
    ///
    /// ```
    /// use celeriac_core::beat::Lease;
    ///
    /// let lease = Lease::new("beat-1@host", 3, chrono::Utc::now());
    /// assert_eq!(lease.token, 3);
    /// ```
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
    ///
    /// ```
    /// let state = celeriac_core::beat::EntryState::new(chrono::Utc::now());
    /// assert_eq!(state.total_run_count, 0);
    /// ```
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

impl Pending {
    /// The fire of `task_id` for `tick`, recorded under fencing token `token`.
    ///
    /// ```
    /// let p = celeriac_core::beat::Pending::new("id-1", chrono::Utc::now(), 2);
    /// assert_eq!(p.token, 2);
    /// ```
    pub fn new(task_id: impl Into<String>, tick: DateTime<Utc>, token: u64) -> Self {
        Pending {
            task_id: task_id.into(),
            tick,
            token,
        }
    }
}

/// Everything a store holds about one entry name.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Row {
    /// For entries added at run time: their definition, the JSON document celeriac-beat wrote
    /// with [`BeatStore::put_entry`], returned unchanged.
    pub spec: Option<Value>,
    /// Paused entries fire no tick (ticks passing meanwhile are skipped).
    pub paused: bool,
    /// Manual triggers requested so far.
    pub triggers: u64,
    /// The leader's record.
    pub state: Option<EntryState>,
}

/// The store shared by beat instances. See the [module docs](self).
///
/// Implementations live in the driver crates; the contract is checked by the beat store
/// conformance suite of `celeriac-test`, run against every store.
pub trait BeatStore: Send + Sync + fmt::Debug + 'static {
    /// Takes the lease for `holder` if it is free or lapsed (a new term: a larger token), or
    /// renews it if `holder` holds it; `None` when another instance holds it. See
    /// [`next_lease`].
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

    /// Writes the state of `name` if `lease` is still current and unexpired at `now` (see
    /// [`lease_holds`]), in the same transaction as the check; returns whether it was written.
    fn save<'a>(
        &'a self,
        lease: &'a Lease,
        now: DateTime<Utc>,
        name: &'a str,
        state: &'a EntryState,
    ) -> BoxFuture<'a, Result<bool>>;

    /// Adds or replaces a run-time entry, `spec` being its definition (its state starts
    /// afresh; its controls stay).
    fn put_entry<'a>(&'a self, name: &'a str, spec: &'a Value) -> BoxFuture<'a, Result<()>>;

    /// Removes a run-time entry (one with a spec) and everything about it; returns whether it
    /// existed.
    fn remove_entry<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool>>;

    /// Pauses or resumes `name`.
    fn set_paused<'a>(&'a self, name: &'a str, paused: bool) -> BoxFuture<'a, Result<()>>;

    /// Asks the leader to send `name` once now, whatever its schedule.
    fn trigger<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>>;
}

/// The lease rule every store follows: what [`BeatStore::acquire`] by `holder` at `now` makes
/// of the stored lease `current`.
///
/// A free store starts term 1; the holder of a current lease renews it (same token, expiry
/// `now + ttl`); a lapsed lease (expiry at or before `now`) goes to whoever asks, with the next
/// token; a current lease of another holder yields `None`.
///
/// ```
/// use std::time::Duration;
/// use celeriac_core::beat::next_lease;
///
/// let now = chrono::Utc::now();
/// let ttl = Duration::from_secs(10);
/// let a = next_lease(None, "a", now, ttl).unwrap();
/// assert_eq!(a.token, 1);
/// assert!(next_lease(Some(&a), "b", now, ttl).is_none());
/// let later = now + chrono::Duration::seconds(11);
/// assert_eq!(next_lease(Some(&a), "b", later, ttl).unwrap().token, 2);
/// ```
pub fn next_lease(
    current: Option<&Lease>,
    holder: &str,
    now: DateTime<Utc>,
    ttl: Duration,
) -> Option<Lease> {
    let expires_at = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
    match current {
        None => Some(Lease::new(holder, 1, expires_at)),
        Some(l) if l.expires_at > now && l.holder == holder => {
            Some(Lease::new(holder, l.token, expires_at))
        }
        Some(l) if l.expires_at <= now => Some(Lease::new(holder, l.token + 1, expires_at)),
        Some(_) => None,
    }
}

/// Whether `lease` may still write at `now`, given the stored lease `current`: same token and
/// holder, not expired. The check [`BeatStore::save`] makes.
///
/// ```
/// use std::time::Duration;
/// use celeriac_core::beat::{lease_holds, next_lease};
///
/// let now = chrono::Utc::now();
/// let a = next_lease(None, "a", now, Duration::from_secs(10)).unwrap();
/// assert!(lease_holds(Some(&a), &a, now));
/// assert!(!lease_holds(Some(&a), &a, now + chrono::Duration::seconds(10)));
/// ```
pub fn lease_holds(current: Option<&Lease>, lease: &Lease, now: DateTime<Utc>) -> bool {
    current
        .is_some_and(|c| c.token == lease.token && c.holder == lease.holder && c.expires_at > now)
}
