use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::backend::{ResultBackend, timeout_error};
use crate::broker::BoxFuture;
use crate::error::Result;
use crate::meta::TaskMeta;

/// An in-memory result backend (`memory://`). Clones share the same store.
#[derive(Debug, Clone, Default)]
pub struct MemoryBackend {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    state: Mutex<State>,
    changed: Notify,
    coord: crate::coord::LocalCoordination,
}

#[derive(Debug, Default)]
struct State {
    results: HashMap<String, TaskMeta>,
    groups: HashMap<String, Vec<String>>,
    counters: HashMap<String, i64>,
}

impl MemoryBackend {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().expect("memory backend lock")
    }
}

impl ResultBackend for MemoryBackend {
    fn driver(&self) -> &'static str {
        "memory"
    }

    fn store<'a>(&'a self, meta: &'a TaskMeta) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let mut state = self.lock();
            if let Some(old) = state.results.get(&meta.task_id) {
                if !old.status.may_be_replaced_by(&meta.status) {
                    return Ok(false);
                }
            }
            state.results.insert(meta.task_id.clone(), meta.clone());
            drop(state);
            self.inner.changed.notify_waiters();
            Ok(true)
        })
    }

    fn get<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Result<Option<TaskMeta>>> {
        Box::pin(async move { Ok(self.lock().results.get(task_id).cloned()) })
    }

    fn wait<'a>(
        &'a self,
        task_id: &'a str,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<TaskMeta>> {
        Box::pin(async move {
            let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
            loop {
                let notified = self.inner.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Some(meta) = self.lock().results.get(task_id) {
                    if meta.status.is_ready() {
                        return Ok(meta.clone());
                    }
                }
                match deadline {
                    Some(d) => {
                        if tokio::time::timeout_at(d, notified).await.is_err() {
                            return Err(timeout_error(task_id, timeout));
                        }
                    }
                    None => notified.await,
                }
            }
        })
    }

    fn forget<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.lock().results.remove(task_id);
            Ok(())
        })
    }

    fn save_group<'a>(
        &'a self,
        group_id: &'a str,
        task_ids: &'a [String],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.lock()
                .groups
                .insert(group_id.to_owned(), task_ids.to_vec());
            Ok(())
        })
    }

    fn restore_group<'a>(
        &'a self,
        group_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<String>>>> {
        Box::pin(async move { Ok(self.lock().groups.get(group_id).cloned()) })
    }

    fn capabilities(&self) -> crate::BackendCapabilities<'_> {
        crate::BackendCapabilities::none().coordination(&self.inner.coord)
    }

    fn incr<'a>(&'a self, key: &'a str, by: i64) -> BoxFuture<'a, Result<i64>> {
        Box::pin(async move {
            let mut state = self.lock();
            let c = state.counters.entry(key.to_owned()).or_insert(0);
            *c += by;
            Ok(*c)
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
}
