//! Turns taken in the order deliveries arrived: [`Turns`], for the layers that hold tasks of
//! one name back (rate limits, per worker and across the cluster).
//!
//! The consume loop spawns one tokio task per delivery, numbered as they arrive
//! ([`Request::seq`](crate::pipeline::Request)). tokio polls the last task a thread spawned
//! first (its "LIFO slot"), and the other thread may steal some, so the deliveries of a batch
//! reach a limit in no particular order: with a first-come-first-served lock, of twelve the
//! twelfth started first. So the consume loop marks each held-back delivery's place as it
//! arrives ([`Turns::arrive`]), before its task is spawned; the turn goes to the first place in
//! arrival order, and waits for that delivery when it has not asked yet. A delivery that
//! leaves without asking (revoked, expired, its limit lifted) gives its place up.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// One holder at a time, served in arrival order. See the [module docs](self).
#[derive(Debug, Default)]
pub(crate) struct Turns {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    busy: bool,
    /// Places by arrival number: `None` for a delivery on its way, the sender that wakes it
    /// once it waits.
    queue: BTreeMap<u64, Option<oneshot::Sender<()>>>,
}

impl State {
    /// Hands a free turn to the first place, when that delivery is waiting.
    fn grant(&mut self) {
        if self.busy {
            return;
        }
        while let Some(first) = self.queue.first_entry() {
            if first.get().is_none() {
                return; // on its way: the turn waits for it
            }
            if let Some(tx) = first.remove()
                && tx.send(()).is_ok()
            {
                self.busy = true;
                return;
            }
        }
    }
}

/// The turn, held until dropped; then the next place has it.
#[derive(Debug)]
pub(crate) struct Turn(Arc<Turns>);

impl Drop for Turn {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.busy = false;
        s.grant();
    }
}

/// A delivery's place, taken when it arrived; dropped (or [`left`](Arrival::leave)), it is
/// given up unless the delivery already had its turn.
#[derive(Debug)]
pub(crate) struct Arrival {
    turns: Arc<Turns>,
    seq: u64,
}

impl Arrival {
    /// Gives the place up: the delivery will not ask for a turn.
    pub(crate) fn leave(&self) {
        let mut s = self.turns.lock();
        if let Some(None) = s.queue.get(&self.seq) {
            s.queue.remove(&self.seq);
            s.grant();
        }
    }
}

impl Drop for Arrival {
    fn drop(&mut self) {
        self.leave();
    }
}

/// A waiter's place. Dropped before its turn came (the waiting future was cancelled), it
/// leaves the queue; dropped just after the turn was handed to it, it passes the turn on.
struct Waiting {
    turns: Arc<Turns>,
    seq: u64,
    rx: oneshot::Receiver<()>,
    /// Whether the waiter got its turn (and holds it as a [`Turn`] now).
    served: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.served {
            return;
        }
        let mut s = self.turns.lock();
        if s.queue.remove(&self.seq).is_none() && self.rx.try_recv().is_ok() {
            s.busy = false; // handed to us as we left
        }
        s.grant();
    }
}

impl Turns {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the place of the delivery that arrived `seq`-th and will ask for a turn.
    pub(crate) fn arrive(self: &Arc<Self>, seq: u64) -> Arrival {
        self.lock().queue.insert(seq, None);
        Arrival {
            turns: self.clone(),
            seq,
        }
    }

    /// Waits for the turn of the delivery that arrived `seq`-th (with a place marked or not).
    pub(crate) async fn take(self: &Arc<Self>, seq: u64) -> Turn {
        let (tx, rx) = oneshot::channel();
        {
            let mut s = self.lock();
            s.queue.insert(seq, Some(tx));
            s.grant();
        }
        let mut waiting = Waiting {
            turns: self.clone(),
            seq,
            rx,
            served: false,
        };
        // The sender stays in the queue until `grant` sends on it.
        let _ = (&mut waiting.rx).await;
        waiting.served = true;
        Turn(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Takes turn `seq` in a task that records it and holds it for 10 ms.
    fn taker(
        turns: &Arc<Turns>,
        order: &Arc<Mutex<Vec<u64>>>,
        seq: u64,
    ) -> tokio::task::JoinHandle<()> {
        let (turns, order) = (turns.clone(), order.clone());
        tokio::spawn(async move {
            let _t = turns.take(seq).await;
            order.lock().unwrap().push(seq);
            tokio::time::sleep(Duration::from_millis(10)).await;
        })
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_by_arrival_number_not_by_when_they_asked() {
        let turns = Arc::new(Turns::default());
        let first = turns.take(0).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for seq in [5, 3, 9, 1] {
            handles.push(taker(&turns, &order, seq));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(first);
        for h in handles {
            h.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [1, 3, 5, 9]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_free_turn_waits_for_an_earlier_arrival_that_has_not_asked_yet() {
        let turns = Arc::new(Turns::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let places: Vec<Arrival> = (0..3).map(|seq| turns.arrive(seq)).collect();
        // The last arrival asks first, then the first; the second leaves without asking.
        let last = taker(&turns, &order, 2);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(order.lock().unwrap().is_empty(), "the turn waits for 0");
        let first = taker(&turns, &order, 0);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(*order.lock().unwrap(), [0], "then waits for 1");
        places[1].leave();
        last.await.unwrap();
        first.await.unwrap();
        assert_eq!(*order.lock().unwrap(), [0, 2]);
        drop(places); // places already served or left: nothing changes
        let t = tokio::time::timeout(Duration::from_secs(1), turns.take(3)).await;
        assert!(t.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_leaves_the_queue_and_the_turn_is_not_lost() {
        let turns = Arc::new(Turns::default());
        let first = turns.take(0).await;
        let cancelled = taker(&turns, &Arc::default(), 1);
        tokio::time::sleep(Duration::from_millis(1)).await;
        cancelled.abort();
        let _ = cancelled.await;
        drop(first);
        // Neither the cancelled waiter nor the first holder keeps it.
        let t = tokio::time::timeout(Duration::from_secs(1), turns.take(2)).await;
        assert!(t.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_dropped_as_its_turn_comes_passes_it_on() {
        let turns = Arc::new(Turns::default());
        let first = turns.take(0).await;
        let mut second = Box::pin(turns.take(1));
        // Polled once: queued.
        assert!(poll_once(&mut second).await.is_none());
        drop(first); // handed to the second, which never looks
        drop(second);
        let t = tokio::time::timeout(Duration::from_secs(1), turns.take(2)).await;
        assert!(t.is_ok());
    }

    /// Polls `f` once.
    async fn poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut *f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
