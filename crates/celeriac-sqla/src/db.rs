//! The connection pool of either database, and how its errors become celeriac's.

use std::time::Duration;

use celeriac_core::{Config, Error, ErrorKind, Result};

use crate::url::{DbUrl, Dialect};

/// A pool on PostgreSQL or MariaDB/MySQL.
#[derive(Debug, Clone)]
pub(crate) enum Pool {
    #[cfg(feature = "postgres")]
    Pg(sqlx::PgPool),
    #[cfg(feature = "mysql")]
    My(sqlx::MySqlPool),
}

/// How many connections a pool may open: the worker's concurrency and a few for its
/// consumer, waits and sweeps, at most 16 (a store holds a connection for one statement, and
/// PostgreSQL allows 100 connections in all by default).
pub(crate) fn pool_size(config: &Config) -> u32 {
    u32::try_from(config.worker.concurrency.clamp(1, 12)).unwrap_or(12) + 4
}

impl Pool {
    pub(crate) async fn connect(url: &DbUrl, config: &Config, kind: ErrorKind) -> Result<Self> {
        let size = pool_size(config);
        let what = format!("cannot connect to {}", url.dialect.name());
        match url.dialect {
            #[cfg(feature = "postgres")]
            Dialect::Postgres => {
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(size)
                    .acquire_timeout(Duration::from_secs(30))
                    .connect(&url.connect)
                    .await
                    .map_err(|e| map_err(kind, &what, e))?;
                Ok(Pool::Pg(pool))
            }
            #[cfg(feature = "mysql")]
            Dialect::MySql => {
                let pool = sqlx::mysql::MySqlPoolOptions::new()
                    .max_connections(size)
                    .acquire_timeout(Duration::from_secs(30))
                    // InnoDB's default REPEATABLE READ takes gap locks on every range an
                    // UPDATE or DELETE scans, which deadlocks concurrent consumers; READ
                    // COMMITTED locks only the rows it changes.
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            use sqlx::Executor as _;
                            conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                                .await
                                .map(|_| ())
                        })
                    })
                    .connect(&url.connect)
                    .await
                    .map_err(|e| map_err(kind, &what, e))?;
                Ok(Pool::My(pool))
            }
            #[allow(unreachable_patterns)]
            other => Err(Error::config(format!(
                "celeriac-sqla was built without the `{}` feature",
                match other {
                    Dialect::Postgres => "postgres",
                    Dialect::MySql => "mysql",
                }
            ))),
        }
    }

    pub(crate) async fn close(&self) {
        match self {
            #[cfg(feature = "postgres")]
            Pool::Pg(p) => p.close().await,
            #[cfg(feature = "mysql")]
            Pool::My(p) => p.close().await,
        }
    }
}

/// Wraps a sqlx error: lowercase context, the cause as source, transient when a retry may
/// succeed (connection lost, pool exhausted, deadlock, serialization failure).
pub(crate) fn map_err(kind: ErrorKind, what: &str, e: sqlx::Error) -> Error {
    let transient = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => {
            // 40001 serialization failure, 40P01 deadlock (PostgreSQL); 40001 / 1213 deadlock,
            // 1205 lock wait timeout (MySQL); 57P01 admin shutdown; 08xxx connection.
            let code = db.code().unwrap_or_default();
            matches!(code.as_ref(), "40001" | "40P01" | "57P01")
                || code.starts_with("08")
                || matches!(mysql_number(db.as_ref()), Some(1213 | 1205))
        }
        _ => false,
    };
    let hint = match &e {
        sqlx::Error::Database(db) => {
            match (
                db.code().unwrap_or_default().as_ref(),
                mysql_number(db.as_ref()),
            ) {
                ("28P01" | "28000", _) | (_, Some(1045)) => " (wrong user or password)",
                ("3D000", _) | (_, Some(1049)) => " (the database does not exist)",
                ("42501", _) | (_, Some(1142 | 1044 | 1227)) => " (missing permission)",
                ("42P01", _) | (_, Some(1146)) => " (a table is missing)",
                _ => "",
            }
        }
        _ => "",
    };
    let mut err = Error::new(kind, format!("{what}{hint}")).with_source(e);
    if transient {
        err = err.transient();
    }
    err
}

/// MySQL's own error number (1213 deadlock, 1049 unknown database, ...), which its SQLSTATE
/// does not tell apart.
fn mysql_number(db: &dyn sqlx::error::DatabaseError) -> Option<u16> {
    #[cfg(feature = "mysql")]
    {
        db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .map(sqlx::mysql::MySqlDatabaseError::number)
    }
    #[cfg(not(feature = "mysql"))]
    {
        let _ = db;
        None
    }
}

/// Whether `e` is a unique-key violation.
pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// Quotes a (checked) identifier, schema-qualified when `schema` is given.
pub(crate) fn quote(dialect: Dialect, schema: Option<&str>, name: &str) -> String {
    let q = |s: &str| match dialect {
        Dialect::Postgres => format!("\"{s}\""),
        Dialect::MySql => format!("`{s}`"),
    };
    match schema {
        Some(s) => format!("{}.{}", q(s), q(name)),
        None => q(name),
    }
}

/// Now, as the naive UTC time the `DateTime` columns hold.
pub(crate) fn now_naive() -> chrono::NaiveDateTime {
    chrono::Utc::now().naive_utc()
}

/// Whether `e` is a deadlock or serialization failure, after which the statement can simply
/// run again.
pub(crate) fn is_retryable(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if matches!(db.code().unwrap_or_default().as_ref(), "40001" | "40P01")
            || mysql_number(db.as_ref()) == Some(1213))
}

/// Runs `f` again (up to five times in all, a few milliseconds apart) while it fails with a
/// deadlock or serialization failure of the database.
pub(crate) async fn retry_deadlocks<T, F, Fut>(mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempt = 0u32;
    loop {
        match f().await {
            Err(e) if attempt < 4 && deadlocked(&e) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(u64::from(attempt) * 2)).await;
            }
            other => return other,
        }
    }
}

fn deadlocked(e: &Error) -> bool {
    use std::error::Error as _;
    e.source()
        .and_then(|s| s.downcast_ref::<sqlx::Error>())
        .is_some_and(is_retryable)
}
