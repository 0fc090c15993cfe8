//! The Redis broker (work in progress).

/// A Redis broker.
#[derive(Debug, Clone)]
pub struct RedisBroker {}

pub(crate) fn register(_drivers: &mut celeriac_core::Drivers) {}
