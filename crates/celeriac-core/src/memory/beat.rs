//! [`MemoryBeatStore`]: the beat store for one process (tests, embedded use).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::beat::{BeatStore, EntryState, Lease, Row, lease_holds, next_lease};
use crate::broker::BoxFuture;
use crate::error::Result;

/// A beat store in memory (`memory://`). Clones share the same data, so several beat instances
/// of one process (a test) can compete for its lease.
///
/// ```
/// let store = celeriac_core::memory::MemoryBeatStore::new();
/// # let _ = store;
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryBeatStore {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    lease: Option<Lease>,
    rows: BTreeMap<String, Row>,
}

impl MemoryBeatStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryBeatStore::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().expect("beat store lock"))
    }
}

impl BeatStore for MemoryBeatStore {
    fn acquire<'a>(
        &'a self,
        holder: &'a str,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Lease>>> {
        Box::pin(async move {
            Ok(self.with(|i| {
                let next = next_lease(i.lease.as_ref(), holder, now, ttl);
                if let Some(l) = &next {
                    i.lease = Some(l.clone());
                }
                next
            }))
        })
    }

    fn release<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.with(|i| {
                if let Some(l) = &mut i.lease {
                    if l.token == lease.token && l.holder == lease.holder {
                        l.expires_at = DateTime::<Utc>::MIN_UTC;
                    }
                }
            });
            Ok(())
        })
    }

    fn load(&self) -> BoxFuture<'_, Result<BTreeMap<String, Row>>> {
        Box::pin(async move { Ok(self.with(|i| i.rows.clone())) })
    }

    fn save<'a>(
        &'a self,
        lease: &'a Lease,
        now: DateTime<Utc>,
        name: &'a str,
        state: &'a EntryState,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            Ok(self.with(|i| {
                if !lease_holds(i.lease.as_ref(), lease, now) {
                    return false;
                }
                i.rows.entry(name.to_owned()).or_default().state = Some(state.clone());
                true
            }))
        })
    }

    fn put_entry<'a>(&'a self, name: &'a str, spec: &'a Value) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.with(|i| {
                let row = i.rows.entry(name.to_owned()).or_default();
                row.spec = Some(spec.clone());
                row.state = None;
            });
            Ok(())
        })
    }

    fn remove_entry<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            Ok(self.with(|i| match i.rows.get(name) {
                Some(r) if r.spec.is_some() => i.rows.remove(name).is_some(),
                _ => false,
            }))
        })
    }

    fn set_paused<'a>(&'a self, name: &'a str, paused: bool) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.with(|i| i.rows.entry(name.to_owned()).or_default().paused = paused);
            Ok(())
        })
    }

    fn trigger<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.with(|i| i.rows.entry(name.to_owned()).or_default().triggers += 1);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        crate::time::parse(s).unwrap()
    }

    #[tokio::test]
    async fn lease_terms_and_fencing() {
        let s = MemoryBeatStore::new();
        let ttl = Duration::from_secs(10);
        let now = t("2026-01-01T00:00:00Z");
        let a = s.acquire("a", now, ttl).await.unwrap().unwrap();
        assert_eq!(a.token, 1);
        assert!(s.acquire("b", now, ttl).await.unwrap().is_none());
        // Renewal keeps the token.
        let a2 = s
            .acquire("a", t("2026-01-01T00:00:05Z"), ttl)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a2.token, 1);
        // Lapsed: b takes a new term; a can no longer write.
        let later = t("2026-01-01T00:00:16Z");
        let b = s.acquire("b", later, ttl).await.unwrap().unwrap();
        assert_eq!(b.token, 2);
        let st = EntryState::new(now);
        assert!(!s.save(&a2, later, "e", &st).await.unwrap());
        assert!(s.save(&b, later, "e", &st).await.unwrap());
        // Expired leases cannot write either, even with the right token.
        assert!(
            !s.save(&b, t("2026-01-01T00:01:00Z"), "e", &st)
                .await
                .unwrap()
        );
        s.release(&b).await.unwrap();
        let a3 = s.acquire("a", later, ttl).await.unwrap().unwrap();
        assert_eq!(a3.token, 3);
    }
}
