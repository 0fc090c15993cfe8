//! Coordination across workers on memcached: cluster rate limits, unique-task locks and
//! concurrency slots ([`celeriac_core::coord::Coordination`]), built from memcached's atomic
//! steps.
//!
//! memcached runs no scripts, so each operation is a short loop over steps that are atomic on
//! the one server holding the key (every client hashes a key to the same server):
//!
//! - **Locks** are created with `add` (create if absent), renewed or taken over when expired
//!   with `gets` + `cas`, and released with a compare-and-delete (`md <key> C<cas>`, the meta
//!   protocol of memcached 1.6 and later) after checking the holder: a holder never frees a
//!   lock that someone else has taken since.
//! - **Rate limits** keep [`gcra`]'s theoretical arrival time in one item, moved on with
//!   `gets` + `cas` (`add` for a new key).
//! - **Slots** keep one small table per key (holder → lease end), changed with `gets` + `cas`
//!   and deleted with the compare-and-delete when the last holder leaves.
//!
//! A `cas` that finds the item changed since it was read starts the step over; every failed
//! `cas` means another caller's step went through, so the cluster always makes progress.
//!
//! # Clocks
//!
//! memcached has no clock a client can read (its expiry times count whole seconds), so
//! deadlines and arrival times are the worker's wall clock in microseconds since the Unix
//! epoch, written into the values. Workers sharing a store must keep their clocks in step
//! (NTP): a worker ahead of the others spends the shared rate budget early and makes the
//! others wait longer, and it sees the others' leases end early.
//!
//! # Keys and values
//!
//! Keys are `celeriac-coord-<kind>-<key>` (`rate`, `lock`, `slots`) after the backend's
//! `global_keyprefix`: outside Celery's key space. A key memcached cannot take as it is
//! (longer than 250 bytes, or holding spaces or control characters, as a unique task's
//! arguments may) becomes `celeriac-coord-<kind>#<sha256 of the key, hex>`. Values are short
//! text, never pickles, with flags 0: a rate's arrival time in decimal; a lock's
//! `<lease end> <holder>`; a slot table's JSON object `{"<holder>": <lease end>, ...}`.
//! Every item also gets a memcached expiry a second or two after its last lease ends, so a
//! crashed holder's lock or slot goes away by itself even if nobody asks for the key again.
//!
//! # What memcached does not keep
//!
//! memcached may evict any item before it expires when it runs short of memory, and keeps
//! nothing across a restart: a lock or a slot lost that way is free again, so a unique task
//! may be sent twice and a capped task may run once more than its cap. Size the server so
//! it does not evict (`evictions` in `stats`), or use Redis or a database.
//!
//! [`gcra`]: celeriac_core::coord::gcra

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use celeriac_core::coord::{Admission, Coordination, gcra};
use celeriac_core::{BoxFuture, Error, ErrorKind, RateLimit, Result};
use sha2::{Digest, Sha256};

use crate::MemcachedBackend;
use crate::client::{CasOutcome, MAX_KEY_LEN, flags};

/// How many times one step starts over after `cas` conflicts before it gives up (each
/// conflict is another caller's step done, so only a crowd on one key gets near this).
const MAX_ROUNDS: u32 = 1_000;

/// The worker's wall clock, in microseconds since the Unix epoch.
fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// memcached's expiry (whole seconds from now) for an item whose last lease ends at `until`:
/// rounded up, plus one second, since memcached's clock ticks once a second and may expire an
/// item up to a second early. Never 0 (which would mean "never").
fn item_secs(until: u64, now: u64) -> u64 {
    until.saturating_sub(now).div_ceil(1_000_000) + 1
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The memcached key of coordination key `key` of `kind`, under `prefix`.
pub(crate) fn coord_key(prefix: &str, kind: &str, key: &str) -> String {
    let plain = format!("{prefix}celeriac-coord-{kind}-{key}");
    if plain.len() <= MAX_KEY_LEN && key.bytes().all(|b| b > b' ' && b != 0x7f) {
        return plain;
    }
    let digest = Sha256::digest(key.as_bytes());
    let mut out = format!("{prefix}celeriac-coord-{kind}#");
    for b in digest.iter() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// A lock's value: `<lease end> <holder>`.
fn lock_value(until: u64, holder: &str) -> Vec<u8> {
    format!("{until} {holder}").into_bytes()
}

/// `(lease end, holder)` of a lock's value; `None` when it is not one (then it blocks
/// nothing and is replaced).
fn parse_lock(data: &[u8]) -> Option<(u64, String)> {
    let text = std::str::from_utf8(data).ok()?;
    let (until, holder) = text.split_once(' ')?;
    Some((until.parse().ok()?, holder.to_owned()))
}

/// A slot table: holder → lease end.
type Slots = BTreeMap<String, u64>;

/// The unexpired leases of a slot table's value; an unreadable value holds none.
fn parse_slots(data: &[u8], now: u64) -> Slots {
    let mut slots: Slots = serde_json::from_slice(data).unwrap_or_default();
    slots.retain(|_, until| *until > now);
    slots
}

fn gave_up(what: &str, key: &str) -> Error {
    Error::new(
        ErrorKind::Backend,
        format!(
            "{what} on memcached: {key} changed under {MAX_ROUNDS} attempts in a row (too \
             many callers on one key)"
        ),
    )
    .transient()
}

impl MemcachedBackend {
    fn coord_key(&self, kind: &str, key: &str) -> String {
        coord_key(self.prefix(), kind, key)
    }
}

/// Cluster rate limits, unique-task locks and concurrency slots in items of the backend's own
/// (`celeriac-coord-<kind>-<key>`), each step a loop of commands atomic on the server holding
/// the key (`add`, `gets` + `cas`, meta `md` with a CAS unique: memcached 1.6 or later).
/// Times are the worker's wall clock, so workers' clocks must agree (NTP); an item memcached
/// evicts frees its lock or slot early. See `docs/coordination.md`.
impl Coordination for MemcachedBackend {
    fn throttle<'a>(&'a self, key: &'a str, limit: RateLimit) -> BoxFuture<'a, Result<Admission>> {
        Box::pin(async move {
            self.check_open()?;
            let client = self.client();
            let key = self.coord_key("rate", key);
            for _ in 0..MAX_ROUNDS {
                let item = client.gets(&key).await?;
                // Read after the item, so the time is as close as can be to the write.
                let now = now_micros();
                let tat = item
                    .as_ref()
                    .and_then(|i| std::str::from_utf8(&i.data).ok()?.parse().ok())
                    .unwrap_or(0);
                let (next, delay) = match gcra(tat, now, limit) {
                    Ok(admitted) => admitted,
                    // Nothing is written: the caller asks again after the wait.
                    Err(wait) => return Ok(Admission::Wait(wait)),
                };
                let value = next.to_string();
                let exp = item_secs(next, now);
                let done = match item {
                    None => {
                        client
                            .add(&key, flags::BYTES, value.as_bytes(), exp)
                            .await?
                    }
                    Some(item) => {
                        let cas = item.cas.unwrap_or_default();
                        client
                            .cas(&key, flags::BYTES, value.as_bytes(), exp, cas)
                            .await?
                            == CasOutcome::Stored
                    }
                };
                if done {
                    return Ok(Admission::At(delay));
                }
            }
            Err(gave_up("throttle", &key))
        })
    }

    fn lock<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<String>> {
        Box::pin(async move {
            self.check_open()?;
            let client = self.client();
            let key = self.coord_key("lock", key);
            for _ in 0..MAX_ROUNDS {
                let now = now_micros();
                let until = now.saturating_add(micros(ttl));
                let value = lock_value(until, holder);
                let exp = item_secs(until, now);
                match client.gets(&key).await? {
                    None => {
                        if client.add(&key, flags::BYTES, &value, exp).await? {
                            return Ok(holder.to_owned());
                        }
                    }
                    Some(item) => {
                        if let Some((end, other)) = parse_lock(&item.data) {
                            if other != holder && end > now {
                                return Ok(other);
                            }
                        }
                        // Ours (renewed), expired, or unreadable: take it, unless it changed.
                        let cas = item.cas.unwrap_or_default();
                        if client.cas(&key, flags::BYTES, &value, exp, cas).await?
                            == CasOutcome::Stored
                        {
                            return Ok(holder.to_owned());
                        }
                    }
                }
            }
            Err(gave_up("lock", &key))
        })
    }

    fn unlock<'a>(&'a self, key: &'a str, holder: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            self.check_open()?;
            let client = self.client();
            let key = self.coord_key("lock", key);
            for _ in 0..MAX_ROUNDS {
                let Some(item) = client.gets(&key).await? else {
                    return Ok(false);
                };
                match parse_lock(&item.data) {
                    Some((_, h)) if h == holder => {}
                    _ => return Ok(false),
                }
                // Deleted only if nobody took it over between the read and the delete.
                match client
                    .delete_cas(&key, item.cas.unwrap_or_default())
                    .await?
                {
                    CasOutcome::Stored => return Ok(true),
                    CasOutcome::NotFound => return Ok(false),
                    CasOutcome::Exists => {}
                }
            }
            Err(gave_up("unlock", &key))
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
            self.check_open()?;
            let client = self.client();
            let key = self.coord_key("slots", key);
            for _ in 0..MAX_ROUNDS {
                let now = now_micros();
                let until = now.saturating_add(micros(ttl));
                let item = client.gets(&key).await?;
                let mut slots = item
                    .as_ref()
                    .map(|i| parse_slots(&i.data, now))
                    .unwrap_or_default();
                if !slots.contains_key(holder) && slots.len() >= limit as usize {
                    return Ok(false);
                }
                slots.insert(holder.to_owned(), until);
                let value = serde_json::to_vec(&slots)?;
                let last = slots.values().copied().max().unwrap_or(until);
                let exp = item_secs(last, now);
                let done = match item {
                    None => client.add(&key, flags::BYTES, &value, exp).await?,
                    Some(item) => {
                        let cas = item.cas.unwrap_or_default();
                        client.cas(&key, flags::BYTES, &value, exp, cas).await?
                            == CasOutcome::Stored
                    }
                };
                if done {
                    return Ok(true);
                }
            }
            Err(gave_up("acquire a slot", &key))
        })
    }

    fn release<'a>(&'a self, key: &'a str, holder: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            let client = self.client();
            let key = self.coord_key("slots", key);
            for _ in 0..MAX_ROUNDS {
                let now = now_micros();
                let Some(item) = client.gets(&key).await? else {
                    return Ok(());
                };
                let mut slots = parse_slots(&item.data, now);
                if slots.remove(holder).is_none() {
                    return Ok(());
                }
                let cas = item.cas.unwrap_or_default();
                let outcome = match slots.values().copied().max() {
                    None => client.delete_cas(&key, cas).await?,
                    Some(last) => {
                        let value = serde_json::to_vec(&slots)?;
                        client
                            .cas(&key, flags::BYTES, &value, item_secs(last, now), cas)
                            .await?
                    }
                };
                if outcome != CasOutcome::Exists {
                    return Ok(());
                }
            }
            Err(gave_up("release a slot", &key))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_plain_when_memcached_takes_them_and_hashed_otherwise() {
        assert_eq!(coord_key("", "lock", "a:b"), "celeriac-coord-lock-a:b");
        assert_eq!(coord_key("p_", "rate", "t"), "p_celeriac-coord-rate-t");
        let spaced = coord_key("", "lock", "unique:t:[[\"a b\"],{}]");
        assert!(spaced.starts_with("celeriac-coord-lock#"), "{spaced}");
        assert_eq!(spaced.len(), "celeriac-coord-lock#".len() + 64);
        let long = "k".repeat(300);
        assert_eq!(coord_key("", "lock", &long).len(), spaced.len());
        assert_ne!(coord_key("", "lock", &long), spaced);
        assert_ne!(
            coord_key("", "lock", &long),
            coord_key("", "slots", &long),
            "kinds stay apart"
        );
    }

    #[test]
    fn values_read_back() {
        assert_eq!(
            parse_lock(&lock_value(12, "a holder")),
            Some((12, "a holder".to_owned()))
        );
        assert_eq!(parse_lock(b"garbage"), None);
        let slots = parse_slots(br#"{"a":5,"b":20}"#, 10);
        assert_eq!(
            slots.into_iter().collect::<Vec<_>>(),
            [("b".to_owned(), 20)]
        );
        assert!(parse_slots(b"not json", 0).is_empty());
    }

    #[test]
    fn items_outlive_their_leases() {
        assert_eq!(item_secs(0, 10), 1, "never 0, which is no expiry");
        assert_eq!(item_secs(1_000_000, 0), 2);
        assert_eq!(item_secs(1_000_001, 0), 3);
        assert_eq!(item_secs(200_000, 0), 2);
    }
}
