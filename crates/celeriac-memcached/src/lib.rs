//! Celery's cache result backend on memcached (`cache+memcached://host:11211/`), for
//! celeriac, with the small async memcached client it runs on.
//!
//! This crate is for applications whose Python Celery side keeps results in memcached
//! (`result_backend = "cache+memcached://host:11211/"`): [`MemcachedBackend`] stores and reads
//! results exactly as Celery's `CacheBackend` does, so a Python client reads the results of
//! a celeriac worker and a celeriac client reads a Python worker's. Users normally reach it
//! through the `celeriac` facade (feature `memcached`) and a URL; [`register`] adds the schemes
//! to a [`celeriac_core::Drivers`] table. It is a result backend only: memcached is no broker.
//!
//! # URLs
//!
//! `cache+memcached://host:11211/`, several servers as Celery spells them,
//! `cache+memcached://h1:11211;h2:11211/` (port 11211 when left out, `[v6addr]:port` for
//! IPv6), and Celery's other names for the same backend, `cache+memcache://` and
//! `cache+pylibmc://` (5.7 also `cache+pymemcache://`). Celery's URL carries nothing but
//! servers (no credentials: memcached's text protocol has none); ours takes one query
//! parameter besides, `?global_keyprefix=<text>` (percent-encoded): Celery's
//! `result_backend_transport_options["global_keyprefix"]`, which 5.7 puts before every key
//! (with a `_` after it unless it ends in one of `: _ - .`). Timeouts and limits are set in
//! [`MemcachedOptions`]; `result_expires` comes from [`celeriac_core::Config`].
//!
//! # On the wire
//!
//! What Celery's `CacheBackend` (on its `KeyValueStoreBackend`) writes, and this crate too:
//!
//! | key | value | flags (ours) | written by |
//! |---|---|---|---|
//! | `celery-task-meta-<task id>` | the task meta JSON document, as on Redis (`status`, `result`, `traceback`, `children`, `date_done`, extended fields, `task_id`) | 16 (`str`) | the worker, on each state |
//! | `celery-taskset-meta-<group id>` | `{"result": [[gid, null], [[[tid, null], null], ...]]}` | 16 (`str`) | `GroupResult.save()`; a chord's sender |
//! | `chord-unlock-<group id>` | the chord's counter, decimal | 2 (`int`) | a chord's sender sets 0, each header task's worker `incr`s it |
//!
//! Every value is written with memcached's exptime = `result_expires` in seconds (1 day by
//! default; 0 = none). memcached reads a number above 30 days as a Unix time: Celery passes
//! the number as it is (and 5.7 warns about it for chord keys), so such an expiry is a date
//! in 1970 and the item expires at once; celeriac sends an absolute time for those instead,
//! which is what was meant. Celery 5.7 refreshes a chord's keys with `touch` as parts return,
//! and so does celeriac.
//!
//! **Flags.** memcached stores 32 bits of client flags with each value. Celery 5.7's only
//! memcached library, pymemcache, is set up without a serializer: it writes Celery's JSON
//! `str` as its bytes with flags 0, and hands back the stored bytes whatever the flags.
//! python-memcached and pylibmc (Celery up to 5.6) record the value's Python type in the
//! flags instead (the same bits in both, [`client::flags`]: 0 `bytes`, 1 pickle, 2 `int`, 8
//! zlib, 16 `str`) and turn the bytes back into that type. celeriac writes documents with
//! flags 16 and counters with flags 2: pymemcache reads the same bytes, and the older
//! libraries the `str` and `int` they would have stored themselves. Reading, celeriac takes
//! flags 0 and 16 as a document, and refuses a pickle (flags 1: Celery's `pickle` result
//! serializer with the older libraries) and compressed values with an
//! [`ErrorKind::Unsupported`] error naming the key.
//!
//! **Several servers.** Each client picks a key's server by hashing the key, so every client
//! must hash alike. Celery 5.7 uses pymemcache's `HashClient` over several servers:
//! rendezvous hashing with murmur3 ([`client::Distribution::Rendezvous`], the default).
//! python-memcached's crc32 rule (Celery up to 5.6 without pylibmc) is
//! [`client::Distribution::Crc32`]; pylibmc's (libmemcached's defaults) is described in
//! `client/hash.rs` and not implemented. With one server every library agrees. No rule moves
//! a key when its server is down: that is an error for the keys it holds.
//!
//! **Chords.** Celery's cache backend counts chord parts on `chord-unlock-<gid>`: the sender
//! sets it to 0 and saves the header group, each header member's worker restores the group
//! and `incr`s the counter, and the one that reaches the group's size joins the results,
//! sends the body, and deletes the group and the counter. [`MemcachedBackend`] speaks the
//! same ([`celeriac_core::backend::ChordProtocol`]), so chords sent by either side complete
//! on either side's workers; celeriac's claim key still guards the body against a second
//! send.
//!
//! # Design
//!
//! **Precedence without a race.** Celery reads the stored state, then `set`s, guarding only
//! SUCCESS; two workers storing at once can both pass the check. [`MemcachedBackend`] reads
//! with `gets` and writes with `cas` (or `add` when there was nothing), and starts over when
//! someone wrote in between, so state precedence holds under races (two round trips per
//! store).
//!
//! **Counters.** [`ResultBackend::incr`] is memcached's `incr` on an existing counter (one
//! round trip), `add` to start one, and `gets`+`cas` for steps below zero (memcached's `decr`
//! stops at 0 and its numbers are unsigned).
//!
//! **Waiting polls.** memcached has no notifications, so [`ResultBackend::wait`] polls: on
//! its own after 1, 2, 4, ... 32 ms, then through one poll shared by every long wait of the
//! backend, which reads all their ids every 50 ms ([`MemcachedOptions::poll_max_interval`])
//! in one multi-key `get` per server. A result is seen at most about 50 ms late. Measured on
//! this 2-core machine (`tests/it/latency.rs`): a result stored 5, 20, 80, 300 and 1000 ms
//! after the wait began was seen 4-6, 2-17, 40, 22-34 and 42-50 ms after the store; 500
//! clients waiting for 3 s cost the server 8-12 ms of CPU and the waiting process 40 ms,
//! against 16-18 ms and 120-130 ms when each wait polled on its own. Celery's own client
//! polls every 0.5 s. A server that is down does not end a wait: it polls on to its
//! deadline.
//!
//! **The client.** [`client::Client`] speaks the text protocol over tokio TCP: one
//! connection per server shared by every caller, requests written as they come and replies
//! matched in order (memcached answers in order), so concurrent calls pipeline; a multi-key
//! read is one `get k1 k2 ...` per server. Each request has a timeout; a connection that fails
//! or times out is dropped and the next request opens a new one; `get`, `set`, `delete` and
//! `touch` are sent again once when an old connection turns out to be dead (the first request
//! after a server restart). Values above 1 MiB (memcached's default item size) are refused
//! before they are sent, with an error that says so; python-memcached drops them silently.
//!
//! **Coordination.** The backend offers [`celeriac_core::coord::Coordination`] (cluster rate
//! limits, unique-task locks, concurrency slots) through its capabilities, in items of its
//! own (`celeriac-coord-<kind>-<key>`): locks by `add` and a compare-and-delete (meta `md`
//! with a CAS unique, memcached 1.6 and later), rate limits and slot tables by `gets` +
//! `cas`. Times are the worker's clock, so workers' clocks must agree; see the `coord`
//! module's source docs and `docs/coordination.md`.
//!
//! # What memcached does not keep
//!
//! memcached is a cache. It keeps nothing across a restart, and evicts items before they
//! expire when memory runs short; Celery's documentation warns of the same. A result lost
//! that way reads as PENDING, forever. The client notices a restarted server when it
//! reconnects (a new process id and start time in `stats`), logs a warning naming the server
//! and that everything it held is gone, and a `wait` that times out during or after a restart
//! says when it was and that results stored before it are lost. A celeriac worker whose task
//! finishes while the server is down retries storing the final state and settles the message
//! only once it is stored. Eviction and restarts drop coordination items too: a lost lock
//! lets a unique task be queued twice. Use Redis or a database for results that matter.
//!
//! [`ErrorKind::Unsupported`]: celeriac_core::ErrorKind::Unsupported
//! [`ResultBackend::incr`]: celeriac_core::ResultBackend::incr
//! [`ResultBackend::wait`]: celeriac_core::ResultBackend::wait

mod backend;
pub mod client;
mod coord;
mod poll;
mod url;

use std::sync::Arc;

use celeriac_core::{Drivers, DynBackend};

pub use backend::{MemcachedBackend, MemcachedOptions};

/// The URL schemes this crate registers (result backends only).
pub const SCHEMES: [&str; 4] = [
    "cache+memcached",
    "cache+memcache",
    "cache+pylibmc",
    "cache+pymemcache",
];

/// Adds the `cache+memcached`, `cache+memcache`, `cache+pylibmc` and `cache+pymemcache`
/// result backend schemes to `drivers`.
///
/// ```
/// let mut drivers = celeriac_core::Drivers::new();
/// celeriac_memcached::register(&mut drivers);
/// assert!(format!("{drivers:?}").contains("cache+memcached"));
/// ```
pub fn register(drivers: &mut Drivers) {
    for scheme in SCHEMES {
        drivers.add_backend(scheme, |url, config| {
            Box::pin(async move {
                Ok(Arc::new(MemcachedBackend::connect(&url, &config).await?) as DynBackend)
            })
        });
    }
}
