//! What the tables look like: found in the database, or created as Celery and kombu create
//! them.

use std::collections::HashSet;

use celeriac_core::{ErrorKind, Result};

use crate::db::{Pool, map_err, quote};
use crate::url::Dialect;

/// Runs `body` with `$p` bound to the pool of whichever database `pool` is on.
macro_rules! on_pool {
    ($pool:expr, $p:ident => $body:expr) => {
        match $pool {
            #[cfg(feature = "postgres")]
            $crate::db::Pool::Pg($p) => $body,
            #[cfg(feature = "mysql")]
            $crate::db::Pool::My($p) => $body,
        }
    };
}
pub(crate) use on_pool;

/// A SQL string built at run time from checked identifiers.
pub(crate) fn sql(s: &str) -> sqlx::AssertSqlSafe<std::sync::Arc<str>> {
    sqlx::AssertSqlSafe(std::sync::Arc::from(s))
}

/// The server: which dialect, and on MySQL whether it is MariaDB (which has sequences).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Server {
    pub dialect: Dialect,
    pub mariadb: bool,
}

impl Server {
    pub(crate) async fn detect(pool: &Pool, kind: ErrorKind) -> Result<Self> {
        let version: String = on_pool!(pool, p => sqlx::query_scalar("SELECT VERSION()")
            .fetch_one(p)
            .await)
        .map_err(|e| map_err(kind, "cannot read the server version", e))?;
        let dialect = match pool {
            #[cfg(feature = "postgres")]
            Pool::Pg(_) => Dialect::Postgres,
            #[cfg(feature = "mysql")]
            Pool::My(_) => Dialect::MySql,
        };
        Ok(Server {
            dialect,
            mariadb: version.contains("MariaDB"),
        })
    }

    /// Whether `CREATE SEQUENCE` exists (PostgreSQL, MariaDB ≥ 10.3), as SQLAlchemy decides.
    pub(crate) fn has_sequences(self) -> bool {
        self.dialect == Dialect::Postgres || self.mariadb
    }

    /// The type of SQLAlchemy's `LargeBinary`.
    pub(crate) fn blob(self) -> &'static str {
        match self.dialect {
            Dialect::Postgres => "BYTEA",
            // SQLAlchemy's BLOB holds 64 KiB; ours takes what a result needs.
            Dialect::MySql => "LONGBLOB",
        }
    }

    /// The type of SQLAlchemy's `Text`.
    pub(crate) fn text(self) -> &'static str {
        match self.dialect {
            Dialect::Postgres => "TEXT",
            Dialect::MySql => "LONGTEXT",
        }
    }

    /// The type of SQLAlchemy's `DateTime` (naive, UTC by convention).
    pub(crate) fn datetime(self) -> &'static str {
        match self.dialect {
            Dialect::Postgres => "TIMESTAMP WITHOUT TIME ZONE",
            // SQLAlchemy's DATETIME keeps whole seconds; ours keeps microseconds.
            Dialect::MySql => "DATETIME(6)",
        }
    }

    /// The expression of the next value of `sequence`.
    pub(crate) fn nextval(self, schema: Option<&str>, sequence: &str) -> String {
        let q = quote(self.dialect, schema, sequence);
        match self.dialect {
            Dialect::Postgres => format!("nextval('{}')", q.replace('\'', "''")),
            Dialect::MySql => format!("NEXTVAL({q})"),
        }
    }

    /// A bind parameter (`$n` or `?`).
    pub(crate) fn param(self, n: usize) -> String {
        match self.dialect {
            Dialect::Postgres => format!("${n}"),
            Dialect::MySql => "?".to_owned(),
        }
    }
}

/// The columns of `table` (lowercase), empty when it does not exist.
pub(crate) async fn columns(
    pool: &Pool,
    schema: Option<&str>,
    table: &str,
    kind: ErrorKind,
) -> Result<HashSet<String>> {
    let names: Vec<String> = on_pool!(pool, p => {
        let q = match pool {
            #[cfg(feature = "postgres")]
            Pool::Pg(_) => "SELECT column_name::text FROM information_schema.columns \
                 WHERE table_schema = COALESCE($1, current_schema()) AND table_name = $2",
            #[cfg(feature = "mysql")]
            Pool::My(_) => "SELECT CAST(column_name AS CHAR) FROM information_schema.columns \
                 WHERE table_schema = COALESCE(?, DATABASE()) AND table_name = ?",
        };
        sqlx::query_scalar(q).bind(schema).bind(table).fetch_all(p).await
    })
    .map_err(|e| map_err(kind, &format!("cannot read the columns of {table}"), e))?;
    Ok(names.into_iter().map(|n| n.to_ascii_lowercase()).collect())
}

/// Whether `sequence` exists.
pub(crate) async fn sequence_exists(
    pool: &Pool,
    server: Server,
    schema: Option<&str>,
    sequence: &str,
    kind: ErrorKind,
) -> Result<bool> {
    if !server.has_sequences() {
        return Ok(false);
    }
    let n: i64 = on_pool!(pool, p => {
        let q = match pool {
            #[cfg(feature = "postgres")]
            Pool::Pg(_) => "SELECT COUNT(*) FROM information_schema.sequences \
                 WHERE sequence_schema = COALESCE($1, current_schema()) AND sequence_name = $2",
            #[cfg(feature = "mysql")]
            Pool::My(_) => "SELECT COUNT(*) FROM information_schema.tables \
                 WHERE table_schema = COALESCE(?, DATABASE()) AND table_name = ? \
                 AND table_type = 'SEQUENCE'",
        };
        sqlx::query_scalar(q).bind(schema).bind(sequence).fetch_one(p).await
    })
    .map_err(|e| map_err(kind, &format!("cannot look for sequence {sequence}"), e))?;
    Ok(n > 0)
}

/// Runs DDL statements one by one. Concurrent creators may race (PostgreSQL's
/// `IF NOT EXISTS` is not atomic): the caller retries once.
pub(crate) async fn run_ddl(pool: &Pool, statements: &[String], kind: ErrorKind) -> Result<()> {
    for s in statements {
        tracing::debug!(statement = %s, "celeriac-sqla schema");
        on_pool!(pool, p => sqlx::query(sql(s)).execute(p).await.map(|_| ()))
            .map_err(|e| map_err(kind, &format!("cannot create table ({s})"), e))?;
    }
    Ok(())
}

/// `CREATE SEQUENCE` for `sequence` when the server has sequences, and the `id` column:
/// an `INTEGER` filled from the sequence, or `AUTO_INCREMENT` on MySQL, as SQLAlchemy makes
/// them.
pub(crate) fn id_column(
    server: Server,
    schema: Option<&str>,
    sequence: &str,
) -> (Vec<String>, String) {
    if server.has_sequences() {
        let seq = quote(server.dialect, schema, sequence);
        let create = match server.dialect {
            Dialect::Postgres => format!("CREATE SEQUENCE IF NOT EXISTS {seq}"),
            Dialect::MySql => format!("CREATE SEQUENCE IF NOT EXISTS {seq} ENGINE=InnoDB"),
        };
        (vec![create], "id INTEGER NOT NULL".to_owned())
    } else {
        (Vec::new(), "id INTEGER NOT NULL AUTO_INCREMENT".to_owned())
    }
}

/// The table options SQLAlchemy's MySQL dialect gives kombu's tables.
pub(crate) fn table_suffix(server: Server) -> &'static str {
    match server.dialect {
        Dialect::Postgres => "",
        Dialect::MySql => " ENGINE=InnoDB",
    }
}
