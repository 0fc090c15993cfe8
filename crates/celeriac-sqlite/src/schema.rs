//! The tables, created on first open and versioned with `PRAGMA user_version`.

use rusqlite::Connection;

/// The schema version this code writes.
pub(crate) const VERSION: i64 = 1;

/// Every table of version 1. See the crate docs for what each column means.
pub(crate) const DDL: &str = "
CREATE TABLE IF NOT EXISTS celeriac_queues (
    name TEXT PRIMARY KEY
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS celeriac_messages (
    id          INTEGER PRIMARY KEY,
    queue       TEXT    NOT NULL,
    priority    INTEGER NOT NULL,
    state       INTEGER NOT NULL,
    visible_at  INTEGER NOT NULL,
    deliveries  INTEGER NOT NULL DEFAULT 0,
    body        TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS celeriac_messages_ready
    ON celeriac_messages (queue, priority DESC, id) WHERE state = 0;
CREATE INDEX IF NOT EXISTS celeriac_messages_waiting
    ON celeriac_messages (queue, visible_at) WHERE state <> 0;

CREATE TABLE IF NOT EXISTS celeriac_results (
    task_id     TEXT PRIMARY KEY,
    status      TEXT NOT NULL,
    date_done   TEXT,
    expires_at  INTEGER,
    meta        TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS celeriac_results_expiry
    ON celeriac_results (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS celeriac_groups (
    group_id    TEXT PRIMARY KEY,
    task_ids    TEXT NOT NULL,
    expires_at  INTEGER
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS celeriac_counters (
    key         TEXT PRIMARY KEY,
    value       INTEGER NOT NULL,
    expires_at  INTEGER
) WITHOUT ROWID;
";

/// Message states (the `state` column).
pub(crate) const READY: i64 = 0;
/// Waiting for its not-before time (`visible_at`).
pub(crate) const DELAYED: i64 = 1;
/// Leased to a consumer until `visible_at`.
pub(crate) const LEASED: i64 = 2;

/// Creates the tables unless this file already has them.
///
/// The version is read first, so opening an existing database takes no write lock.
pub(crate) fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current >= VERSION {
        if current > VERSION {
            tracing::warn!(
                found = current,
                known = VERSION,
                "sqlite database was written by a newer celeriac"
            );
        }
        return Ok(());
    }
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE; {DDL} PRAGMA user_version = {VERSION}; COMMIT;"
    ))
    .inspect_err(|_| {
        let _ = conn.execute_batch("ROLLBACK");
    })
}
