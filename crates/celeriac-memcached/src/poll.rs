//! One poll for every long wait: the ids that have been waited on for a while are read
//! together, one multi-key `get` per server and tick, instead of one `get` per waiter.
//!
//! A wait polls on its own first (after 1, 2, 4, ... ms: most results come quickly), then
//! joins the [`Poller`]. The poller's task runs while anyone watches: every tick it reads the
//! watched ids with [`Client::get_many`] and hands a ready record to its waiters; it stops
//! when the last waiter leaves, and the next watch starts it again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celeriac_core::TaskMeta;
use tokio::sync::Notify;

use crate::backend::{decode_meta, task_key};
use crate::client::Client;

/// The most ids read by one `get`.
const CHUNK: usize = 256;

/// The shared poll of one backend.
#[derive(Debug, Default)]
pub(crate) struct Poller {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Watched ids, each with its slot and how many waiters watch it.
    watched: HashMap<String, (Arc<Slot>, usize)>,
    running: bool,
    /// Why the last poll failed, while it fails.
    failing: Option<String>,
}

/// What the waiters of one id share.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    pub(crate) notify: Notify,
    found: Mutex<Option<TaskMeta>>,
}

impl Slot {
    /// The ready record, once the poll found it.
    pub(crate) fn found(&self) -> Option<TaskMeta> {
        self.found.lock().expect("slot lock").clone()
    }
}

/// A waiter's interest in one id; dropping it leaves.
#[derive(Debug)]
pub(crate) struct Watch {
    poller: Arc<Poller>,
    id: String,
    pub(crate) slot: Arc<Slot>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut state = self.poller.state.lock().expect("poller lock");
        if let Some((_, n)) = state.watched.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                state.watched.remove(&self.id);
            }
        }
    }
}

impl Poller {
    /// Watches `id`, starting the poll task (reading with `client` every `tick`) if it is not
    /// running.
    pub(crate) fn watch(
        self: &Arc<Self>,
        id: &str,
        client: &Client,
        prefix: &str,
        tick: Duration,
    ) -> Watch {
        let mut state = self.state.lock().expect("poller lock");
        let slot = {
            let (slot, n) = state
                .watched
                .entry(id.to_owned())
                .or_insert_with(|| (Arc::default(), 0));
            *n += 1;
            slot.clone()
        };
        if !state.running {
            state.running = true;
            tokio::spawn(run(self.clone(), client.clone(), prefix.to_owned(), tick));
        }
        Watch {
            poller: self.clone(),
            id: id.to_owned(),
            slot,
        }
    }

    /// Why the poll fails now, if it does.
    pub(crate) fn failing(&self) -> Option<String> {
        self.state.lock().expect("poller lock").failing.clone()
    }

    /// Wakes every waiter (the backend closed: each sees it).
    pub(crate) fn wake_all(&self) {
        for (slot, _) in self.state.lock().expect("poller lock").watched.values() {
            slot.notify.notify_waiters();
        }
    }
}

async fn run(poller: Arc<Poller>, client: Client, prefix: String, tick: Duration) {
    loop {
        tokio::time::sleep(tick).await;
        let ids: Vec<String> = {
            let mut state = poller.state.lock().expect("poller lock");
            if state.watched.is_empty() {
                // Decided under the lock that `watch` takes: a watch that comes after this
                // finds `running` false and starts a new task.
                state.running = false;
                return;
            }
            state.watched.keys().cloned().collect()
        };
        for chunk in ids.chunks(CHUNK) {
            let keys: Vec<String> = chunk.iter().map(|id| task_key(&prefix, id)).collect();
            let got = client.get_many(&keys).await;
            let mut state = poller.state.lock().expect("poller lock");
            match got {
                Ok(items) => {
                    state.failing = None;
                    for (id, item) in chunk.iter().zip(items) {
                        let Some(meta) = item.and_then(|i| decode_meta(&i).ok()) else {
                            continue;
                        };
                        if !meta.status.is_ready() {
                            continue;
                        }
                        if let Some((slot, _)) = state.watched.get(id) {
                            *slot.found.lock().expect("slot lock") = Some(meta);
                            slot.notify.notify_waiters();
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "memcached result poll failed; polling on");
                    state.failing = Some(e.to_string());
                }
            }
        }
    }
}
