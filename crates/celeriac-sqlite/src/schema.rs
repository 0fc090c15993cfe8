//! The tables, created on first open and versioned with `PRAGMA user_version`.

use rusqlite::Connection;

/// The schema version this code writes.
pub(crate) const VERSION: i64 = 4;

/// Every table of version 1. See the crate docs for what each column means.
const V1: &str = "
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

/// Version 2 adds the broadcast channels (remote control and events; see `broadcast.rs`).
///
/// `AUTOINCREMENT` because inboxes read rows by `id > last seen`: without it, SQLite may hand
/// out the id of a deleted newest row again once the sweep has emptied the table, and a
/// listener would take the new row for one it already read.
const V2: &str = "
CREATE TABLE IF NOT EXISTS celeriac_broadcast (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    channel      TEXT    NOT NULL,
    routing_key  TEXT    NOT NULL,
    body         TEXT    NOT NULL,
    created_at   INTEGER NOT NULL
);
";

/// Version 3 adds coordination across workers (cluster rate limits, unique-task locks,
/// concurrency slots; see `coord.rs`): one row per rate-limited key (`until` = its GCRA
/// time in microseconds) or lock (`holder` until `until`, ms), and one per leased slot.
const V3: &str = "
CREATE TABLE IF NOT EXISTS celeriac_coord_keys (
    key     TEXT PRIMARY KEY,
    holder  TEXT,
    until   INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS celeriac_coord_slots (
    key     TEXT NOT NULL,
    holder  TEXT NOT NULL,
    until   INTEGER NOT NULL,
    PRIMARY KEY (key, holder)
) WITHOUT ROWID;
";

/// Version 4 adds the wake sequences: `messages` grows with every commit that makes messages
/// deliverable (publishes, requeues, given-back prefetches), so a process that sees the file
/// change wakes its idle consumers only when that number grew, not for every ack and result
/// of other processes (see `conn.rs`).
const V4: &str = "
CREATE TABLE IF NOT EXISTS celeriac_wake (
    what  TEXT    PRIMARY KEY,
    seq   INTEGER NOT NULL
) WITHOUT ROWID;
";

/// The steps from an older version: each brings a file from the version before it to its
/// own. Every statement is idempotent (`IF NOT EXISTS`), so two processes upgrading one file
/// at once cannot fail on each other.
const STEPS: [(i64, &str); 4] = [(1, V1), (2, V2), (3, V3), (4, V4)];

/// Message states (the `state` column).
pub(crate) const READY: i64 = 0;
/// Waiting for its not-before time (`visible_at`).
pub(crate) const DELAYED: i64 = 1;
/// Leased to a consumer until `visible_at`.
pub(crate) const LEASED: i64 = 2;

/// Creates the tables of every version this file lacks, then records [`VERSION`].
///
/// The version is read first, so opening an up-to-date database takes no write lock.
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
    let ddl: String = STEPS
        .iter()
        .filter(|(v, _)| *v > current)
        .map(|(_, ddl)| *ddl)
        .collect();
    if current > 0 {
        tracing::info!(from = current, to = VERSION, "upgrading the sqlite schema");
    }
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE; {ddl} PRAGMA user_version = {VERSION}; COMMIT;"
    ))
    .inspect_err(|_| {
        let _ = conn.execute_batch("ROLLBACK");
    })
}

/// SQLite's query plan of `sql`, one line per step (for tests that check a statement seeks an
/// index and never sorts).
#[cfg(test)]
pub(crate) fn query_plan(conn: &rusqlite::Connection, sql: &str) -> String {
    let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
    let mut rows = stmt.raw_query();
    let mut lines = Vec::new();
    while let Some(r) = rows.next().unwrap() {
        lines.push(r.get::<_, String>(3).unwrap());
    }
    lines.join("\n")
}
