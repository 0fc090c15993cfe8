//! [`SqliteStore`]: the beat store in a SQLite file, usually the broker's own.
//!
//! Tables (created on open, next to the broker's; `PRAGMA user_version` is left to the broker):
//!
//! - `celeriac_beat_lease(id = 1, holder, token, expires_at)`: the one lease row;
//! - `celeriac_beat_entries(name, spec, paused, triggers, state)`: `spec` is the JSON of an
//!   entry added at run time (NULL for entries declared in code or config), `paused` and
//!   `triggers` are written by the command line, `state` (JSON) by the leader only.
//!
//! Every call runs one transaction on a blocking thread (`spawn_blocking`), never on the async
//! runtime; writes take the write lock up front (`BEGIN IMMEDIATE`), so the lease check and the
//! write it guards see the same data. Times are Unix milliseconds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celeriac_core::{BoxFuture, Error, ErrorKind, Result};
use chrono::{DateTime, TimeZone as _, Utc};
use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior};

use super::memory::{holds, next_lease};
use super::{BeatStore, EntryState, Lease, Row};
use crate::entry::EntrySpec;

const DDL: &str = "
CREATE TABLE IF NOT EXISTS celeriac_beat_lease (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    holder      TEXT    NOT NULL,
    token       INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS celeriac_beat_entries (
    name        TEXT PRIMARY KEY,
    spec        TEXT,
    paused      INTEGER NOT NULL DEFAULT 0,
    triggers    INTEGER NOT NULL DEFAULT 0,
    state       TEXT
) WITHOUT ROWID;
";

/// A beat store in a SQLite file, shared by every process that opens the file.
///
/// ```
/// # async fn demo() -> celeriac_core::Result<()> {
/// let store = celeriac_beat::SqliteStore::open("celeriac.db").await?;
/// # let _ = store; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

fn failure(what: &str, e: rusqlite::Error) -> Error {
    let busy = matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    );
    let err = Error::new(ErrorKind::Backend, format!("beat store: {what}")).with_source(e);
    if busy { err.transient() } else { err }
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(v)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

fn read_lease(conn: &Connection) -> rusqlite::Result<Option<Lease>> {
    conn.query_row(
        "SELECT holder, token, expires_at FROM celeriac_beat_lease WHERE id = 1",
        [],
        |r| {
            Ok(Lease::new(
                r.get::<_, String>(0)?,
                u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                from_ms(r.get(2)?),
            ))
        },
    )
    .optional()
}

impl SqliteStore {
    /// Opens (creating if needed) the store in the SQLite file at `path`, with a 5 s
    /// `busy_timeout`, in WAL mode.
    pub async fn open(path: impl AsRef<Path>) -> Result<SqliteStore> {
        Self::open_with(path, Duration::from_secs(5)).await
    }

    /// Opens the file a `sqlite://path` URL names.
    pub async fn open_url(url: &str) -> Result<SqliteStore> {
        let path = url
            .strip_prefix("sqlite://")
            .filter(|p| !p.is_empty() && !p.contains(['?', '#']) && *p != ":memory:")
            .ok_or_else(|| {
                Error::config(format!(
                    "beat store url {url:?} names no file (expected sqlite://path/to/file.db)"
                ))
            })?;
        Self::open(path).await
    }

    /// Like [`SqliteStore::open`], waiting up to `busy_timeout` for other processes' locks.
    pub async fn open_with(path: impl AsRef<Path>, busy_timeout: Duration) -> Result<SqliteStore> {
        let path = path.as_ref().to_owned();
        let p = path.clone();
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection> {
            let what = format!("cannot open {}", p.display());
            let conn = Connection::open(&p).map_err(|e| failure(&what, e))?;
            conn.busy_timeout(busy_timeout)
                .map_err(|e| failure(&what, e))?;
            conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))
                .map_err(|e| failure(&what, e))?;
            conn.pragma_update(None, "synchronous", "NORMAL")
                .map_err(|e| failure(&what, e))?;
            conn.execute_batch(DDL).map_err(|e| failure(&what, e))?;
            Ok(conn)
        })
        .await
        .map_err(|e| {
            Error::new(ErrorKind::Backend, "beat store: open panicked").with_source(e)
        })??;
        tracing::debug!(path = %path.display(), "opened sqlite beat store");
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in one transaction on a blocking thread.
    async fn run<T, F>(&self, what: &'static str, write: bool, f: F) -> Result<T>
    where
        F: FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().expect("beat store connection lock");
            let behavior = if write {
                TransactionBehavior::Immediate
            } else {
                TransactionBehavior::Deferred
            };
            let tx = conn.transaction_with_behavior(behavior)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
        .await
        .map_err(|e| {
            Error::new(ErrorKind::Backend, format!("beat store: {what} panicked")).with_source(e)
        })?
        .map_err(|e| failure(what, e))
    }
}

impl BeatStore for SqliteStore {
    fn acquire<'a>(
        &'a self,
        holder: &'a str,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Lease>>> {
        let holder = holder.to_owned();
        Box::pin(self.run("cannot take the lease", true, move |tx| {
            let current = read_lease(tx)?;
            let next = next_lease(current.as_ref(), &holder, now, ttl);
            if let Some(l) = &next {
                tx.execute(
                    "INSERT INTO celeriac_beat_lease (id, holder, token, expires_at) \
                     VALUES (1, ?1, ?2, ?3) ON CONFLICT(id) DO UPDATE SET \
                     holder = excluded.holder, token = excluded.token, \
                     expires_at = excluded.expires_at",
                    (
                        &l.holder,
                        i64::try_from(l.token).unwrap_or(i64::MAX),
                        ms(l.expires_at),
                    ),
                )?;
            }
            Ok(next)
        }))
    }

    fn release<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<()>> {
        let (holder, token) = (
            lease.holder.clone(),
            i64::try_from(lease.token).unwrap_or(0),
        );
        Box::pin(self.run("cannot release the lease", true, move |tx| {
            tx.execute(
                "UPDATE celeriac_beat_lease SET expires_at = 0 \
                 WHERE id = 1 AND holder = ?1 AND token = ?2",
                (holder, token),
            )?;
            Ok(())
        }))
    }

    fn load(&self) -> BoxFuture<'_, Result<BTreeMap<String, Row>>> {
        Box::pin(self.run("cannot read the entries", false, |tx| {
            let mut stmt = tx.prepare_cached(
                "SELECT name, spec, paused, triggers, state FROM celeriac_beat_entries",
            )?;
            let rows = stmt.query_map([], |r| {
                let spec: Option<String> = r.get(1)?;
                let state: Option<String> = r.get(4)?;
                let spec = spec
                    .map(|s| serde_json::from_str::<EntrySpec>(&s))
                    .transpose()
                    .map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(
                            1,
                            rusqlite::types::Type::Text,
                            Box::new(e),
                        )
                    })?;
                let state = state
                    .map(|s| serde_json::from_str::<EntryState>(&s))
                    .transpose()
                    .map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(
                            4,
                            rusqlite::types::Type::Text,
                            Box::new(e),
                        )
                    })?;
                Ok((
                    r.get::<_, String>(0)?,
                    Row {
                        spec,
                        paused: r.get::<_, i64>(2)? != 0,
                        triggers: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
                        state,
                    },
                ))
            })?;
            rows.collect()
        }))
    }

    fn save<'a>(
        &'a self,
        lease: &'a Lease,
        now: DateTime<Utc>,
        name: &'a str,
        state: &'a EntryState,
    ) -> BoxFuture<'a, Result<bool>> {
        let lease = lease.clone();
        let name = name.to_owned();
        let state = serde_json::to_string(state);
        Box::pin(async move {
            let state = state.map_err(Error::from)?;
            self.run("cannot save an entry's state", true, move |tx| {
                if !holds(read_lease(tx)?.as_ref(), &lease, now) {
                    return Ok(false);
                }
                tx.execute(
                    "INSERT INTO celeriac_beat_entries (name, state) VALUES (?1, ?2) \
                     ON CONFLICT(name) DO UPDATE SET state = excluded.state",
                    (name, state),
                )?;
                Ok(true)
            })
            .await
        })
    }

    fn put_entry<'a>(&'a self, name: &'a str, spec: &'a EntrySpec) -> BoxFuture<'a, Result<()>> {
        let name = name.to_owned();
        let spec = serde_json::to_string(spec);
        Box::pin(async move {
            let spec = spec.map_err(Error::from)?;
            self.run("cannot add an entry", true, move |tx| {
                tx.execute(
                    "INSERT INTO celeriac_beat_entries (name, spec) VALUES (?1, ?2) \
                     ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, state = NULL",
                    (name, spec),
                )?;
                Ok(())
            })
            .await
        })
    }

    fn remove_entry<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool>> {
        let name = name.to_owned();
        Box::pin(self.run("cannot remove an entry", true, move |tx| {
            let n = tx.execute(
                "DELETE FROM celeriac_beat_entries WHERE name = ?1 AND spec IS NOT NULL",
                [name],
            )?;
            Ok(n > 0)
        }))
    }

    fn set_paused<'a>(&'a self, name: &'a str, paused: bool) -> BoxFuture<'a, Result<()>> {
        let name = name.to_owned();
        Box::pin(self.run("cannot pause an entry", true, move |tx| {
            tx.execute(
                "INSERT INTO celeriac_beat_entries (name, paused) VALUES (?1, ?2) \
                 ON CONFLICT(name) DO UPDATE SET paused = excluded.paused",
                (name, i64::from(paused)),
            )?;
            Ok(())
        }))
    }

    fn trigger<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        let name = name.to_owned();
        Box::pin(self.run("cannot trigger an entry", true, move |tx| {
            tx.execute(
                "INSERT INTO celeriac_beat_entries (name, triggers) VALUES (?1, 1) \
                 ON CONFLICT(name) DO UPDATE SET triggers = triggers + 1",
                [name],
            )?;
            Ok(())
        }))
    }
}
