//! Redis broker and result backend for celeriac, using the same keys, encodings and semantics
//! as kombu's Redis transport and Celery's Redis result backend (work in progress).

mod backend;
mod broker;

pub use backend::RedisBackend;
pub use broker::RedisBroker;

/// Registers the `redis` (and `rediss`, `unix`) schemes for broker and result backend.
pub fn register(drivers: &mut celeriac_core::Drivers) {
    broker::register(drivers);
    backend::register(drivers);
}
