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
//! `cache+pylibmc://`. Celery's URL carries nothing but servers (no credentials: memcached's
//! text protocol has none), and so does ours. Timeouts and limits are set in
//! [`MemcachedOptions`]; `result_expires` comes from [`celeriac_core::Config`].
//!
//! # On the wire
//!
//! What Celery's `CacheBackend` (on its `KeyValueStoreBackend`) writes, and this crate too:
//!
//! | key | value | flags | written by |
//! |---|---|---|---|
//! | `celery-task-meta-<task id>` | the task meta JSON document, as on Redis (`status`, `result`, `traceback`, `children`, `date_done`, extended fields, `task_id`) | 16 (`str`) | the worker, on each state |
//! | `celery-taskset-meta-<group id>` | `{"result": [[gid, null], [[[tid, null], null], ...]]}` | 16 (`str`) | `GroupResult.save()`; a chord's sender |
//! | `chord-unlock-<group id>` | the chord's counter, decimal | 2 (`int`) | a chord's sender sets 0, each header task's worker `incr`s it |
//!
//! Every value is written with memcached's exptime = `result_expires` in seconds (1 day by
//! default; 0 = none). Celery passes the number as it is, so a `result_expires` above 30 days
//! becomes a Unix time of 1970 to memcached and the item expires at once; celeriac sends an
//! absolute time for those instead, which is what was meant.
//!
//! **Flags.** memcached stores 32 bits of client flags with each value; Python's memcached
//! libraries record the value's Python type there and turn the bytes back into that type when
//! they read. python-memcached and pylibmc use the same bits ([`client::flags`]): 0 for
//! `bytes`, 1 for a pickle, 2 for `int`, 8 for zlib, 16 for `str`. Celery's JSON serializer
//! hands the library a `str`, stored with flags 16; celeriac writes its documents with flags
//! 16 too, so a Python client gets back the same `str` Celery would have written, and the
//! chord counter with flags 2. Reading, celeriac takes flags 0 and 16 as a document, and
//! refuses a pickle (flags 1: Celery's `pickle` result serializer, or an object the library
//! pickled) and compressed values with an [`ErrorKind::Unsupported`] error naming the key.
//!
//! **Which Python library.** Celery imports `pylibmc` and falls back to `python-memcached`
//! (`import memcache`); the interop tests use python-memcached (pure Python; pylibmc must be
//! compiled against libmemcached). With one server the two behave alike. With several, each
//! client picks a key's server by hashing the key, and the two libraries hash differently:
//! this crate follows python-memcached (crc32-based); pylibmc's (libmemcached's one-at-a-time
//! hash, modulo the server count) is described in `client/hash.rs` and not implemented. Mix
//! celeriac with pylibmc clients on one server only.
//!
//! **Chords.** Celery's cache backend counts chord parts with `incr` on
//! `chord-unlock-<gid>` after restoring the saved group. celeriac's worker counts its own
//! chords with [`ResultBackend::incr`] on its own keys and a claim (see
//! `celeriac_core::canvas`); this backend does not yet speak Celery's chord keys, so a chord
//! whose header runs on both Python and celeriac workers does not complete. Results, groups
//! and chains interoperate.
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
//! **Waiting polls.** memcached has no notifications, so [`ResultBackend::wait`] reads the
//! key after 1, 2, 4, ... ms, then every 50 ms ([`MemcachedOptions::poll_max_interval`]): a
//! result is seen at most 50 ms late, and each waiting client costs one `get` (about 50 µs of
//! server time on loopback) every 50 ms, 20 a second. Celery's own client polls every 0.5 s.
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
//! # What memcached does not keep
//!
//! memcached is a cache. It keeps nothing across a restart, and evicts items before they
//! expire when memory runs short; Celery's documentation warns of the same. A result lost
//! that way reads as PENDING, forever. The client notices a restarted server when it
//! reconnects (a new process id and start time in `stats`), logs a warning naming the server
//! and that everything it held is gone, and a `wait` that times out across a restart says the
//! result may have been lost in it. Use Redis or a database for results that matter.
//!
//! [`ErrorKind::Unsupported`]: celeriac_core::ErrorKind::Unsupported
//! [`ResultBackend::incr`]: celeriac_core::ResultBackend::incr
//! [`ResultBackend::wait`]: celeriac_core::ResultBackend::wait

mod backend;
pub mod client;
mod url;

use std::sync::Arc;

use celeriac_core::{Drivers, DynBackend};

pub use backend::{MemcachedBackend, MemcachedOptions};

/// The URL schemes this crate registers (result backends only).
pub const SCHEMES: [&str; 3] = ["cache+memcached", "cache+memcache", "cache+pylibmc"];

/// Adds the `cache+memcached`, `cache+memcache` and `cache+pylibmc` result backend schemes to
/// `drivers`.
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
