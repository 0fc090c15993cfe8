//! Coordination across workers on the result backend's database: cluster rate limits,
//! unique-task locks and concurrency slots ([`celeriac_core::coord`]).
//!
//! Two tables, created on first use (so that databases made before them get them too, and a
//! user who never coordinates needs no `CREATE` privilege for them):
//!
//! - `celeriac_coord_keys(key_hash, name, holder, until_us)`: one row per rate-limited key
//!   (`until_us` = its GCRA time), per lock (its holder and expiry) and per slot key (an
//!   anchor row that takers of the key's slots lock first);
//! - `celeriac_coord_slots(key_hash, holder_hash, name, holder, until_us)`: one row per
//!   leased slot.
//!
//! Keys are the caller's and can be long (a unique task's key holds its arguments), longer
//! than an InnoDB index allows: rows are keyed by the SHA-256 of the key (and of the slot's
//! holder), computed by the server, and keep the text beside it for people reading them.
//!
//! **One step each.** Every method is one transaction: it locks the key's row with
//! `SELECT … FOR UPDATE` (creating it first when missing), decides in Rust with the arithmetic
//! of core ([`celeriac_core::coord::gcra`]), and writes. Concurrent callers of one key queue
//! on that row lock; a deadlock (concurrent first inserts of one key) runs the transaction
//! again.
//!
//! **The server's clock.** Times are microseconds of the server's clock, read in the locking
//! `SELECT` with `SYSDATE(6)` (the time the row is read, after any wait for its lock; `NOW()`
//! would be when the statement began). Only the values computed from it are written, so
//! statement-based replication sees literals.

use std::time::Duration;

use celeriac_core::coord::{Admission, Coordination};
use celeriac_core::{BoxFuture, ErrorKind, RateLimit, Result};
use sqlx::mysql::MySql;
use sqlx::{Executor as _, Row as _, Transaction};

use crate::backend::MysqlBackend;
use crate::db::{self, map_err};

const KIND: ErrorKind = ErrorKind::Backend;

/// The tables, each statement idempotent.
const DDL: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS celeriac_coord_keys (
        key_hash    BINARY(32) NOT NULL PRIMARY KEY,
        name        LONGTEXT NOT NULL,
        holder      LONGTEXT NULL,
        until_us    BIGINT NOT NULL
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    "CREATE TABLE IF NOT EXISTS celeriac_coord_slots (
        key_hash    BINARY(32) NOT NULL,
        holder_hash BINARY(32) NOT NULL,
        name        LONGTEXT NOT NULL,
        holder      LONGTEXT NOT NULL,
        until_us    BIGINT NOT NULL,
        PRIMARY KEY (key_hash, holder_hash)
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
];

/// The row key of a text parameter: its SHA-256 as 32 bytes (of its UTF-8, whatever the
/// connection's character set).
macro_rules! hash {
    () => {
        "UNHEX(SHA2(CONVERT(? USING utf8mb4), 256))"
    };
}

/// Locks the row of `name`, creating it (no holder, time 0) when missing; returns its holder,
/// its time and the server's time (µs) once the lock is held.
const LOCK_KEY: &str = concat!(
    "SELECT holder, until_us, CAST(UNIX_TIMESTAMP(SYSDATE(6)) * 1000000 AS SIGNED) \
     FROM celeriac_coord_keys WHERE key_hash = ",
    hash!(),
    " FOR UPDATE"
);
const CREATE_KEY: &str = concat!(
    "INSERT INTO celeriac_coord_keys (key_hash, name, holder, until_us) VALUES (",
    hash!(),
    ", ?, NULL, 0) ON DUPLICATE KEY UPDATE until_us = until_us"
);
const SET_KEY: &str = concat!(
    "UPDATE celeriac_coord_keys SET holder = ?, until_us = ? WHERE key_hash = ",
    hash!()
);

/// A key's row, locked for this transaction.
struct Locked {
    holder: Option<String>,
    until: i64,
    now: i64,
}

async fn lock_key(tx: &mut Transaction<'static, MySql>, name: &str) -> sqlx::Result<Locked> {
    for _ in 0..2 {
        let row = sqlx::query(LOCK_KEY)
            .bind(name)
            .fetch_optional(&mut **tx)
            .await?;
        if let Some(r) = row {
            return Ok(Locked {
                holder: r.try_get(0)?,
                until: r.try_get(1)?,
                now: r.try_get(2)?,
            });
        }
        // Concurrent creators of one key wait for the first one's row lock.
        sqlx::query(CREATE_KEY)
            .bind(name)
            .bind(name)
            .execute(&mut **tx)
            .await?;
    }
    Err(sqlx::Error::RowNotFound)
}

/// `d` in microseconds, saturating.
fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX / 4)
}

impl MysqlBackend {
    /// Creates the coordination tables once per backend (when missing).
    async fn coord_tables(&self) -> Result<()> {
        self.check_open()?;
        self.coord_ready()
            .get_or_try_init(|| async {
                let what = "cannot create the mysql coordination tables";
                let mut conn = self
                    .pool()
                    .acquire()
                    .await
                    .map_err(|e| map_err(KIND, what, e))?;
                // Present (an administrator may have made them for a user who may not
                // create tables): nothing to do.
                let present = conn
                    .execute("SELECT 1 FROM celeriac_coord_keys, celeriac_coord_slots WHERE 1 = 0")
                    .await;
                match present {
                    Ok(_) => return Ok(()),
                    Err(e) if db::db_number(&e) == Some(1146) => {}
                    Err(e) => return Err(map_err(KIND, what, e)),
                }
                // `CREATE TABLE IF NOT EXISTS` is safe under concurrency on MariaDB and MySQL
                // (the metadata lock serializes creators; the later ones find the table).
                for ddl in DDL {
                    conn.execute(ddl)
                        .await
                        .map_err(|e| map_err(KIND, what, e))?;
                }
                tracing::debug!("created the mysql coordination tables");
                Ok(())
            })
            .await
            .map(|_| ())
    }
}

/// Cluster rate limits, unique-task locks and concurrency slots as rows (see the module docs),
/// each step one transaction on the server's clock.
impl Coordination for MysqlBackend {
    fn throttle<'a>(&'a self, key: &'a str, limit: RateLimit) -> BoxFuture<'a, Result<Admission>> {
        Box::pin(async move {
            self.coord_tables().await?;
            let name = format!("rate:{key}");
            let name = name.as_str();
            let pool = self.pool();
            db::retry(KIND, "cannot throttle on mysql", || async move {
                let mut tx = pool.begin().await?;
                let row = lock_key(&mut tx, name).await?;
                let (tat, now) = (row.until.max(0) as u64, row.now.max(0) as u64);
                let (admission, next) = celeriac_core::coord::gcra_admission(tat, now, limit);
                if let Some(next) = next {
                    sqlx::query(SET_KEY)
                        .bind(None::<&str>)
                        .bind(i64::try_from(next).unwrap_or(i64::MAX))
                        .bind(name)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(admission)
            })
            .await
        })
    }

    fn lock<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<String>> {
        Box::pin(async move {
            self.coord_tables().await?;
            let name = format!("lock:{key}");
            let name = name.as_str();
            let pool = self.pool();
            db::retry(KIND, "cannot take a mysql lock", || async move {
                let mut tx = pool.begin().await?;
                let row = lock_key(&mut tx, name).await?;
                let free = match &row.holder {
                    None => true,
                    Some(h) => h == holder || row.until <= row.now,
                };
                let after = if free {
                    sqlx::query(SET_KEY)
                        .bind(holder)
                        .bind(row.now.saturating_add(micros(ttl)))
                        .bind(name)
                        .execute(&mut *tx)
                        .await?;
                    holder.to_owned()
                } else {
                    row.holder.unwrap_or_default()
                };
                tx.commit().await?;
                Ok(after)
            })
            .await
        })
    }

    fn unlock<'a>(&'a self, key: &'a str, holder: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            self.coord_tables().await?;
            let done = sqlx::query(concat!(
                "DELETE FROM celeriac_coord_keys WHERE key_hash = ",
                hash!(),
                " AND holder = ?"
            ))
            .bind(format!("lock:{key}"))
            .bind(holder)
            .execute(self.pool())
            .await
            .map_err(|e| map_err(KIND, "cannot release a mysql lock", e))?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn acquire<'a>(
        &'a self,
        key: &'a str,
        holder: &'a str,
        limit: u32,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            self.coord_tables().await?;
            let anchor = format!("slots:{key}");
            let anchor = anchor.as_str();
            let pool = self.pool();
            db::retry(KIND, "cannot take a mysql slot", || async move {
                let mut tx = pool.begin().await?;
                // The key's anchor row serializes its takers, so that they count the same
                // rows.
                let now = lock_key(&mut tx, anchor).await?.now;
                sqlx::query(concat!(
                    "DELETE FROM celeriac_coord_slots WHERE key_hash = ",
                    hash!(),
                    " AND until_us <= ?"
                ))
                .bind(key)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                let row = sqlx::query(concat!(
                    "SELECT COUNT(*), CAST(COALESCE(SUM(holder_hash = ",
                    hash!(),
                    "), 0) AS SIGNED) FROM celeriac_coord_slots WHERE key_hash = ",
                    hash!()
                ))
                .bind(holder)
                .bind(key)
                .fetch_one(&mut *tx)
                .await?;
                let (held, mine): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
                if mine == 0 && held >= i64::from(limit) {
                    tx.commit().await?;
                    return Ok(false);
                }
                sqlx::query(concat!(
                    "INSERT INTO celeriac_coord_slots (key_hash, holder_hash, name, holder, until_us) \
                     VALUES (",
                    hash!(),
                    ", ",
                    hash!(),
                    ", ?, ?, ?) ON DUPLICATE KEY UPDATE until_us = VALUES(until_us)"
                ))
                .bind(key)
                .bind(holder)
                .bind(key)
                .bind(holder)
                .bind(now.saturating_add(micros(ttl)))
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(true)
            })
            .await
        })
    }

    fn release<'a>(&'a self, key: &'a str, holder: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.coord_tables().await?;
            sqlx::query(concat!(
                "DELETE FROM celeriac_coord_slots WHERE key_hash = ",
                hash!(),
                " AND holder_hash = ",
                hash!()
            ))
            .bind(key)
            .bind(holder)
            .execute(self.pool())
            .await
            .map_err(|e| map_err(KIND, "cannot free a mysql slot", e))?;
            Ok(())
        })
    }
}
