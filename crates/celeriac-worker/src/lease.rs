//! Keeping a held delivery's lease alive: [`keep`].
//!
//! For the delivery pipeline. A delivery stays leased for the visibility timeout; an acks-late
//! task that runs longer, or a delivery that waits long for a rate-limit token, would be
//! handed to another consumer and run twice. While the worker holds a delivery unacked it
//! extends the lease every third of the timeout, when the broker supports it. If an extension
//! fails the lease is lost (someone else may have the message now); the keeper logs and stops.

use std::sync::Arc;
use std::time::Duration;

use celeriac_core::DeliveryHandle;
use tokio::task::JoinHandle;

/// Extends a lease until dropped.
#[derive(Debug)]
pub(crate) struct LeaseKeeper(Option<JoinHandle<()>>);

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

/// Extends `handle`'s lease to `lease` every `lease / 3` while the keeper lives; does nothing
/// when `enabled` is false (the broker cannot extend leases).
pub(crate) fn keep(handle: Arc<DeliveryHandle>, lease: Duration, enabled: bool) -> LeaseKeeper {
    if !enabled || lease.is_zero() {
        return LeaseKeeper(None);
    }
    let every = lease / 3;
    let span = tracing::Span::current();
    LeaseKeeper(Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = handle.extend_lease(lease).await {
                let _e = span.enter();
                tracing::warn!(error = %e, "cannot extend the delivery's lease; it may run twice");
                return;
            }
        }
    })))
}
