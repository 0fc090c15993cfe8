//! [`SqliteBeatStore`]: beat's lease and entry state in the broker's SQLite file, on the
//! file's connection thread (its docs list the tables and say how the lease guards writes).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use celeriac_core::beat::{BeatStore, EntryState, Lease, Row, lease_holds, next_lease};
use celeriac_core::{BoxFuture, Config, Error, ErrorKind, Result};
use chrono::{DateTime, TimeZone as _, Utc};
use rusqlite::OptionalExtension;
use serde_json::Value;

use crate::conn::{Conn, Db};
use crate::options::{Location, SqliteOptions};

const KIND: ErrorKind = ErrorKind::Backend;

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

/// A beat store in a SQLite file (`sqlite://path.db`), shared by every process that opens the
/// file. Clones share one connection: the file's, which this process's broker and result
/// backend on the same file use too.
///
/// Tables (created on open, next to the broker's; `PRAGMA user_version` is left to the broker's
/// schema):
///
/// - `celeriac_beat_lease(id = 1, holder, token, expires_at)`: the one lease row;
/// - `celeriac_beat_entries(name, spec, paused, triggers, state)`: `spec` is the JSON of an
///   entry added at run time (NULL for entries declared in code or config), `paused` and
///   `triggers` are written by the command line, `state` (JSON) by the leader only.
///
/// Every call is one command on the connection thread that the broker and the result backend
/// of this process use for the same file, so the three never contend for SQLite's write lock
/// with each other and the async runtime never blocks. Writes run in a `BEGIN IMMEDIATE`
/// transaction, so the lease check and the write it guards see the same data and no other
/// process writes in between. Times are Unix milliseconds.
///
/// ```no_run
/// # async fn demo() -> celeriac_core::Result<()> {
/// use celeriac_core::BeatStore;
/// use celeriac_sqlite::{SqliteBeatStore, SqliteOptions};
///
/// let store = SqliteBeatStore::open("celeriac.db", SqliteOptions::default()).await?;
/// for (name, row) in store.load().await? {
///     println!("{name}: paused {}", row.paused);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SqliteBeatStore {
    conn: Arc<Conn>,
}

/// An entry as read, before its JSON columns are decoded (off the connection thread).
type RawRow = (String, Option<String>, i64, i64, Option<String>);

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(v)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

fn read_lease(db: &Db) -> rusqlite::Result<Option<Lease>> {
    db.conn
        .prepare_cached("SELECT holder, token, expires_at FROM celeriac_beat_lease WHERE id = 1")?
        .query_row([], |r| {
            Ok(Lease::new(
                r.get::<_, String>(0)?,
                u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                from_ms(r.get(2)?),
            ))
        })
        .optional()
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, name: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| {
        Error::new(
            KIND,
            format!("beat store: the stored {what} of entry {name:?} is not valid JSON"),
        )
        .with_source(e)
    })
}

impl SqliteBeatStore {
    /// Opens (creating its tables if needed) the store in the SQLite file at `path`, joining
    /// this process's connection to that file if the broker or backend opened it already.
    ///
    /// Fails with [`ErrorKind::Backend`] when the directory is missing, the file is not a
    /// SQLite database, or the database stays locked beyond the `busy_timeout` (transient).
    pub async fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self> {
        Self::open_at(&Location::from_path(path.as_ref()), &options).await
    }

    /// Opens the store for a `sqlite://path` URL (the broker's) with the settings of `config`.
    /// `sqlite://:memory:` is refused: beat instances meet in a file.
    pub async fn connect(url: &str, config: &Config) -> Result<Self> {
        match Location::from_url(url)? {
            Location::Memory => Err(Error::config(format!(
                "beat store url {url:?} names no file (expected sqlite://path/to/file.db)"
            ))),
            location @ Location::File(_) => {
                Self::open_at(&location, &SqliteOptions::from_config(config)).await
            }
        }
    }

    async fn open_at(location: &Location, options: &SqliteOptions) -> Result<Self> {
        let conn = Conn::open(location, options, KIND).await?;
        conn.call(KIND, true, "beat store: cannot create its tables", |db| {
            db.all_or_nothing("beat_tables", |db| db.conn.execute_batch(DDL))
        })
        .await?;
        tracing::debug!(database = %conn.location, "opened sqlite beat store");
        Ok(SqliteBeatStore { conn })
    }

    /// Runs `f` on the connection thread; `write` takes the write lock for the transaction.
    async fn call<T, F>(&self, what: &'static str, write: bool, f: F) -> Result<T>
    where
        F: FnOnce(&mut Db) -> rusqlite::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.conn.call(KIND, write, what, f).await
    }
}

impl BeatStore for SqliteBeatStore {
    fn acquire<'a>(
        &'a self,
        holder: &'a str,
        now: DateTime<Utc>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Lease>>> {
        let holder = holder.to_owned();
        Box::pin(
            self.call("beat store: cannot take the lease", true, move |db| {
                let current = read_lease(db)?;
                let next = next_lease(current.as_ref(), &holder, now, ttl);
                if let Some(l) = &next {
                    db.conn
                        .prepare_cached(
                            "INSERT INTO celeriac_beat_lease (id, holder, token, expires_at) \
                         VALUES (1, ?1, ?2, ?3) ON CONFLICT(id) DO UPDATE SET \
                         holder = excluded.holder, token = excluded.token, \
                         expires_at = excluded.expires_at",
                        )?
                        .execute((
                            &l.holder,
                            i64::try_from(l.token).unwrap_or(i64::MAX),
                            ms(l.expires_at),
                        ))?;
                }
                Ok(next)
            }),
        )
    }

    fn release<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<()>> {
        let (holder, token) = (
            lease.holder.clone(),
            i64::try_from(lease.token).unwrap_or(0),
        );
        Box::pin(
            self.call("beat store: cannot release the lease", true, move |db| {
                db.conn
                    .prepare_cached(
                        "UPDATE celeriac_beat_lease SET expires_at = 0 \
                         WHERE id = 1 AND holder = ?1 AND token = ?2",
                    )?
                    .execute((holder, token))?;
                Ok(())
            }),
        )
    }

    fn load(&self) -> BoxFuture<'_, Result<BTreeMap<String, Row>>> {
        Box::pin(async move {
            let raw: Vec<RawRow> = self
                .call("beat store: cannot read the entries", false, |db| {
                    db.conn
                        .prepare_cached(
                            "SELECT name, spec, paused, triggers, state FROM celeriac_beat_entries",
                        )?
                        .query_map([], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                        })?
                        .collect()
                })
                .await?;
            let mut rows = BTreeMap::new();
            for (name, spec, paused, triggers, state) in raw {
                let mut row = Row::default();
                row.spec = spec
                    .map(|s| decode::<Value>("spec", &name, &s))
                    .transpose()?;
                row.paused = paused != 0;
                row.triggers = u64::try_from(triggers).unwrap_or(0);
                row.state = state
                    .map(|s| decode::<EntryState>("state", &name, &s))
                    .transpose()?;
                rows.insert(name, row);
            }
            Ok(rows)
        })
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
            self.call(
                "beat store: cannot save an entry's state",
                true,
                move |db| {
                    if !lease_holds(read_lease(db)?.as_ref(), &lease, now) {
                        return Ok(false);
                    }
                    db.conn
                        .prepare_cached(
                            "INSERT INTO celeriac_beat_entries (name, state) VALUES (?1, ?2) \
                         ON CONFLICT(name) DO UPDATE SET state = excluded.state",
                        )?
                        .execute((name, state))?;
                    Ok(true)
                },
            )
            .await
        })
    }

    fn put_entry<'a>(&'a self, name: &'a str, spec: &'a Value) -> BoxFuture<'a, Result<()>> {
        let name = name.to_owned();
        let spec = serde_json::to_string(spec);
        Box::pin(async move {
            let spec = spec.map_err(Error::from)?;
            self.call("beat store: cannot add an entry", true, move |db| {
                db.conn
                    .prepare_cached(
                        "INSERT INTO celeriac_beat_entries (name, spec) VALUES (?1, ?2) \
                         ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, state = NULL",
                    )?
                    .execute((name, spec))?;
                Ok(())
            })
            .await
        })
    }

    fn remove_entry<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool>> {
        let name = name.to_owned();
        Box::pin(
            self.call("beat store: cannot remove an entry", true, move |db| {
                let n = db
                    .conn
                    .prepare_cached(
                        "DELETE FROM celeriac_beat_entries WHERE name = ?1 AND spec IS NOT NULL",
                    )?
                    .execute([name])?;
                Ok(n > 0)
            }),
        )
    }

    fn set_paused<'a>(&'a self, name: &'a str, paused: bool) -> BoxFuture<'a, Result<()>> {
        let name = name.to_owned();
        Box::pin(
            self.call("beat store: cannot pause an entry", true, move |db| {
                db.conn
                    .prepare_cached(
                        "INSERT INTO celeriac_beat_entries (name, paused) VALUES (?1, ?2) \
                         ON CONFLICT(name) DO UPDATE SET paused = excluded.paused",
                    )?
                    .execute((name, i64::from(paused)))?;
                Ok(())
            }),
        )
    }

    fn trigger<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        let name = name.to_owned();
        Box::pin(
            self.call("beat store: cannot trigger an entry", true, move |db| {
                db.conn
                    .prepare_cached(
                        "INSERT INTO celeriac_beat_entries (name, triggers) VALUES (?1, 1) \
                         ON CONFLICT(name) DO UPDATE SET triggers = triggers + 1",
                    )?
                    .execute([name])?;
                Ok(())
            }),
        )
    }
}
