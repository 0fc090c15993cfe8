//! [`MemoryStore`]: the beat store for one process (tests, embedded use).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celeriac_core::{BoxFuture, Result};
use chrono::{DateTime, Utc};

use super::{BeatStore, EntryState, Lease, Row};
use crate::entry::EntrySpec;

/// A beat store in memory. Clones share the same data, so several beat instances of one
/// process (a test) can compete for its lease.
///
/// ```
/// let store = celeriac_beat::MemoryStore::new();
/// # let _ = store;
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    lease: Option<Lease>,
    rows: BTreeMap<String, Row>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().expect("beat store lock"))
    }
}

fn ttl_of(ttl: Duration) -> chrono::Duration {
    chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX)
}

/// The lease rule every store follows; `current` is the stored lease.
pub(crate) fn next_lease(
    current: Option<&Lease>,
    holder: &str,
    now: DateTime<Utc>,
    ttl: Duration,
) -> Option<Lease> {
    let expires_at = now + ttl_of(ttl);
    match current {
        None => Some(Lease::new(holder, 1, expires_at)),
        Some(l) if l.expires_at > now && l.holder == holder => {
            Some(Lease::new(holder, l.token, expires_at))
        }
        Some(l) if l.expires_at <= now => Some(Lease::new(holder, l.token + 1, expires_at)),
        Some(_) => None,
    }
}

/// Whether `lease` may still write at `now`, given the stored one.
pub(crate) fn holds(current: Option<&Lease>, lease: &Lease, now: DateTime<Utc>) -> bool {
    current
        .is_some_and(|c| c.token == lease.token && c.holder == lease.holder && c.expires_at > now)
}

impl BeatStore for MemoryStore {
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
                if !holds(i.lease.as_ref(), lease, now) {
                    return false;
                }
                i.rows.entry(name.to_owned()).or_default().state = Some(state.clone());
                true
            }))
        })
    }

    fn put_entry<'a>(&'a self, name: &'a str, spec: &'a EntrySpec) -> BoxFuture<'a, Result<()>> {
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
        celeriac_core::time::parse(s).unwrap()
    }

    #[tokio::test]
    async fn lease_terms_and_fencing() {
        let s = MemoryStore::new();
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
