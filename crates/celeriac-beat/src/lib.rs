//! Periodic tasks for celeriac: interval, crontab and one-off schedules that every instance
//! runs and exactly one fires.
//!
//! This crate is for applications that replace cron jobs with tasks and want them highly
//! available: run a beat on every node (embedded in workers with `worker -B`, or standalone
//! with `beat`), and each tick is still sent once. Users reach it as `celeriac::beat` with the
//! facade's `beat` feature; the facade implements [`Dispatch`] for `App` and opens the store
//! from a URL.
//!
//! Like the worker, this crate stands on `celeriac-core` alone and knows no driver: the store
//! it runs on is a [`BeatStore`], a contract of core, and each driver crate brings its own
//! (celeriac-sqlite keeps beat's tables in the broker's file, on the driver's connection
//! thread; celeriac-redis keeps its keys in the broker's Redis). The facade opens the one a
//! URL names through its driver table (`Drivers::open_beat_store` in core): the broker's URL
//! unless `[beat] store` says otherwise.
//!
//! # A tour
//!
//! - [`Schedule`]: [`every`] (with Celery's `relative`), [`crontab`] (Celery's field
//!   semantics, see [`Crontab`]), [`at`] a time; each with an optional [`Zone`], start and end.
//! - [`Entry`]: a name, a task name, arguments and send options (queue, priority, expires),
//!   declared in code or as an [`EntrySpec`] in the `[beat]` table of `celeriac.toml`
//!   ([`BeatConfig`]).
//! - [`Beat`]: the loop. [`BeatStore`]: the shared lease and entry state; [`MemoryStore`] for
//!   one process (tests), the others from the driver crates, opened by URL (`sqlite://` for
//!   the broker's file, `redis://` for the broker's Redis).
//! - [`Control`]: list, add, remove, pause, resume and trigger entries while beats run.
//!
//! # Key design decisions
//!
//! **A lease with a fencing token, not "run exactly one beat".** Celery's beat must run as one
//! process or every task fires twice. Here every instance runs the loop and competes for one
//! lease in the store (an expiring row; see [`celeriac_core::beat`] for the rule every store
//! keeps); the holder fires. A leader that dies stops renewing, and another instance takes
//! over within the lease time (15 s by default). Each new term of
//! the lease carries a larger fencing token, and the leader writes an entry's new state — the
//! tick it is about to send — in the same transaction that checks its token and expiry,
//! *before* sending. A leader paused past its lease (a stalled VM) thus finds its write refused
//! and sends nothing; the new leader sees the tick already recorded and does not send it again.
//! The price: a leader that crashes between recording a tick and handing the message to the
//! broker loses that one tick (the next leader logs it with the task id). We chose a rare, logged
//! loss over a duplicate; a send that *fails* is undone and retried.
//!
//! **The last tick of every entry is persisted,** so a restart neither re-fires nor silently
//! skips. Ticks missed while no beat ran follow [`MissedTicks`]: send once for all of them
//! (the default, like Celery), or skip those later than the grace period (default: the lease,
//! so a leader change never skips a tick).
//!
//! **Time zones come from the system's tz database** (`/usr/share/zoneinfo`), read by the
//! small `tz-rs` crate instead of compiling the database into the binary (`chrono-tz`): less
//! compile time, and zones follow the OS's updates. Crontab fields match wall-clock time in
//! the entry's zone (default: the beat's, default UTC). Daylight saving time: a wall time that
//! does not exist (the clock jumps from 02:00 to 03:00) fires at the end of the gap, once,
//! so a daily 02:30 job still runs that day at 03:00; a wall time that happens twice (the
//! clock goes back) fires once, at its first occurrence. Intervals are elapsed time and
//! ignore zones, except for rounding with `relative`.
//!
//! **Run-time entries are JSON in the store.** `beat add` (and [`Control::add`]) stores an
//! [`EntrySpec`] as a JSON document, which the store keeps without reading it. A document that
//! no longer parses as a spec fails the read that found it, naming the entry: the leader logs
//! it and retries on its next pass, and the command line reports it, as for a corrupt row.
//!
//! # Features
//!
//! None: the stores come with the drivers, behind the facade's `sqlite` and `redis` features.
//!
//! # Events
//!
//! Every fire is logged with `tracing` at info level with the entry name and the task id, and
//! sent as a [`BeatEvent::Tick`] to the receivers of [`Beat::subscribe`], an in-process stream
//! (with `Leading`/`NotLeading` on lease changes) that Celery-style events on the broker can
//! forward once celeriac has them.

mod config;
mod control;
mod entry;
mod runner;
pub mod schedule;
mod store;

pub use celeriac_core::beat::{BeatStore, DynBeatStore, EntryState, Lease, Pending, Row};
pub use celeriac_core::canvas::{Expires, SendOptions};
/// The in-memory store, for one process (tests, a single embedded beat).
pub use celeriac_core::memory::MemoryBeatStore as MemoryStore;
pub use config::BeatConfig;
pub use control::{Control, EntryInfo};
pub use entry::{CrontabFields, CrontabSpec, Entry, EntrySpec, FieldSpec};
pub use runner::{Beat, BeatEvent, BeatOptions, Clock, Dispatch, Firing, MissedTicks};
pub use schedule::{Crontab, CrontabBuilder, Schedule, Zone, at, crontab, every};

/// A beat store chosen at run time (the name core calls [`DynBeatStore`]).
pub type DynStore = DynBeatStore;
