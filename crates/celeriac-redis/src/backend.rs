//! The Redis result backend (work in progress).

/// A Redis result backend.
#[derive(Debug, Clone)]
pub struct RedisBackend {}

pub(crate) fn register(_drivers: &mut celeriac_core::Drivers) {}
