//! [`Beat`]: the loop every instance runs; the lease holder fires due entries.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use celeriac_core::{BoxFuture, Error, Result};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use celeriac_core::beat::{BeatStore, DynBeatStore, EntryState, Lease, Pending};

use crate::entry::{Entry, EntrySpec};
use crate::schedule::Zone;
use celeriac_core::canvas::{Expires, SendOptions};

/// What to do with ticks that passed while no beat was running (or the leader was gone).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum MissedTicks {
    /// Send once for all the missed ticks of an entry, then go on with the schedule.
    #[default]
    CatchUpOnce,
    /// Send nothing for ticks older than the grace period; go on with the next tick.
    Skip,
}

impl std::str::FromStr for MissedTicks {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "catch_up" | "catch-up" | "catch_up_once" => Ok(MissedTicks::CatchUpOnce),
            "skip" => Ok(MissedTicks::Skip),
            other => Err(Error::config(format!(
                "unknown missed-tick policy {other:?} (known: catch_up, skip)"
            ))),
        }
    }
}

/// Where "now" comes from.
#[derive(Clone, Default)]
pub struct Clock(ClockKind);

#[derive(Clone, Default)]
enum ClockKind {
    #[default]
    System,
    Tokio {
        base: DateTime<Utc>,
        at: tokio::time::Instant,
    },
}

impl Clock {
    /// The system's wall clock (the default).
    pub fn system() -> Clock {
        Clock(ClockKind::System)
    }

    /// Wall time that follows tokio's clock from now on, so a test with paused time
    /// (`tokio::time::pause`, `start_paused`) moves the beat's time too.
    pub fn tokio() -> Clock {
        Clock(ClockKind::Tokio {
            base: Utc::now(),
            at: tokio::time::Instant::now(),
        })
    }

    /// Tokio's clock, with `base` as the wall time now.
    pub fn tokio_at(base: DateTime<Utc>) -> Clock {
        Clock(ClockKind::Tokio {
            base,
            at: tokio::time::Instant::now(),
        })
    }

    /// The current time.
    pub fn now(&self) -> DateTime<Utc> {
        match &self.0 {
            ClockKind::System => Utc::now(),
            ClockKind::Tokio { base, at } => {
                *base + chrono::Duration::from_std(at.elapsed()).unwrap_or_default()
            }
        }
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            ClockKind::System => "Clock::system",
            ClockKind::Tokio { .. } => "Clock::tokio",
        })
    }
}

/// Settings of a beat instance.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BeatOptions {
    /// This instance's name in the lease (default `beat-<pid>-<random>@<host>`).
    pub instance: String,
    /// How long the lease lasts unless renewed; another instance takes over at most this long
    /// (plus one poll) after the leader dies. Default 15 s.
    pub lease: Duration,
    /// How often the leader looks for run-time changes and followers try for the lease (at
    /// most a third of the lease). Default 1 s.
    pub poll_interval: Duration,
    /// The missed-tick policy. Default [`MissedTicks::CatchUpOnce`].
    pub missed: MissedTicks,
    /// A tick this late or less is on time, even under [`MissedTicks::Skip`]. Default: the
    /// lease, so a leader change never skips a tick.
    pub grace: Option<Duration>,
    /// The zone of crontab entries that name none. Default UTC.
    pub zone: Zone,
    /// Where "now" comes from.
    pub clock: Clock,
}

impl Default for BeatOptions {
    fn default() -> Self {
        BeatOptions {
            instance: format!(
                "beat-{}-{:04x}@{}",
                std::process::id(),
                fastrand_u16(),
                celeriac_core::hostname()
            ),
            lease: Duration::from_secs(15),
            poll_interval: Duration::from_secs(1),
            missed: MissedTicks::CatchUpOnce,
            grace: None,
            zone: Zone::Utc,
            clock: Clock::system(),
        }
    }
}

/// 16 random bits: the last four hex digits of a fresh id (its first ones are the time).
/// An entry's send options for the firing of `tick`: a relative expiry counted from the tick.
fn from_tick(options: &SendOptions, tick: DateTime<Utc>) -> SendOptions {
    let mut o = options.clone();
    if let Some(Expires::In(d)) = o.expires {
        if let Some(at) = chrono::Duration::from_std(d)
            .ok()
            .and_then(|d| tick.checked_add_signed(d))
        {
            o.expires = Some(Expires::At(at));
        }
    }
    o
}

fn fastrand_u16() -> u16 {
    let id = celeriac_core::protocol::new_id();
    u16::from_str_radix(id.get(32..).unwrap_or("0"), 16).unwrap_or(0)
}

/// One task to send for an entry.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Firing {
    /// The entry's name.
    pub entry: String,
    /// The task name.
    pub task: String,
    /// The task id to send with (recorded in the store before sending).
    pub task_id: String,
    /// The tick it stands for (the trigger time for a manual run).
    pub tick: DateTime<Utc>,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
    /// Send options; an entry's relative `expires` is made absolute here, counted from `tick`.
    pub options: SendOptions,
    /// Triggered by hand rather than by the schedule.
    pub manual: bool,
}

/// What a beat instance reports to its [`Beat::subscribe`] receivers: an in-process stream
/// that the events transport can forward later. Every fire is also logged at info level.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BeatEvent {
    /// The `tick` event: a task was handed to the broker for an entry.
    Tick {
        /// The instance that sent it (the leader).
        instance: String,
        /// The entry's name.
        entry: String,
        /// The task name.
        task: String,
        /// The id it was sent with.
        task_id: String,
        /// The tick it stands for (the trigger time for a manual run).
        scheduled: DateTime<Utc>,
        /// When the send completed, by the beat's clock.
        sent_at: DateTime<Utc>,
        /// The leader's term (its fencing token).
        term: u64,
        /// Triggered by hand rather than by the schedule.
        manual: bool,
    },
    /// This instance took the lease: it fires from now on.
    Leading {
        /// This instance.
        instance: String,
        /// The new term (fencing token).
        term: u64,
    },
    /// This instance lost (or, on shutdown, gave up) the lease it held.
    NotLeading {
        /// This instance.
        instance: String,
        /// The term it held.
        term: u64,
    },
}

/// How many events a slow receiver may lag behind before it misses some (it then gets
/// `RecvError::Lagged`).
const EVENT_BUFFER: usize = 1024;

/// Sends the task of a [`Firing`]. The `celeriac` facade implements it for `App`, sending an
/// ordinary protocol-2 message with the header `celery_beat_task: true`, as Celery 5.7 does.
pub trait Dispatch: Send + Sync + 'static {
    /// Sends one task with `firing.task_id`.
    fn send<'a>(&'a self, firing: &'a Firing) -> BoxFuture<'a, Result<()>>;

    /// Whether the application knows `task`; `None` when it cannot tell.
    fn knows_task(&self, task: &str) -> Option<bool> {
        let _ = task;
        None
    }
}

/// A beat instance: static entries, a store shared with the other instances, and a
/// [`Dispatch`] to send with. Run it with [`Beat::run`].
///
/// ```
/// # async fn demo(dispatch: impl celeriac_beat::Dispatch) -> celeriac_core::Result<()> {
/// use std::time::Duration;
/// use celeriac_beat::{Beat, BeatOptions, Entry, MemoryStore, every};
///
/// let beat = Beat::new(MemoryStore::new(), dispatch, BeatOptions::default())
///     .entry(Entry::new("ping", "tasks.ping", every(Duration::from_secs(10))));
/// beat.run(async { tokio::signal::ctrl_c().await.ok(); }).await?;
/// # Ok(()) }
/// ```
pub struct Beat {
    entries: Vec<Entry>,
    store: DynBeatStore,
    dispatch: Arc<dyn Dispatch>,
    options: BeatOptions,
    events: tokio::sync::broadcast::Sender<BeatEvent>,
}

impl fmt::Debug for Beat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Beat")
            .field("instance", &self.options.instance)
            .field("entries", &self.entries.len())
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// Why a leader's pass stopped.
enum Stop {
    LostLease,
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Failed(e)
    }
}

impl Beat {
    /// A beat with no entry yet.
    pub fn new(store: impl BeatStore, dispatch: impl Dispatch, options: BeatOptions) -> Beat {
        Beat::from_parts(Arc::new(store), Arc::new(dispatch), options)
    }

    /// Like [`Beat::new`], with shared handles.
    pub fn from_parts(
        store: DynBeatStore,
        dispatch: Arc<dyn Dispatch>,
        options: BeatOptions,
    ) -> Beat {
        Beat {
            entries: Vec::new(),
            store,
            dispatch,
            options,
            events: tokio::sync::broadcast::Sender::new(EVENT_BUFFER),
        }
    }

    /// A receiver of this instance's [`BeatEvent`]s from now on: a `Tick` for every task it
    /// sends, `Leading`/`NotLeading` when it takes or loses the lease. Subscribe before
    /// [`Beat::run`]; events sent while nobody listens are dropped.
    ///
    /// ```
    /// # async fn demo(dispatch: impl celeriac_beat::Dispatch) {
    /// use celeriac_beat::{Beat, BeatEvent, BeatOptions, MemoryStore};
    ///
    /// let beat = Beat::new(MemoryStore::new(), dispatch, BeatOptions::default());
    /// let mut events = beat.subscribe();
    /// tokio::spawn(async move {
    ///     while let Ok(BeatEvent::Tick { entry, task_id, .. }) = events.recv().await {
    ///         println!("{entry}: sent {task_id}");
    ///     }
    /// });
    /// # }
    /// ```
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<BeatEvent> {
        self.events.subscribe()
    }

    fn emit(&self, event: BeatEvent) {
        // No receiver is not an error: events are optional.
        let _ = self.events.send(event);
    }

    /// Adds an entry declared in code.
    #[must_use]
    pub fn entry(mut self, entry: Entry) -> Self {
        self.entries.push(entry);
        self
    }

    /// Adds entries declared in code or config.
    #[must_use]
    pub fn entries(mut self, entries: impl IntoIterator<Item = Entry>) -> Self {
        self.entries.extend(entries);
        self
    }

    /// The settings.
    pub fn options(&self) -> &BeatOptions {
        &self.options
    }

    /// A handle to list and change entries at run time, through the store.
    pub fn control(&self) -> crate::Control {
        crate::Control::new(self.store.clone(), self.entries.clone())
    }

    /// Checks the entries: each valid, names unique. An unknown task is a warning only.
    pub fn validate(&self) -> Result<()> {
        let mut names = HashSet::new();
        for e in &self.entries {
            e.validate()?;
            if !names.insert(e.name.as_str()) {
                return Err(Error::config(format!(
                    "beat entry {:?} is declared twice",
                    e.name
                )));
            }
            self.warn_unknown(e);
        }
        if self.options.lease < Duration::from_millis(10) {
            return Err(Error::config("beat lease must be at least 10 ms"));
        }
        Ok(())
    }

    fn warn_unknown(&self, e: &Entry) {
        if self.dispatch.knows_task(&e.task) == Some(false) {
            tracing::warn!(
                entry = %e.name,
                task_name = %e.task,
                "beat entry names a task this app does not register; it is sent anyway \
                 (a worker elsewhere may know it)"
            );
        }
    }

    /// Runs until `shutdown` completes: competes for the lease, and while holding it fires
    /// due entries. Gives the lease up on the way out. Fails at once on invalid entries.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        self.validate()?;
        let o = &self.options;
        let renew = (o.lease / 3).max(Duration::from_millis(1));
        let poll = o.poll_interval.min(renew).max(Duration::from_millis(1));
        // Entries declared in code and config, and those added at run time (in the store).
        let added = match self.store.load().await {
            Ok(rows) => rows
                .iter()
                .filter(|(name, row)| {
                    row.spec.is_some() && !self.entries.iter().any(|e| &e.name == *name)
                })
                .count(),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot read the beat store yet");
                0
            }
        };
        tracing::info!(
            instance = %o.instance,
            declared = self.entries.len(),
            added_at_run_time = added,
            lease_ms = o.lease.as_millis() as u64,
            "beat started"
        );
        tokio::pin!(shutdown);
        let mut held: Option<Lease> = None;
        let mut warned = HashSet::new();
        loop {
            let now = o.clock.now();
            let lease = match self.store.acquire(&o.instance, now, o.lease).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "beat cannot reach its store");
                    None
                }
            };
            match (&held, &lease) {
                (None, Some(l)) => self.leading(l),
                (Some(h), Some(l)) if h.token != l.token => {
                    self.not_leading(h);
                    self.leading(l);
                }
                (Some(h), None) => self.not_leading(h),
                _ => {}
            }
            held = lease;
            let mut wait = poll;
            if let Some(l) = held.clone() {
                match self.lead(&l, &mut warned).await {
                    Ok(Some(next)) => {
                        let until = (next - o.clock.now()).to_std().unwrap_or(Duration::ZERO);
                        wait = until.min(poll);
                    }
                    Ok(None) => {}
                    Err(Stop::LostLease) => {
                        self.not_leading(&l);
                        held = None;
                    }
                    Err(Stop::Failed(e)) => {
                        tracing::warn!(error = %e, "beat pass failed; retrying");
                    }
                }
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
        if let Some(l) = held {
            if let Err(e) = self.store.release(&l).await {
                tracing::warn!(error = %e, "beat cannot release its lease");
            }
            self.not_leading(&l);
        }
        tracing::info!(instance = %o.instance, "beat stopped");
        Ok(())
    }

    fn leading(&self, l: &Lease) {
        tracing::info!(instance = %self.options.instance, token = l.token, "beat is the leader");
        self.emit(BeatEvent::Leading {
            instance: self.options.instance.clone(),
            term: l.token,
        });
    }

    fn not_leading(&self, l: &Lease) {
        tracing::info!(instance = %self.options.instance, token = l.token, "beat is no longer the leader");
        self.emit(BeatEvent::NotLeading {
            instance: self.options.instance.clone(),
            term: l.token,
        });
    }

    /// The entries in effect: declared ones, then valid run-time ones from the store.
    fn effective(
        &self,
        specs: &BTreeMap<String, EntrySpec>,
        warned: &mut HashSet<String>,
    ) -> Vec<Entry> {
        let mut out = self.entries.clone();
        let declared: HashSet<&str> = self.entries.iter().map(|e| e.name.as_str()).collect();
        for (name, spec) in specs {
            if declared.contains(name.as_str()) {
                continue;
            }
            match Entry::from_spec(name, spec) {
                Ok(e) => {
                    if warned.insert(format!("new:{name}")) {
                        self.warn_unknown(&e);
                    }
                    out.push(e);
                }
                Err(e) => {
                    if warned.insert(format!("bad:{name}")) {
                        tracing::warn!(entry = %name, error = %e, "ignoring an invalid run-time beat entry");
                    }
                }
            }
        }
        out
    }

    /// One pass of the leader; returns the next time something is due.
    async fn lead(
        &self,
        lease: &Lease,
        warned: &mut HashSet<String>,
    ) -> std::result::Result<Option<DateTime<Utc>>, Stop> {
        let o = &self.options;
        let (rows, specs) = crate::store::load(&*self.store).await?;
        let mut next_wake: Option<DateTime<Utc>> = None;
        for entry in self.effective(&specs, warned) {
            let row = rows.get(&entry.name).cloned().unwrap_or_default();
            let now = o.clock.now();
            let mut state = match row.state {
                Some(s) => s,
                None => {
                    let s = EntryState::new(now);
                    self.save(lease, &entry.name, &s).await?;
                    s
                }
            };
            if let Some(p) = state.pending.take() {
                if p.token != lease.token {
                    tracing::warn!(
                        entry = %entry.name,
                        task_id = %p.task_id,
                        tick = %celeriac_core::time::format(p.tick),
                        token = p.token,
                        "a previous leader recorded this tick but did not confirm sending it; \
                         it may not have been sent"
                    );
                }
                self.save(lease, &entry.name, &state).await?;
            }
            if row.triggers > state.triggers_done {
                let mut s = state.clone();
                s.triggers_done = row.triggers;
                state = self.fire(lease, &entry, &state, s, now, true).await?;
            }
            let Some(due) = entry
                .schedule
                .next_tick(state.last_run_at, state.since, &o.zone)
            else {
                continue;
            };
            let now = o.clock.now();
            if due > now {
                next_wake = Some(next_wake.map_or(due, |w| w.min(due)));
                continue;
            }
            let latest = entry.schedule.latest_tick(due, now, &o.zone);
            let mut s = state.clone();
            s.last_run_at = Some(latest);
            let late = (now - latest).to_std().unwrap_or(Duration::ZERO);
            let grace = o.grace.unwrap_or(o.lease);
            if row.paused {
                tracing::debug!(entry = %entry.name, tick = %celeriac_core::time::format(latest), "beat entry paused; tick skipped");
                self.save(lease, &entry.name, &s).await?;
            } else if o.missed == MissedTicks::Skip && late > grace {
                tracing::info!(
                    entry = %entry.name,
                    tick = %celeriac_core::time::format(latest),
                    late_ms = late.as_millis() as u64,
                    "beat skipped missed ticks (policy: skip)"
                );
                self.save(lease, &entry.name, &s).await?;
            } else {
                if latest != due {
                    tracing::info!(
                        entry = %entry.name,
                        first_missed = %celeriac_core::time::format(due),
                        "beat missed ticks; sending once for them (policy: catch up once)"
                    );
                }
                s = self.fire(lease, &entry, &state, s, latest, false).await?;
            }
            if let Some(n) = entry.schedule.next_tick(s.last_run_at, s.since, &o.zone) {
                next_wake = Some(next_wake.map_or(n, |w| w.min(n)));
            }
        }
        Ok(next_wake)
    }

    async fn save(
        &self,
        lease: &Lease,
        name: &str,
        state: &EntryState,
    ) -> std::result::Result<(), Stop> {
        if self
            .store
            .save(lease, self.options.clock.now(), name, state)
            .await?
        {
            Ok(())
        } else {
            Err(Stop::LostLease)
        }
    }

    /// Records the fire (fenced), sends it, confirms it. A failed send is undone so the next
    /// pass retries it.
    async fn fire(
        &self,
        lease: &Lease,
        entry: &Entry,
        before: &EntryState,
        after: EntryState,
        tick: DateTime<Utc>,
        manual: bool,
    ) -> std::result::Result<EntryState, Stop> {
        let task_id = celeriac_core::protocol::new_id();
        let mut claimed = after;
        claimed.total_run_count += 1;
        claimed.pending = Some(Pending::new(task_id.clone(), tick, lease.token));
        self.save(lease, &entry.name, &claimed).await?;
        let firing = Firing {
            entry: entry.name.clone(),
            task: entry.task.clone(),
            task_id: task_id.clone(),
            tick,
            args: entry.args.clone(),
            kwargs: entry.kwargs.clone(),
            options: from_tick(&entry.options, tick),
            manual,
        };
        if let Err(e) = self.dispatch.send(&firing).await {
            tracing::warn!(entry = %entry.name, task_id = %task_id, error = %e, "beat cannot send; will retry");
            self.save(lease, &entry.name, before).await?;
            return Err(Stop::Failed(e));
        }
        tracing::info!(
            entry = %entry.name,
            task_id = %task_id,
            task_name = %entry.task,
            tick = %celeriac_core::time::format(tick),
            manual,
            "beat sent"
        );
        self.emit(BeatEvent::Tick {
            instance: self.options.instance.clone(),
            entry: entry.name.clone(),
            task: entry.task.clone(),
            task_id,
            scheduled: tick,
            sent_at: self.options.clock.now(),
            term: lease.token,
            manual,
        });
        claimed.pending = None;
        self.save(lease, &entry.name, &claimed).await?;
        Ok(claimed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_expiry_counts_from_the_tick() {
        let tick = chrono::Utc::now() - chrono::Duration::seconds(30);
        let mut o = SendOptions::default();
        o.queue = Some("q".into());
        o.expires = Some(Expires::In(Duration::from_secs(60)));
        let fired = from_tick(&o, tick);
        assert_eq!(
            fired.expires,
            Some(Expires::At(tick + chrono::Duration::seconds(60)))
        );
        assert_eq!(fired.queue, o.queue);
        o.expires = None;
        assert_eq!(from_tick(&o, tick), o);
    }

    #[test]
    fn instance_suffixes_are_random_not_the_time() {
        let draws: std::collections::HashSet<u16> =
            (0..64).map(|_| super::fastrand_u16()).collect();
        assert!(draws.len() > 32, "{draws:?}");
    }
}
