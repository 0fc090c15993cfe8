//! The pool, the schema and the translation of database errors into celeriac's.

use std::time::Duration;

use celeriac_core::{Error, ErrorKind, Result};
use sqlx::mysql::{MySqlDatabaseError, MySqlPool, MySqlPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _, Executor as _, Row as _};

use crate::options::MysqlOptions;

/// The schema version this code writes (the row of `celeriac_schema`).
pub(crate) const VERSION: i64 = 1;

/// Every table (see the crate docs for what each column means). Each statement is idempotent.
const DDL: [&str; 10] = [
    "CREATE TABLE IF NOT EXISTS celeriac_schema (
        version     INT NOT NULL PRIMARY KEY
    ) ENGINE = InnoDB",
    "CREATE TABLE IF NOT EXISTS celeriac_queues (
        name        VARCHAR(191) NOT NULL PRIMARY KEY
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    "CREATE TABLE IF NOT EXISTS celeriac_messages (
        id          BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        queue       VARCHAR(191) NOT NULL,
        priority    TINYINT NOT NULL,
        state       TINYINT NOT NULL,
        visible_at  BIGINT NOT NULL,
        deliveries  INT NOT NULL DEFAULT 0,
        body        LONGTEXT NOT NULL,
        KEY celeriac_messages_ready (queue, state, priority DESC, id),
        KEY celeriac_messages_waiting (queue, state, visible_at)
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    "CREATE TABLE IF NOT EXISTS celeriac_results (
        task_id     VARCHAR(191) NOT NULL PRIMARY KEY,
        status      VARCHAR(64) NOT NULL,
        date_done   VARCHAR(40) NULL,
        expires_at  BIGINT NULL,
        meta        LONGTEXT NOT NULL,
        KEY celeriac_results_expiry (expires_at)
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    "CREATE TABLE IF NOT EXISTS celeriac_groups (
        group_id    VARCHAR(191) NOT NULL PRIMARY KEY,
        task_ids    LONGTEXT NOT NULL,
        expires_at  BIGINT NULL,
        KEY celeriac_groups_expiry (expires_at)
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    "CREATE TABLE IF NOT EXISTS celeriac_counters (
        name        VARCHAR(191) NOT NULL PRIMARY KEY,
        value       BIGINT NOT NULL,
        expires_at  BIGINT NULL,
        KEY celeriac_counters_expiry (expires_at)
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    "CREATE TABLE IF NOT EXISTS celeriac_broadcast (
        id          BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        channel     VARCHAR(16) NOT NULL,
        routing_key VARCHAR(191) NOT NULL,
        body        LONGTEXT NOT NULL,
        created_at  BIGINT NOT NULL,
        KEY celeriac_broadcast_created (created_at)
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    "CREATE TABLE IF NOT EXISTS celeriac_beat_lease (
        namespace   VARCHAR(191) NOT NULL PRIMARY KEY,
        holder      VARCHAR(191) NOT NULL,
        token       BIGINT NOT NULL,
        expires_at  BIGINT NOT NULL
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    "CREATE TABLE IF NOT EXISTS celeriac_beat_entries (
        namespace   VARCHAR(191) NOT NULL,
        name        VARCHAR(191) NOT NULL,
        spec        LONGTEXT NULL,
        paused      TINYINT NOT NULL DEFAULT 0,
        triggers    BIGINT NOT NULL DEFAULT 0,
        state       LONGTEXT NULL,
        PRIMARY KEY (namespace, name)
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    "INSERT INTO celeriac_schema (version) VALUES (1) ON DUPLICATE KEY UPDATE version = version",
];

/// Opens a pool for `options` and makes sure the schema exists.
///
/// Connecting first (rather than lazily) makes a wrong password or a missing database fail
/// here, with a clear message, instead of at the first publish.
pub(crate) async fn open(options: &MysqlOptions, kind: ErrorKind) -> Result<MySqlPool> {
    let connect = options.connect.clone().found_rows(true);
    // One connection first, without the pool's retries: a wrong password, a missing database
    // or a server that is down fails at once, with the server's reason.
    let first = connect.connect().await.map_err(|e| {
        map_err(
            kind,
            &format!("cannot connect to mysql at {}", options.display),
            e,
        )
    })?;
    let _ = first.close().await;
    let pool = MySqlPoolOptions::new()
        .max_connections(options.get_max_connections())
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(30))
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                // Read committed: no gap locks, so claims, acks and publishes of different
                // rows never wait for each other.
                conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    .await?;
                Ok(())
            })
        })
        .connect_lazy_with(connect);
    ensure_schema(&pool, options, kind).await?;
    Ok(pool)
}

/// Creates the tables when `celeriac_schema` says they are missing or older.
///
/// Reading the version first means a user with no `CREATE` privilege can use a database
/// whose schema an administrator created. Creation runs under a named lock (`GET_LOCK`), so
/// processes starting at once create the tables one after the other; every statement is
/// idempotent anyway.
async fn ensure_schema(pool: &MySqlPool, options: &MysqlOptions, kind: ErrorKind) -> Result<()> {
    let current: Option<i64> = match sqlx::query("SELECT MAX(version) FROM celeriac_schema")
        .fetch_one(pool)
        .await
    {
        Ok(row) => row
            .try_get::<Option<i32>, _>(0)
            .ok()
            .flatten()
            .map(i64::from),
        Err(e) if db_number(&e) == Some(1146) => None,
        Err(e) => {
            return Err(map_err(
                kind,
                &format!(
                    "cannot read the celeriac schema version in {}",
                    options.display
                ),
                e,
            ));
        }
    };
    if current.is_some_and(|v| v >= VERSION) {
        return Ok(());
    }
    let what = format!("cannot create the celeriac tables in {}", options.display);
    let mut conn = pool.acquire().await.map_err(|e| map_err(kind, &what, e))?;
    let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK('celeriac_schema', 60)")
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| map_err(kind, &what, e))?;
    if got != Some(1) {
        return Err(Error::new(
            kind,
            format!("{what}: another process held the schema lock for 60 s"),
        )
        .transient());
    }
    let mut result = Ok(());
    for ddl in DDL {
        if let Err(e) = conn.execute(ddl).await {
            result = Err(map_err(kind, &what, e));
            break;
        }
    }
    let _ = sqlx::query("SELECT RELEASE_LOCK('celeriac_schema')")
        .execute(&mut *conn)
        .await;
    if result.is_ok() {
        tracing::debug!(database = %options.display, "created the celeriac tables");
    }
    result
}

/// The MySQL error number of a database error.
pub(crate) fn db_number(e: &sqlx::Error) -> Option<u16> {
    match e {
        sqlx::Error::Database(d) => d
            .try_downcast_ref::<MySqlDatabaseError>()
            .map(|d| d.number()),
        _ => None,
    }
}

/// Whether `e` is a deadlock or a lock wait timeout, after which the transaction may be run
/// again.
pub(crate) fn is_retryable(e: &sqlx::Error) -> bool {
    matches!(db_number(e), Some(1213 | 1205))
}

/// Translates a sqlx error into celeriac's, with `what` (lowercase: what failed) and a hint
/// for the causes a user can fix: a wrong password, a missing database, a missing privilege.
pub(crate) fn map_err(kind: ErrorKind, what: &str, e: sqlx::Error) -> Error {
    let (message, transient) = match &e {
        sqlx::Error::Database(d) => {
            let number = d
                .try_downcast_ref::<MySqlDatabaseError>()
                .map_or(0, MySqlDatabaseError::number);
            match number {
                1045 => (
                    format!("{what}: access denied (wrong user name or password)"),
                    false,
                ),
                1044 => (
                    format!(
                        "{what}: access denied to the database (the user has no privilege on it)"
                    ),
                    false,
                ),
                1049 => (format!("{what}: the database does not exist"), false),
                1142 | 1143 => (
                    format!(
                        "{what}: permission denied (the mysql user lacks a privilege on a celeriac table)"
                    ),
                    false,
                ),
                1146 => (format!("{what}: a celeriac table is missing"), false),
                1213 => (format!("{what}: deadlock"), true),
                1205 => (format!("{what}: lock wait timeout"), true),
                // Server shutting down, too many connections, read-only replica.
                1053 | 1040 | 1290 | 1836 => (what.to_owned(), true),
                _ => (what.to_owned(), false),
            }
        }
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            (what.to_owned(), true)
        }
        sqlx::Error::Tls(_) => (format!("{what}: tls"), false),
        _ => (what.to_owned(), false),
    };
    let err = Error::new(kind, message).with_source(e);
    if transient { err.transient() } else { err }
}

/// Runs `f` (which opens and commits its own transaction) again, up to five times, when the
/// server chose it as a deadlock victim or its lock wait timed out.
pub(crate) async fn retry<T, F, Fut>(kind: ErrorKind, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, sqlx::Error>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if is_retryable(&e) && attempt < 5 => {
                tracing::debug!(error = %e, attempt, "retrying a mysql transaction");
                tokio::time::sleep(Duration::from_millis(2 * attempt)).await;
            }
            Err(e) => return Err(map_err(kind, what, e)),
        }
    }
}

/// Unix milliseconds of `d`, saturating.
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}
