//! Coordination across workers: rate limits, locks and slots shared by the whole cluster.
//!
//! Celery's rate limits are per worker process: ten workers at `10/s` make 100 calls a
//! second. A [`Coordination`] store gives every worker the same budget, through the store
//! they already share: a result backend hands one out as a capability
//! ([`BackendCapabilities::coordination`](crate::BackendCapabilities)), so the cluster's state
//! lives where its results do (Redis: Lua scripts; SQLite: rows in the write transaction;
//! PostgreSQL, MariaDB/MySQL and Celery's `db+` tables: one statement or transaction per
//! step; memcached: compare-and-swap on the worker's clock; the memory backend: one process;
//! see [`STORES`]). What the worker and the app build on it:
//!
//! - **Cluster rate limits** ([`Coordination::throttle`]): GCRA (the generic cell rate
//!   algorithm) over one timestamp per key, with reservations: a caller up to one interval
//!   early is admitted to the next free slot and starts when it comes (each admission moves
//!   the key's "theoretical arrival time" one interval on); a caller earlier than that waits.
//!   Slots are one interval apart however late their callers wake, so a loaded machine keeps
//!   the full rate.
//! - **Unique tasks** ([`Coordination::lock`]): a key held by one task id until it is
//!   released or its time runs out, so a crashed holder frees it by itself.
//! - **Concurrency caps** ([`Coordination::acquire`]): `n` slots per key, each leased to a
//!   holder; an expired lease frees its slot.
//!
//! Times are the store's own clock where it has one (Redis `TIME`), so workers whose clocks
//! disagree still share one budget.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::broker::BoxFuture;
use crate::error::Result;
use crate::ratelimit::RateLimit;

/// A store of shared rate limits, locks and slots. See the [module docs](self).
///
/// Keys are the caller's; a store may prefix them. Every method is one atomic step on the
/// store.
pub trait Coordination: Send + Sync {
    /// Asks to start one thing under `limit` for `key`: [`Admission::At`] when admitted (a
    /// slot is taken; start when it comes), else [`Admission::Wait`] (nothing is taken).
    fn throttle<'a>(&'a self, key: &'a str, limit: RateLimit) -> BoxFuture<'a, Result<Admission>>;

    /// Takes lock `key` for `holder` for `ttl`, unless another holder has it: returns the
    /// holder after the call (`holder` itself when taken, or when it already held it).
    fn lock<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<String>>;

    /// Releases lock `key` if `holder` holds it; says whether it did.
    fn unlock<'a>(&'a self, key: &'a str, holder: &'a str) -> BoxFuture<'a, Result<bool>>;

    /// Takes one of `limit` slots of `key` for `holder`, leased for `ttl` (taking it again
    /// renews the lease); `false` when every slot is held by an unexpired lease.
    fn acquire<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        limit: u32,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool>>;

    /// Frees `holder`'s slot of `key`, if it has one.
    fn release<'a>(&'a self, key: &'a str, holder: &'a str) -> BoxFuture<'a, Result<()>>;
}

/// A store's answer to [`Coordination::throttle`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Admitted: the caller holds the slot that begins after this delay (zero: now) and
    /// starts then.
    At(Duration),
    /// Not admitted, nothing taken: ask again after this long.
    Wait(Duration),
}

impl Admission {
    /// Decodes the signed microseconds a store's script or statement returns: a slot's delay
    /// when zero or more, else minus the wait.
    pub fn from_micros(us: i64) -> Self {
        if us >= 0 {
            Admission::At(Duration::from_micros(us as u64))
        } else {
            Admission::Wait(Duration::from_micros(us.unsigned_abs()))
        }
    }
}

/// GCRA with reservations, in whole microseconds: given the key's theoretical arrival time
/// `tat` (0: never used) and `now`, either the new `tat` and the admitted caller's delay, or
/// how long to wait. A caller is admitted from one interval before `tat` on; its slot is the
/// later of `tat` and `now`, and `tat` moves one interval past the slot. Slots are one
/// interval apart, so callers that wake late (a loaded machine, a round trip to the store)
/// keep the full rate as long as they ask within an interval of their slot, and no more
/// than the rate starts over any window. At most one slot ahead is handed out per key (a
/// slot held by a worker that shuts down is lost, never given twice), and an idle key has no
/// burst: two callers at once get slots one interval apart.
pub fn gcra(
    tat: u64,
    now: u64,
    limit: RateLimit,
) -> std::result::Result<(u64, Duration), Duration> {
    let interval = gcra_interval(limit);
    let allow_at = tat.saturating_sub(interval);
    if now >= allow_at {
        let slot = tat.max(now);
        Ok((slot + interval, Duration::from_micros(slot - now)))
    } else {
        Err(Duration::from_micros(allow_at - now))
    }
}

/// [`gcra`]'s answer as an [`Admission`], with the new `tat` to write when admitted.
pub fn gcra_admission(tat: u64, now: u64, limit: RateLimit) -> (Admission, Option<u64>) {
    match gcra(tat, now, limit) {
        Ok((next, delay)) => (Admission::At(delay), Some(next)),
        Err(wait) => (Admission::Wait(wait), None),
    }
}

/// [`gcra`]'s interval for `limit`, in microseconds.
pub fn gcra_interval(limit: RateLimit) -> u64 {
    (1_000_000.0 / limit.rate()).max(1.0) as u64
}

/// The result backends that keep coordination across workers (for error messages and
/// warnings): each offers [`Coordination`] as a capability.
pub const STORES: &str = "redis://, sqlite://, postgres://, mysql://, db+postgresql://, db+mysql://, \
                          cache+memcached://";

/// The header a unique task's message carries: the key of the lock its send took, which the
/// worker releases when the task ends. Python Celery ignores headers it does not know.
pub const UNIQUE_HEADER: &str = "celeriac_unique";

/// The default key of a unique task's call: its name and its arguments as JSON (keyword
/// arguments in key order), so equal calls share a key whoever sends them.
pub fn unique_key(
    task: &str,
    args: &[serde_json::Value],
    kwargs: &serde_json::Map<String, serde_json::Value>,
) -> String {
    let mut key = format!("unique:{task}:");
    // Writing JSON values into a String cannot fail.
    key.push_str(&serde_json::to_string(&(args, kwargs)).unwrap_or_default());
    key
}

/// Coordination within one process: for the memory backend and for tests.
#[derive(Debug, Default)]
pub struct LocalCoordination {
    state: Mutex<Local>,
}

#[derive(Debug, Default)]
struct Local {
    tats: HashMap<String, u64>,
    locks: HashMap<String, (String, Instant)>,
    slots: HashMap<String, HashMap<String, Instant>>,
}

impl LocalCoordination {
    fn with<T>(&self, f: impl FnOnce(&mut Local, Instant) -> T) -> T {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s, Instant::now())
    }
}

/// Microseconds since the first call in this process: a monotonic clock for [`gcra`].
fn local_micros(now: Instant) -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    // Offset by a second so that 0 stays "never used".
    now.saturating_duration_since(start).as_micros() as u64 + 1_000_000
}

impl Coordination for LocalCoordination {
    fn throttle<'a>(&'a self, key: &'a str, limit: RateLimit) -> BoxFuture<'a, Result<Admission>> {
        Box::pin(async move {
            Ok(self.with(|s, now| {
                let tat = s.tats.get(key).copied().unwrap_or(0);
                let (admission, next) = gcra_admission(tat, local_micros(now), limit);
                if let Some(next) = next {
                    s.tats.insert(key.to_owned(), next);
                }
                admission
            }))
        })
    }

    fn lock<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<String>> {
        Box::pin(async move {
            Ok(self.with(|s, now| match s.locks.get(key) {
                Some((h, until)) if *until > now && h != holder => h.clone(),
                _ => {
                    s.locks
                        .insert(key.to_owned(), (holder.to_owned(), now + ttl));
                    holder.to_owned()
                }
            }))
        })
    }

    fn unlock<'a>(&'a self, key: &'a str, holder: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            Ok(self.with(|s, _| match s.locks.get(key) {
                Some((h, _)) if h == holder => s.locks.remove(key).is_some(),
                _ => false,
            }))
        })
    }

    fn acquire<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        limit: u32,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            Ok(self.with(|s, now| {
                let slots = s.slots.entry(key.to_owned()).or_default();
                slots.retain(|_, until| *until > now);
                if slots.contains_key(holder) || slots.len() < limit as usize {
                    slots.insert(holder.to_owned(), now + ttl);
                    true
                } else {
                    false
                }
            }))
        })
    }

    fn release<'a>(&'a self, key: &'a str, holder: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.with(|s, _| {
                if let Some(slots) = s.slots.get_mut(key) {
                    slots.remove(holder);
                }
            });
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_keys_tell_calls_apart_and_ignore_keyword_order() {
        use serde_json::{Map, json};
        let mut a = Map::new();
        a.insert("x".into(), json!(1));
        a.insert("y".into(), json!(2));
        let mut b = Map::new();
        b.insert("y".into(), json!(2));
        b.insert("x".into(), json!(1));
        assert_eq!(
            unique_key("t", &[json!(1)], &a),
            unique_key("t", &[json!(1)], &b)
        );
        assert_ne!(
            unique_key("t", &[json!(1)], &a),
            unique_key("t", &[json!(2)], &a)
        );
        assert_ne!(unique_key("t", &[], &a), unique_key("u", &[], &a));
    }

    #[test]
    fn gcra_hands_out_slots_one_interval_apart_and_says_how_long_to_wait() {
        let ten: RateLimit = "10/s".parse().unwrap();
        assert_eq!(gcra_interval(ten), 100_000);
        let ms = Duration::from_millis;
        let t0 = 5_000_000;
        // An unused key: the slot is now.
        let (tat, delay) = gcra(0, t0, ten).unwrap();
        assert_eq!((tat, delay), (t0 + 100_000, ms(0)));
        // A second caller at once gets the next slot, one interval on (no burst)...
        let (tat, delay) = gcra(tat, t0 + 10_000, ten).unwrap();
        assert_eq!((tat, delay), (t0 + 200_000, ms(90)));
        // ... and a third must wait until one interval before the slot after that.
        assert_eq!(gcra(tat, t0 + 30_000, ten), Err(ms(70)));
        // Asking late by less than an interval loses nothing: the slot keeps the cadence.
        let (tat, delay) = gcra(tat, t0 + 150_000, ten).unwrap();
        assert_eq!((tat, delay), (t0 + 300_000, ms(50)));
        // A caller later than its slot starts at once, and the cadence moves from then.
        let (tat, delay) = gcra(tat, t0 + 330_000, ten).unwrap();
        assert_eq!((tat, delay), (t0 + 430_000, ms(0)));
        // Idle for long: the budget does not pile up; callers at once are spaced again.
        let later = t0 + 60_000_000;
        let (tat, delay) = gcra(tat, later, ten).unwrap();
        assert_eq!(delay, ms(0));
        assert_eq!(gcra(tat, later, ten).unwrap().1, ms(100));
    }

    #[test]
    fn admissions_decode_from_signed_micros() {
        assert_eq!(Admission::from_micros(0), Admission::At(Duration::ZERO));
        assert_eq!(
            Admission::from_micros(2_500),
            Admission::At(Duration::from_micros(2_500))
        );
        assert_eq!(
            Admission::from_micros(-40),
            Admission::Wait(Duration::from_micros(40))
        );
    }
}
