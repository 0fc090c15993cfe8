//! When a delivered task may run: now, later (an `eta`), or never (it `expires`).
//!
//! For the delivery pipeline; pure, so it is tested without a clock. Expiry is checked first:
//! a task past its deadline is revoked even if it also has an eta. A future eta only arrives in
//! messages sent by Python Celery (our clients park delays in the broker); the pipeline
//! re-parks such a message in the broker's delayed store rather than holding it in memory.

use celeriac_core::Headers;
use chrono::{DateTime, Utc};

/// What to do with a task now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Run it.
    Run,
    /// Its `expires` has passed: store REVOKED (`expired`) and ack.
    Expired,
    /// Its `eta` is in the future.
    Defer(DateTime<Utc>),
}

pub(crate) fn gate(headers: &Headers, now: DateTime<Utc>) -> Gate {
    if headers.expires.is_some_and(|t| t <= now) {
        return Gate::Expired;
    }
    match headers.eta {
        Some(eta) if eta > now => Gate::Defer(eta),
        _ => Gate::Run,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn expiry_wins_then_a_future_eta_defers() {
        let now = Utc::now();
        let mut h = Headers::new("t", "i");
        assert_eq!(gate(&h, now), Gate::Run);
        h.eta = Some(now - Duration::seconds(5));
        assert_eq!(gate(&h, now), Gate::Run);
        h.eta = Some(now + Duration::seconds(5));
        assert_eq!(gate(&h, now), Gate::Defer(now + Duration::seconds(5)));
        h.expires = Some(now + Duration::seconds(1));
        assert_eq!(gate(&h, now), Gate::Defer(now + Duration::seconds(5)));
        h.expires = Some(now);
        assert_eq!(gate(&h, now), Gate::Expired);
    }
}
