//! The generic broker conformance suite, on classic queues with `x-max-priority` 10, and the
//! broadcast suite (remote control and events).
//!
//! The rpc backend is not run through the backend suite: it keeps no store (results are
//! messages to the caller), has no groups or counters, and serves only its own process, as in
//! Celery; `rpc.rs` tests what it does.

use celeriac_core::DynBroker;

use crate::util;

async fn broker() -> Option<DynBroker> {
    if !util::rabbit_up() {
        return None;
    }
    Some(util::dyn_broker("max_priority=10").await)
}

celeriac_test::broker_conformance!(broker);
celeriac_test::broadcast_conformance!(broker);

/// The same suite on quorum queues (`x-queue-type: quorum`, no priorities, per-consumer QoS).
mod quorum {
    use celeriac_core::DynBroker;

    use crate::util;

    async fn broker() -> Option<DynBroker> {
        if !util::rabbit_up() {
            return None;
        }
        Some(util::dyn_broker("queue_type=quorum").await)
    }

    celeriac_test::broker_conformance!(broker);
}
