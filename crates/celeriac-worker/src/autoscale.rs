//! Autoscaling (`--autoscale max,min`, remote control's `autoscale`): the pool grows while
//! tasks wait for a slot and shrinks back when slots stay idle.
//!
//! The policy, checked every second: when deliveries wait for a slot and the pool is below
//! `max`, grow by as many as wait (up to `max`); when fewer tasks run than the pool has
//! slots, and that has lasted [`KEEPALIVE`], shrink to what runs (not below `min`). Celery's
//! autoscaler does the same with the same keep-alive.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::pool::PoolHandle;
use crate::tracker::{Standing, Tracker};

/// How long slots must stay idle before the pool shrinks (Celery's `AUTOSCALE_KEEPALIVE`).
pub(crate) const KEEPALIVE: Duration = Duration::from_secs(30);
/// How often the policy looks.
const EVERY: Duration = Duration::from_secs(1);

/// The pool's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bounds {
    pub(crate) max: usize,
    pub(crate) min: usize,
}

/// What the policy asks of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Grow(usize),
    Shrink(usize),
    Stay,
}

/// The policy: `size` slots, `running` tasks, `waiting` deliveries, slots idle since `idle`.
pub(crate) fn decide(
    b: Bounds,
    size: usize,
    running: usize,
    waiting: usize,
    idle: Duration,
) -> Step {
    if size < b.min {
        return Step::Grow(b.min - size);
    }
    if size > b.max {
        return Step::Shrink(size - b.max);
    }
    if waiting > 0 && size < b.max {
        return Step::Grow(waiting.min(b.max - size));
    }
    let want = running.max(b.min);
    if waiting == 0 && size > want && idle >= KEEPALIVE {
        return Step::Shrink(size - want);
    }
    Step::Stay
}

/// Applies the policy to `pool` until aborted.
pub(crate) async fn run(
    bounds: Arc<Mutex<Option<Bounds>>>,
    pool: PoolHandle,
    tracker: Arc<Tracker>,
) {
    let mut busy_at = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(EVERY).await;
        let Some(b) = *bounds.lock().unwrap_or_else(|e| e.into_inner()) else {
            return;
        };
        let held = tracker.snapshot();
        let running = held.iter().filter(|(s, _)| *s == Standing::Active).count();
        let waiting = held
            .iter()
            .filter(|(s, _)| *s == Standing::Reserved)
            .count();
        let size = pool.size();
        if running >= size || waiting > 0 {
            busy_at = tokio::time::Instant::now();
        }
        match decide(b, size, running, waiting, busy_at.elapsed()) {
            Step::Grow(n) => {
                tracing::info!(by = n, "autoscale: growing the pool");
                pool.grow(n);
            }
            Step::Shrink(n) => {
                tracing::info!(by = n, "autoscale: shrinking the pool");
                pool.shrink(n);
                busy_at = tokio::time::Instant::now();
            }
            Step::Stay => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_on_backlog_and_shrinks_when_idle_long_enough() {
        let b = Bounds { max: 8, min: 2 };
        let idle = KEEPALIVE;
        assert_eq!(decide(b, 2, 2, 10, Duration::ZERO), Step::Grow(6));
        assert_eq!(decide(b, 7, 7, 1, Duration::ZERO), Step::Grow(1));
        assert_eq!(decide(b, 8, 8, 5, Duration::ZERO), Step::Stay);
        assert_eq!(decide(b, 8, 1, 0, Duration::from_secs(1)), Step::Stay);
        assert_eq!(decide(b, 8, 1, 0, idle), Step::Shrink(6));
        assert_eq!(decide(b, 8, 5, 0, idle), Step::Shrink(3));
        assert_eq!(
            decide(b, 1, 0, 0, Duration::ZERO),
            Step::Grow(1),
            "up to min"
        );
        assert_eq!(
            decide(Bounds { max: 4, min: 1 }, 6, 6, 0, Duration::ZERO),
            Step::Shrink(2)
        );
    }
}
