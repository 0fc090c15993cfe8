//! The tables, created on first use.
//!
//! Every statement is `IF NOT EXISTS` and the whole script runs in one transaction under a
//! transaction-scoped advisory lock keyed by the schema's name, so processes starting at the
//! same moment create the tables once: the second waits for the first to commit, then finds
//! everything there. When the tables exist already (the common case, and the only one for a
//! role that may not create them) nothing is written and no lock is taken.

use sqlx::{AssertSqlSafe, PgConnection};

/// The version written to `meta`; a later release migrates from it.
pub(crate) const VERSION: i32 = 2;

const DDL: &str = r#"
CREATE SCHEMA IF NOT EXISTS {s0};
CREATE TABLE IF NOT EXISTS {s}meta (
    key    text PRIMARY KEY,
    value  text NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}queues (
    name   text PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS {s}messages (
    id          bigserial PRIMARY KEY,
    queue       text     NOT NULL,
    priority    smallint NOT NULL DEFAULT 0,
    state       smallint NOT NULL DEFAULT 0,
    visible_at  bigint   NOT NULL,
    deliveries  integer  NOT NULL DEFAULT 0,
    task_id     text,
    body        text     NOT NULL,
    lease       bigint
);
CREATE INDEX IF NOT EXISTS messages_ready
    ON {s}messages (queue, priority DESC, id) WHERE state = 0;
CREATE INDEX IF NOT EXISTS messages_waiting
    ON {s}messages (queue, visible_at) WHERE state <> 0;
CREATE TABLE IF NOT EXISTS {s}results (
    task_id     text PRIMARY KEY,
    status      text   NOT NULL,
    expires_at  bigint,
    meta        text   NOT NULL
);
CREATE INDEX IF NOT EXISTS results_expires
    ON {s}results (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS {s}groups (
    group_id    text PRIMARY KEY,
    task_ids    text   NOT NULL,
    expires_at  bigint
);
CREATE TABLE IF NOT EXISTS {s}counters (
    key         text PRIMARY KEY,
    value       bigint NOT NULL,
    expires_at  bigint
);
CREATE TABLE IF NOT EXISTS {s}broadcast (
    id           bigserial PRIMARY KEY,
    channel      text   NOT NULL,
    routing_key  text   NOT NULL,
    body         text   NOT NULL,
    created_at   bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}beat_lease (
    id          smallint PRIMARY KEY CHECK (id = 1),
    holder      text   NOT NULL,
    token       bigint NOT NULL,
    expires_at  bigint NOT NULL
);
INSERT INTO {s}beat_lease (id, holder, token, expires_at) VALUES (1, '', 0, 0)
    ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS {s}beat_entries (
    name      text PRIMARY KEY,
    spec      text,
    paused    boolean NOT NULL DEFAULT false,
    triggers  bigint  NOT NULL DEFAULT 0,
    state     text
);
INSERT INTO {s}meta (key, value) VALUES ('version', '{version}') ON CONFLICT DO NOTHING;
"#;

/// From version 1: `messages.lease`, the lease's first end, which with `deliveries` fences
/// settling (a count alone can repeat after a server crash took a lease; `visible_at` moves
/// with every extension). Instant in PostgreSQL 11 and later (no default to write).
/// Processes of version 1 on the same tables keep working: they neither set nor check it.
const UPGRADE_FROM_1: &str = r#"
ALTER TABLE {s}messages ADD COLUMN IF NOT EXISTS lease bigint;
UPDATE {s}meta SET value = '{version}' WHERE key = 'version' AND value = '1';
"#;

/// The DDL for `schema`, as one script (documentation and `psql` users can read it from
/// [`crate::schema_sql`]).
pub(crate) fn ddl(schema: &str) -> String {
    DDL.replace("{s0}", &format!("\"{schema}\""))
        .replace("{s}", &format!("\"{schema}\"."))
        .replace("{version}", &VERSION.to_string())
}

/// Creates the tables of `schema` unless they are all there.
pub(crate) async fn create(conn: &mut PgConnection, schema: &str) -> Result<(), sqlx::Error> {
    let present: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT value FROM \"{schema}\".meta WHERE key = 'version'"
    )))
    .fetch_optional(&mut *conn)
    .await
    .or_else(|e| match &e {
        // 42P01: undefined table; 3F000: undefined schema.
        sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("42P01" | "3F000")) => {
            Ok(None)
        }
        _ => Err(e),
    })?;
    let upgrade = match present.as_deref() {
        None => None,
        Some("1") => Some(UPGRADE_FROM_1),
        Some(_) => return Ok(()),
    };
    let mut script = String::from("BEGIN;\n");
    script.push_str(&format!(
        "SELECT pg_advisory_xact_lock(hashtext('celeriac schema {schema}'));\n"
    ));
    match upgrade {
        Some(steps) => script.push_str(
            &steps
                .replace("{s}", &format!("\"{schema}\"."))
                .replace("{version}", &VERSION.to_string()),
        ),
        None => script.push_str(&ddl(schema)),
    }
    script.push_str("COMMIT;\n");
    let r = sqlx::raw_sql(AssertSqlSafe(script))
        .execute(&mut *conn)
        .await;
    if r.is_err() {
        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
    }
    r.map(|_| ())
}
