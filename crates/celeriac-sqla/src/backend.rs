//! [`SqlaBackend`]: Celery's database result backend (`db+postgresql://…`, `db+mysql://…`).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use celeriac_core::backend::{BackendCapabilities, poll_until_ready};
use celeriac_core::{
    BoxFuture, Config, Error, ErrorKind, Result, ResultBackend, TaskMeta, TaskState,
};
use chrono::{NaiveDateTime, TimeZone as _, Utc};
use serde_json::{Map, Value, json};

use crate::db::{Pool, is_unique_violation, map_err, now_naive, quote, retry_deadlocks};
use crate::schema::{self, Server, on_pool, sql};
use crate::url::{self, Dialect};

mod coord;
pub use coord::{COORD_KEYS_TABLE, COORD_SLOTS_TABLE};

const KIND: ErrorKind = ErrorKind::Backend;

/// The longest pause between two reads of a result being waited for.
const WAIT_MAX_INTERVAL: Duration = Duration::from_millis(100);
/// How often a store also deletes expired rows (Celery's daily `celery.backend_cleanup`,
/// done here as results are written).
const SWEEP_EVERY_MS: i64 = 60_000;
/// The table of chord counters, celeriac's own (Celery's database backend has none).
pub const COUNTERS_TABLE: &str = "celeriac_sqla_counters";
/// Celery's sequence of `celery_taskmeta.id`.
const TASK_SEQUENCE: &str = "task_id_sequence";
/// Celery's sequence of `celery_tasksetmeta.id`.
const GROUP_SEQUENCE: &str = "taskset_id_sequence";
/// Longest value of Celery's `String(155)` columns.
const VARCHAR: usize = 155;

/// Where the backend's tables are: Celery's `database_table_names` and
/// `database_table_schemas`, and whether to create them.
///
/// From a URL, the query keys `task_table`, `group_table`, `task_schema` and `group_schema`
/// set them (and are not passed to the database): `db+postgresql://h/db?task_table=results`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SqlaBackendOptions {
    /// The task table (`database_table_names['task']`), default `celery_taskmeta`.
    pub task_table: String,
    /// The group table (`database_table_names['group']`), default `celery_tasksetmeta`.
    pub group_table: String,
    /// The task table's schema (`database_table_schemas['task']`); default the connection's.
    pub task_schema: Option<String>,
    /// The group table's schema (`database_table_schemas['group']`); default the
    /// connection's.
    pub group_schema: Option<String>,
    /// Create missing tables and add missing columns, as Celery does on first use. Default
    /// true. celeriac's own tables beside Celery's (chord counters, coordination) are created
    /// when missing either way.
    pub create_tables: bool,
    /// How long results are kept: older rows are deleted (Celery's `result_expires` and
    /// `celery.backend_cleanup`); `None` keeps them. Default one day.
    pub result_expires: Option<Duration>,
}

impl Default for SqlaBackendOptions {
    fn default() -> Self {
        SqlaBackendOptions {
            task_table: "celery_taskmeta".to_owned(),
            group_table: "celery_tasksetmeta".to_owned(),
            task_schema: None,
            group_schema: None,
            create_tables: true,
            result_expires: Some(Duration::from_secs(86_400)),
        }
    }
}

impl SqlaBackendOptions {
    /// The options of `config` (its `result_expires`).
    pub fn from_config(config: &Config) -> Self {
        SqlaBackendOptions {
            result_expires: config.result_expires,
            ..Self::default()
        }
    }

    /// Sets the task and group table names.
    #[must_use]
    pub fn tables(mut self, task: impl Into<String>, group: impl Into<String>) -> Self {
        self.task_table = task.into();
        self.group_table = group.into();
        self
    }

    /// Sets the schema of both tables.
    #[must_use]
    pub fn schema(mut self, schema: Option<String>) -> Self {
        self.task_schema.clone_from(&schema);
        self.group_schema = schema;
        self
    }

    /// Sets whether missing tables are created.
    #[must_use]
    pub fn create_tables(mut self, create: bool) -> Self {
        self.create_tables = create;
        self
    }

    /// Sets how long results are kept.
    #[must_use]
    pub fn result_expires(mut self, expires: Option<Duration>) -> Self {
        self.result_expires = expires;
        self
    }
}

/// Which optional columns the task table has.
#[derive(Debug, Clone, Copy, Default)]
struct Columns {
    /// `children` (Celery 5.7).
    children: bool,
    /// `name`, `args`, `kwargs`, `worker`, `retries`, `queue` (`result_extended`).
    extended: bool,
    /// `stamps` (Celery 5.7, extended).
    stamps: bool,
}

/// The statements, built once from the table names and columns.
#[derive(Debug)]
struct Statements {
    /// The columns written, in bind order after `task_id`.
    write_columns: Vec<&'static str>,
    insert: String,
    update: String,
    lock_status: String,
    select: String,
    forget: String,
    save_group: String,
    restore_group: String,
    incr: String,
    incr_read: String,
    sweep: [String; 3],
}

/// Celery's database result backend on PostgreSQL or MariaDB/MySQL: rows in
/// `celery_taskmeta` and `celery_tasksetmeta` that Python Celery (`result_backend =
/// "db+postgresql://…"`) reads and writes too. Clones share one pool.
///
/// ```no_run
/// # async fn demo() -> celeriac_core::Result<()> {
/// use celeriac_core::{ResultBackend, TaskMeta};
/// use celeriac_sqla::{SqlaBackend, SqlaBackendOptions};
///
/// let backend = SqlaBackend::open(
///     "db+postgresql://postgres@127.0.0.1/test",
///     &celeriac_core::Config::default(),
///     SqlaBackendOptions::default(),
/// )
/// .await?;
/// backend.store(&TaskMeta::success("id-1", 4.into())).await?;
/// assert_eq!(backend.wait("id-1", None).await?.result, 4);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqlaBackend {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    server: Server,
    columns: Columns,
    sql: Statements,
    options: SqlaBackendOptions,
    next_sweep: AtomicI64,
    closed: AtomicBool,
    /// The coordination statements (tables beside Celery's; `backend/coord.rs`).
    coord: coord::CoordSql,
    /// Set once the coordination tables exist (created on first use).
    coord_ready: tokio::sync::OnceCell<()>,
}

impl fmt::Debug for SqlaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlaBackend")
            .field("server", &self.inner.server)
            .field("columns", &self.inner.columns)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl SqlaBackend {
    /// Opens the backend for a `db+…` URL with the settings of `config`, table names from
    /// the URL's query (see [`SqlaBackendOptions`]).
    pub async fn connect(url: &str, config: &Config) -> Result<Self> {
        Self::open(url, config, SqlaBackendOptions::from_config(config)).await
    }

    /// Opens the backend for a `db+…` URL with explicit `options`; table options in the URL
    /// override those.
    pub async fn open(url: &str, config: &Config, mut options: SqlaBackendOptions) -> Result<Self> {
        let parsed = url::parse(url, "db+")?;
        if let Some(t) = parsed.option("task_table") {
            t.clone_into(&mut options.task_table);
        }
        if let Some(t) = parsed.option("group_table") {
            t.clone_into(&mut options.group_table);
        }
        if let Some(s) = parsed.option("task_schema") {
            options.task_schema = Some(s.to_owned());
        }
        if let Some(s) = parsed.option("group_schema") {
            options.group_schema = Some(s.to_owned());
        }
        for (name, what) in [
            (Some(&options.task_table), "task table"),
            (Some(&options.group_table), "group table"),
            (options.task_schema.as_ref(), "task schema"),
            (options.group_schema.as_ref(), "group schema"),
        ] {
            if let Some(name) = name {
                url::check_identifier(name, what)?;
            }
        }
        let pool = Pool::connect(&parsed, config, KIND).await?;
        let server = Server::detect(&pool, KIND).await?;
        // Processes creating the tables at once may collide (PostgreSQL's `IF NOT EXISTS` is
        // not atomic), each time on another table: a later try finds them.
        let mut attempt = 0;
        let columns = loop {
            attempt += 1;
            match prepare_tables(&pool, server, &options).await {
                Ok(c) => break c,
                Err(e) if options.create_tables && attempt < 4 => {
                    tracing::debug!(error = %e, "creating the result tables again");
                    tokio::time::sleep(Duration::from_millis(5 * attempt)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let ts = options.task_schema.as_deref();
        let gs = options.group_schema.as_deref();
        let task_seq = schema::sequence_exists(&pool, server, ts, TASK_SEQUENCE, KIND).await?;
        let group_seq = schema::sequence_exists(&pool, server, gs, GROUP_SEQUENCE, KIND).await?;
        let sql = statements(server, &options, columns, task_seq, group_seq);
        let coord = coord::CoordSql::new(server, ts);
        Ok(SqlaBackend {
            inner: Arc::new(Inner {
                pool,
                server,
                columns,
                sql,
                options,
                next_sweep: AtomicI64::new(0),
                closed: AtomicBool::new(false),
                coord,
                coord_ready: tokio::sync::OnceCell::new(),
            }),
        })
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::closed("sqla result backend"))
        } else {
            Ok(())
        }
    }

    /// Deletes results, groups and chord counters older than `result_expires`, as Celery's
    /// `celery.backend_cleanup` task does (stores also do it, at most once a minute); returns
    /// how many task rows went.
    pub async fn cleanup(&self) -> Result<u64> {
        self.check_open()?;
        let Some(expires) = self.inner.options.result_expires else {
            return Ok(0);
        };
        let now = now_naive();
        let cutoff = now - chrono::Duration::from_std(expires).unwrap_or(chrono::Duration::MAX);
        let s = &self.inner.sql.sweep;
        let mut deleted = 0;
        for (i, stmt) in s.iter().enumerate() {
            let at = if i == 2 { now } else { cutoff };
            let n =
                on_pool!(&self.inner.pool, p => sqlx::query(sql(stmt)).bind(at).execute(p).await
                .map(|r| r.rows_affected()))
                .map_err(|e| map_err(KIND, "cannot delete expired results", e))?;
            if i == 0 {
                deleted = n;
            }
        }
        if deleted > 0 {
            tracing::debug!(deleted, "deleted expired results");
        }
        Ok(deleted)
    }

    /// Starts a cleanup in the background when one is due.
    fn maybe_sweep(&self) {
        if self.inner.options.result_expires.is_none() {
            return;
        }
        let now = Utc::now().timestamp_millis();
        let next = self.inner.next_sweep.load(Ordering::Relaxed);
        if now < next
            || self
                .inner
                .next_sweep
                .compare_exchange(
                    next,
                    now + SWEEP_EVERY_MS,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.cleanup().await {
                tracing::warn!(error = %e, "result cleanup failed");
            }
        });
    }

    /// The values bound after `task_id`, in the order of `write_columns`.
    fn values(&self, meta: &TaskMeta) -> Result<Vec<Bind>> {
        let mut out = Vec::with_capacity(self.inner.sql.write_columns.len());
        for col in &self.inner.sql.write_columns {
            out.push(match *col {
                "status" => Bind::Text(Some(meta.status.as_str().to_owned())),
                "result" => Bind::Bytes(Some(serde_json::to_vec(&meta.result)?)),
                "date_done" => Bind::Time(meta.date_done.map(|t| t.naive_utc())),
                "traceback" => Bind::Text(meta.traceback.clone()),
                "children" => Bind::Bytes(if meta.children.is_empty() {
                    None
                } else {
                    Some(serde_json::to_vec(&meta.children)?)
                }),
                "name" => Bind::Text(meta.name.as_deref().map(short)),
                "args" => Bind::Bytes(meta.args.as_ref().map(serde_json::to_vec).transpose()?),
                "kwargs" => Bind::Bytes(meta.kwargs.as_ref().map(serde_json::to_vec).transpose()?),
                "worker" => Bind::Text(meta.worker.as_deref().map(short)),
                "retries" => Bind::Int(meta.retries.map(|r| i32::try_from(r).unwrap_or(i32::MAX))),
                "queue" => Bind::Text(meta.queue.as_deref().map(short)),
                "stamps" => Bind::Bytes(stamps(meta)),
                other => unreachable!("no value for column {other}"),
            });
        }
        Ok(out)
    }
}

/// Celery's `String(155)` columns: longer values are cut (at a character boundary).
fn short(s: &str) -> String {
    s.chars().take(VARCHAR).collect()
}

/// `group_id` and `parent_id` have no column in Celery's table; they travel in `stamps`, whose
/// `stamps` map Celery merges into the meta it reads.
fn stamps(meta: &TaskMeta) -> Option<Vec<u8>> {
    if meta.group_id.is_none() && meta.parent_id.is_none() {
        return None;
    }
    let mut m = Map::new();
    if let Some(g) = &meta.group_id {
        m.insert("group_id".into(), json!(g));
    }
    if let Some(p) = &meta.parent_id {
        m.insert("parent_id".into(), json!(p));
    }
    serde_json::to_vec(&json!({ "stamps": m })).ok()
}

/// A value bound to a statement.
#[derive(Debug)]
enum Bind {
    Text(Option<String>),
    Bytes(Option<Vec<u8>>),
    Time(Option<NaiveDateTime>),
    Int(Option<i32>),
}

/// Binds `values` to a query in order.
macro_rules! bind_all {
    ($q:expr, $values:expr) => {{
        let mut q = $q;
        for v in $values {
            q = match v {
                Bind::Text(v) => q.bind(v),
                Bind::Bytes(v) => q.bind(v),
                Bind::Time(v) => q.bind(v),
                Bind::Int(v) => q.bind(v),
            };
        }
        q
    }};
}

/// What a row of the task table holds.
#[derive(Debug, Default)]
struct Raw {
    task_id: String,
    status: Option<String>,
    result: Option<Vec<u8>>,
    date_done: Option<NaiveDateTime>,
    traceback: Option<String>,
    children: Option<Vec<u8>>,
    name: Option<String>,
    args: Option<Vec<u8>>,
    kwargs: Option<Vec<u8>>,
    worker: Option<String>,
    retries: Option<i32>,
    queue: Option<String>,
    stamps: Option<Vec<u8>>,
}

/// Reads a [`Raw`] from a row selected by [`Statements::select`].
macro_rules! raw_row {
    ($row:expr, $cols:expr) => {{
        use sqlx::Row as _;
        let row = $row;
        let cols: Columns = $cols;
        (|| -> std::result::Result<Raw, sqlx::Error> {
            let mut raw = Raw {
                task_id: row.try_get(0)?,
                status: row.try_get(1)?,
                result: row.try_get(2)?,
                date_done: row.try_get(3)?,
                traceback: row.try_get(4)?,
                ..Raw::default()
            };
            let mut i = 5;
            if cols.children {
                raw.children = row.try_get(i)?;
                i += 1;
            }
            if cols.extended {
                raw.name = row.try_get(i)?;
                raw.args = row.try_get(i + 1)?;
                raw.kwargs = row.try_get(i + 2)?;
                raw.worker = row.try_get(i + 3)?;
                raw.retries = row.try_get(i + 4)?;
                raw.queue = row.try_get(i + 5)?;
                i += 6;
            }
            if cols.stamps {
                raw.stamps = row.try_get(i)?;
            }
            Ok(raw)
        })()
    }};
}

/// The error for a value Celery ≤ 5.6 stored as a pickle, which celeriac never unpickles.
fn pickled(what: &str, id: &str) -> Error {
    Error::backend(format!(
        "the {what} of {id} is a python pickle (written by celery 5.6 or older, or with \
         result_serializer = 'pickle'); celeriac never unpickles: read it from python, or \
         forget it"
    ))
}

/// Decodes a serializer payload (JSON) of a column.
fn decode_json(bytes: &[u8], what: &str, id: &str) -> Result<Value> {
    if bytes.first() == Some(&0x80) {
        return Err(pickled(what, id));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        Error::backend(format!(
            "the {what} of {id} is not json (celeriac reads results stored with \
             result_serializer = 'json')"
        ))
        .with_source(e)
    })
}

impl Raw {
    fn into_meta(self) -> Result<TaskMeta> {
        let id = self.task_id;
        let status: TaskState = self
            .status
            .as_deref()
            .unwrap_or("PENDING")
            .parse()
            .unwrap_or_else(|e| match e {});
        let result = match &self.result {
            Some(b) => decode_json(b, "result", &id)?,
            None => Value::Null,
        };
        let mut meta = TaskMeta::new(id.clone(), status, result);
        meta.date_done = self.date_done.map(|t| Utc.from_utc_datetime(&t));
        meta.traceback = self.traceback;
        if let Some(b) = &self.children
            && let Value::Array(c) = decode_json(b, "children", &id)?
        {
            meta.children = c;
        }
        meta.name = self.name;
        if let Some(b) = &self.args {
            meta.args = match decode_json(b, "args", &id)? {
                Value::Array(a) => Some(a),
                Value::Null => None,
                other => Some(vec![other]),
            };
        }
        if let Some(b) = &self.kwargs {
            meta.kwargs = match decode_json(b, "kwargs", &id)? {
                Value::Object(m) => Some(m),
                _ => None,
            };
        }
        meta.worker = self.worker;
        meta.retries = self.retries.and_then(|r| u32::try_from(r).ok());
        meta.queue = self.queue;
        // Stamps are informative: a row whose stamps do not parse still reads.
        if let Some(b) = &self.stamps
            && let Ok(Value::Object(s)) = serde_json::from_slice::<Value>(b)
            && let Some(Value::Object(st)) = s.get("stamps")
        {
            meta.group_id = st
                .get("group_id")
                .and_then(Value::as_str)
                .map(str::to_owned);
            meta.parent_id = st
                .get("parent_id")
                .and_then(Value::as_str)
                .map(str::to_owned);
        }
        Ok(meta)
    }
}

/// Finds or creates the tables; returns the task table's optional columns.
async fn prepare_tables(pool: &Pool, server: Server, o: &SqlaBackendOptions) -> Result<Columns> {
    let d = server.dialect;
    let ts = o.task_schema.as_deref();
    let gs = o.group_schema.as_deref();
    let task = quote(d, ts, &o.task_table);
    let group = quote(d, gs, &o.group_table);
    let (blob, text, time, suffix) = (
        server.blob(),
        server.text(),
        server.datetime(),
        schema::table_suffix(server),
    );

    let mut cols = schema::columns(pool, ts, &o.task_table, KIND).await?;
    if cols.is_empty() && o.create_tables {
        let (mut ddl, id) = schema::id_column(server, ts, TASK_SEQUENCE);
        ddl.push(format!(
            "CREATE TABLE IF NOT EXISTS {task} ({id}, task_id VARCHAR(155), \
             status VARCHAR(50), result {blob}, date_done {time}, traceback {text}, \
             children {blob}, name VARCHAR(155), args {blob}, kwargs {blob}, \
             worker VARCHAR(155), retries INTEGER, queue VARCHAR(155), stamps {blob}, \
             PRIMARY KEY (id), UNIQUE (task_id)){suffix}"
        ));
        ddl.push(index(d, ts, &o.task_table, "date_done"));
        schema::run_ddl(pool, &ddl, KIND).await?;
        cols = schema::columns(pool, ts, &o.task_table, KIND).await?;
    } else if !cols.is_empty() && o.create_tables {
        // Celery 5.7 adds the nullable columns an older table lacks; so do we.
        let wanted: [(&str, String); 8] = [
            ("children", blob.to_owned()),
            ("name", "VARCHAR(155)".to_owned()),
            ("args", blob.to_owned()),
            ("kwargs", blob.to_owned()),
            ("worker", "VARCHAR(155)".to_owned()),
            ("retries", "INTEGER".to_owned()),
            ("queue", "VARCHAR(155)".to_owned()),
            ("stamps", blob.to_owned()),
        ];
        let mut changed = false;
        for (name, ty) in wanted {
            if !cols.contains(name) {
                let stmt = format!("ALTER TABLE {task} ADD COLUMN {name} {ty}");
                match schema::run_ddl(pool, std::slice::from_ref(&stmt), KIND).await {
                    Ok(()) => changed = true,
                    Err(e) => tracing::warn!(error = %e, "cannot add column {name} to {task}"),
                }
            }
        }
        if changed {
            cols = schema::columns(pool, ts, &o.task_table, KIND).await?;
        }
    }
    if cols.is_empty() {
        return Err(Error::backend(format!(
            "the result table {task} does not exist (and create_tables is off)"
        )));
    }

    let gcols = schema::columns(pool, gs, &o.group_table, KIND).await?;
    if gcols.is_empty() {
        if !o.create_tables {
            return Err(Error::backend(format!(
                "the group table {group} does not exist (and create_tables is off)"
            )));
        }
        let (mut ddl, id) = schema::id_column(server, gs, GROUP_SEQUENCE);
        ddl.push(format!(
            "CREATE TABLE IF NOT EXISTS {group} ({id}, taskset_id VARCHAR(155), \
             result {blob}, date_done {time}, PRIMARY KEY (id), UNIQUE (taskset_id)){suffix}"
        ));
        ddl.push(index(d, gs, &o.group_table, "date_done"));
        schema::run_ddl(pool, &ddl, KIND).await?;
    }

    let counters = quote(d, ts, COUNTERS_TABLE);
    schema::run_ddl(
        pool,
        &[format!(
            "CREATE TABLE IF NOT EXISTS {counters} (counter_key VARCHAR(255) NOT NULL, \
             value BIGINT NOT NULL, expires_at {time}, PRIMARY KEY (counter_key)){suffix}"
        )],
        KIND,
    )
    .await?;

    let has = |c: &str| cols.contains(c);
    Ok(Columns {
        children: has("children"),
        extended: ["name", "args", "kwargs", "worker", "retries", "queue"]
            .iter()
            .all(|c| has(c)),
        stamps: has("stamps"),
    })
}

/// SQLAlchemy's `index=True` index: `ix_<table>_<column>`.
fn index(d: Dialect, schema: Option<&str>, table: &str, column: &str) -> String {
    let on = quote(d, schema, table);
    let name = format!("ix_{table}_{column}");
    match d {
        Dialect::Postgres => format!(
            "CREATE INDEX IF NOT EXISTS {} ON {on} ({column})",
            quote(d, None, &name)
        ),
        Dialect::MySql => format!(
            "CREATE INDEX IF NOT EXISTS {} ON {on} ({column})",
            quote(d, None, &name)
        ),
    }
}

fn statements(
    server: Server,
    o: &SqlaBackendOptions,
    cols: Columns,
    task_seq: bool,
    group_seq: bool,
) -> Statements {
    let d = server.dialect;
    let ts = o.task_schema.as_deref();
    let gs = o.group_schema.as_deref();
    let task = quote(d, ts, &o.task_table);
    let group = quote(d, gs, &o.group_table);
    let counters = quote(d, ts, COUNTERS_TABLE);
    let p = |n: usize| server.param(n);

    let mut write_columns = vec!["status", "result", "date_done", "traceback"];
    if cols.children {
        write_columns.push("children");
    }
    if cols.extended {
        write_columns.extend(["name", "args", "kwargs", "worker", "retries", "queue"]);
    }
    if cols.stamps {
        write_columns.push("stamps");
    }
    let n = write_columns.len();

    let (id_col, id_val) = if task_seq {
        ("id, ", format!("{}, ", server.nextval(ts, TASK_SEQUENCE)))
    } else {
        ("", String::new())
    };
    let values: Vec<String> = (1..=n + 1).map(p).collect();
    let insert_head = format!(
        "INSERT INTO {task} {alias}({id_col}task_id, {}) VALUES ({id_val}{})",
        write_columns.join(", "),
        values.join(", "),
        alias = if d == Dialect::Postgres { "AS t " } else { "" },
    );
    let set_from = |col: &str| match (d, col) {
        // A store without stamps keeps those already there (Celery does the same).
        (Dialect::Postgres, "stamps") => "stamps = COALESCE(EXCLUDED.stamps, t.stamps)".to_owned(),
        (Dialect::Postgres, c) => format!("{c} = EXCLUDED.{c}"),
        (Dialect::MySql, "stamps") => "stamps = COALESCE(?, stamps)".to_owned(),
        (Dialect::MySql, c) => format!("{c} = ?"),
    };
    let insert = match d {
        // One statement: insert, or update unless the stored state takes precedence
        // (SUCCESS is final; a ready state is only replaced by a ready one).
        Dialect::Postgres => format!(
            "{insert_head} ON CONFLICT (task_id) DO UPDATE SET {} \
             WHERE t.status IS NULL OR (t.status <> 'SUCCESS' AND \
             (t.status NOT IN ('FAILURE', 'REVOKED') OR ${}))",
            write_columns
                .iter()
                .map(|c| set_from(c))
                .collect::<Vec<_>>()
                .join(", "),
            n + 2
        ),
        Dialect::MySql => insert_head,
    };
    let update = format!(
        "UPDATE {task} SET {} WHERE task_id = ?",
        write_columns
            .iter()
            .map(|c| set_from(c))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let lock_status = format!("SELECT status FROM {task} WHERE task_id = ? FOR UPDATE");

    let mut read = vec!["task_id", "status", "result", "date_done", "traceback"];
    read.extend(write_columns.iter().skip(4).copied());
    let select = format!("SELECT {} FROM {task} WHERE task_id ", read.join(", "));
    let forget = format!("DELETE FROM {task} WHERE task_id = {}", p(1));

    let (gid_col, gid_val) = if group_seq {
        ("id, ", format!("{}, ", server.nextval(gs, GROUP_SEQUENCE)))
    } else {
        ("", String::new())
    };
    let save_group = match d {
        Dialect::Postgres => format!(
            "INSERT INTO {group} ({gid_col}taskset_id, result, date_done) \
             VALUES ({gid_val}$1, $2, $3) ON CONFLICT (taskset_id) DO UPDATE SET \
             result = EXCLUDED.result, date_done = EXCLUDED.date_done"
        ),
        Dialect::MySql => format!(
            "INSERT INTO {group} ({gid_col}taskset_id, result, date_done) \
             VALUES ({gid_val}?, ?, ?) ON DUPLICATE KEY UPDATE \
             result = VALUES(result), date_done = VALUES(date_done)"
        ),
    };
    let restore_group = format!("SELECT result FROM {group} WHERE taskset_id = {}", p(1));
    let incr = match d {
        Dialect::Postgres => format!(
            "INSERT INTO {counters} AS c (counter_key, value, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (counter_key) DO UPDATE SET \
             value = CASE WHEN c.expires_at <= $4 THEN EXCLUDED.value \
                          ELSE c.value + EXCLUDED.value END, \
             expires_at = EXCLUDED.expires_at RETURNING value"
        ),
        // MySQL assigns left to right: `value` sees the old `expires_at`.
        Dialect::MySql => format!(
            "INSERT INTO {counters} (counter_key, value, expires_at) VALUES (?, ?, ?) \
             ON DUPLICATE KEY UPDATE \
             value = IF(expires_at <= ?, VALUES(value), value + VALUES(value)), \
             expires_at = VALUES(expires_at)"
        ),
    };
    let incr_read = format!("SELECT value FROM {counters} WHERE counter_key = ?");
    let sweep = [
        format!("DELETE FROM {task} WHERE date_done < {}", p(1)),
        format!("DELETE FROM {group} WHERE date_done < {}", p(1)),
        format!("DELETE FROM {counters} WHERE expires_at <= {}", p(1)),
    ];
    Statements {
        write_columns,
        insert,
        update,
        lock_status,
        select,
        forget,
        save_group,
        restore_group,
        incr,
        incr_read,
        sweep,
    }
}

/// The member ids of a stored group tuple (see [`celeriac_core::meta::group_tuple`]).
fn group_members(doc: &Value, group_id: &str) -> Result<Vec<String>> {
    celeriac_core::meta::group_tuple_members(doc).ok_or_else(|| {
        Error::backend(format!(
            "the stored group {group_id} is not celery's group tuple"
        ))
    })
}

impl SqlaBackend {
    async fn store_inner(&self, meta: &TaskMeta) -> Result<bool> {
        let inner = &*self.inner;
        let values = self.values(meta)?;
        let id = meta.task_id.clone();
        match &inner.pool {
            #[cfg(feature = "postgres")]
            Pool::Pg(p) => {
                let q = sqlx::query(sql(&inner.sql.insert)).bind(id);
                let q = bind_all!(q, values);
                let r = q
                    .bind(meta.status.is_ready())
                    .execute(p)
                    .await
                    .map_err(|e| map_err(KIND, "cannot store result", e))?;
                Ok(r.rows_affected() > 0)
            }
            #[cfg(feature = "mysql")]
            Pool::My(p) => {
                // Insert; when the row exists, lock it (a row lock, never a gap lock, which
                // deadlocks concurrent inserts on InnoDB) and update it unless its state takes
                // precedence.
                for _ in 0..3 {
                    let q = sqlx::query(sql(&inner.sql.insert)).bind(&id);
                    let q = bind_all!(q, self.values(meta)?);
                    match q.execute(p).await {
                        Ok(_) => return Ok(true),
                        Err(e) if is_unique_violation(&e) => {}
                        Err(e) => return Err(map_err(KIND, "cannot store result", e)),
                    }
                    let mut tx = p
                        .begin()
                        .await
                        .map_err(|e| map_err(KIND, "cannot store result", e))?;
                    let old: Option<Option<String>> =
                        sqlx::query_scalar(sql(&inner.sql.lock_status))
                            .bind(&id)
                            .fetch_optional(&mut *tx)
                            .await
                            .map_err(|e| map_err(KIND, "cannot store result", e))?;
                    let Some(old) = old else {
                        // Forgotten in between: insert again.
                        continue;
                    };
                    let old: TaskState = old
                        .as_deref()
                        .unwrap_or("PENDING")
                        .parse()
                        .unwrap_or_else(|e| match e {});
                    if !old.may_be_replaced_by(&meta.status) {
                        return Ok(false);
                    }
                    let q = sqlx::query(sql(&inner.sql.update));
                    let q = bind_all!(q, self.values(meta)?);
                    q.bind(&id)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| map_err(KIND, "cannot store result", e))?;
                    tx.commit()
                        .await
                        .map_err(|e| map_err(KIND, "cannot store result", e))?;
                    return Ok(true);
                }
                Err(Error::backend(format!(
                    "cannot store result of {id}: the row keeps changing"
                ))
                .transient())
            }
        }
    }

    async fn get_rows(&self, ids: &[String]) -> Result<Vec<Raw>> {
        let inner = &*self.inner;
        let cols = inner.columns;
        let what = |e| map_err(KIND, "cannot read results", e);
        match &inner.pool {
            #[cfg(feature = "postgres")]
            Pool::Pg(p) => {
                let stmt = format!("{}= ANY($1)", inner.sql.select);
                let rows = sqlx::query(sql(&stmt))
                    .bind(ids)
                    .fetch_all(p)
                    .await
                    .map_err(what)?;
                rows.iter()
                    .map(|r| raw_row!(r, cols).map_err(what))
                    .collect()
            }
            #[cfg(feature = "mysql")]
            Pool::My(p) => {
                let marks = vec!["?"; ids.len()].join(", ");
                let stmt = format!("{}IN ({marks})", inner.sql.select);
                let mut q = sqlx::query(sql(&stmt));
                for id in ids {
                    q = q.bind(id);
                }
                let rows = q.fetch_all(p).await.map_err(what)?;
                rows.iter()
                    .map(|r| raw_row!(r, cols).map_err(what))
                    .collect()
            }
        }
    }
}

impl ResultBackend for SqlaBackend {
    fn driver(&self) -> &'static str {
        "sqla"
    }

    fn store<'a>(&'a self, meta: &'a TaskMeta) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            self.check_open()?;
            self.maybe_sweep();
            retry_deadlocks(|| self.store_inner(meta)).await
        })
    }

    fn get<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Result<Option<TaskMeta>>> {
        Box::pin(async move {
            self.check_open()?;
            let rows = self.get_rows(&[task_id.to_owned()]).await?;
            rows.into_iter().next().map(Raw::into_meta).transpose()
        })
    }

    fn get_many<'a>(
        &'a self,
        task_ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<TaskMeta>>>> {
        Box::pin(async move {
            self.check_open()?;
            if task_ids.is_empty() {
                return Ok(Vec::new());
            }
            let mut by_id: HashMap<String, TaskMeta> = HashMap::new();
            for chunk in task_ids.chunks(500) {
                for raw in self.get_rows(chunk).await? {
                    by_id.insert(raw.task_id.clone(), raw.into_meta()?);
                }
            }
            Ok(task_ids.iter().map(|id| by_id.get(id).cloned()).collect())
        })
    }

    fn wait<'a>(
        &'a self,
        task_id: &'a str,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Result<TaskMeta>> {
        Box::pin(poll_until_ready(self, task_id, timeout, WAIT_MAX_INTERVAL))
    }

    fn forget<'a>(&'a self, task_id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            on_pool!(&self.inner.pool, p => sqlx::query(sql(&self.inner.sql.forget))
                .bind(task_id)
                .execute(p)
                .await
                .map(|_| ()))
            .map_err(|e| map_err(KIND, "cannot forget result", e))
        })
    }

    fn save_group<'a>(
        &'a self,
        group_id: &'a str,
        task_ids: &'a [String],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_open()?;
            let doc = serde_json::to_vec(&celeriac_core::meta::group_tuple(group_id, task_ids))?;
            on_pool!(&self.inner.pool, p => sqlx::query(sql(&self.inner.sql.save_group))
                .bind(group_id)
                .bind(doc)
                .bind(now_naive())
                .execute(p)
                .await
                .map(|_| ()))
            .map_err(|e| map_err(KIND, "cannot save group", e))
        })
    }

    fn restore_group<'a>(
        &'a self,
        group_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<String>>>> {
        Box::pin(async move {
            self.check_open()?;
            let row: Option<Option<Vec<u8>>> = on_pool!(&self.inner.pool, p =>
                sqlx::query_scalar(sql(&self.inner.sql.restore_group))
                    .bind(group_id)
                    .fetch_optional(p)
                    .await)
            .map_err(|e| map_err(KIND, "cannot restore group", e))?;
            match row {
                None => Ok(None),
                Some(None) => Ok(Some(Vec::new())),
                Some(Some(bytes)) => {
                    let doc = decode_json(&bytes, "group", group_id)?;
                    group_members(&doc, group_id).map(Some)
                }
            }
        })
    }

    fn incr<'a>(&'a self, key: &'a str, by: i64) -> BoxFuture<'a, Result<i64>> {
        Box::pin(async move {
            self.check_open()?;
            let now = now_naive();
            let expires_at = self
                .inner
                .options
                .result_expires
                .and_then(|e| chrono::Duration::from_std(e).ok())
                .map(|e| now + e);
            let what = |e| map_err(KIND, "cannot increment counter", e);
            retry_deadlocks(|| async move {
                match &self.inner.pool {
                    #[cfg(feature = "postgres")]
                    Pool::Pg(p) => sqlx::query_scalar(sql(&self.inner.sql.incr))
                        .bind(key)
                        .bind(by)
                        .bind(expires_at)
                        .bind(now)
                        .fetch_one(p)
                        .await
                        .map_err(what),
                    #[cfg(feature = "mysql")]
                    Pool::My(p) => {
                        let mut tx = p.begin().await.map_err(what)?;
                        sqlx::query(sql(&self.inner.sql.incr))
                            .bind(key)
                            .bind(by)
                            .bind(expires_at)
                            .bind(now)
                            .execute(&mut *tx)
                            .await
                            .map_err(what)?;
                        let v: i64 = sqlx::query_scalar(sql(&self.inner.sql.incr_read))
                            .bind(key)
                            .fetch_one(&mut *tx)
                            .await
                            .map_err(what)?;
                        tx.commit().await.map_err(what)?;
                        Ok(v)
                    }
                }
            })
            .await
        })
    }

    fn capabilities(&self) -> BackendCapabilities<'_> {
        // Cluster rate limits, unique-task locks and concurrency slots, in tables of
        // celeriac's own beside Celery's (`backend/coord.rs`). Python workers join chords
        // here only through `celery.chord_unlock`, which chords sent here therefore send.
        BackendCapabilities::none()
            .coordination(self)
            .chord_unlock()
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.inner.closed.store(true, Ordering::Release);
            self.inner.pool.close().await;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_documents_are_celery_tuples() {
        let doc = celeriac_core::meta::group_tuple("g", &["a".into(), "b".into()]);
        assert_eq!(
            doc,
            json!([["g", null], [[["a", null], null], [["b", null], null]]])
        );
        assert_eq!(group_members(&doc, "g").unwrap(), vec!["a", "b"]);
        assert!(group_members(&json!({"x": 1}), "g").is_err());
    }

    #[test]
    fn pickles_are_refused() {
        let e = decode_json(b"\x80\x04\x95", "result", "id-1").unwrap_err();
        assert!(e.to_string().contains("never unpickles"), "{e}");
    }
}
