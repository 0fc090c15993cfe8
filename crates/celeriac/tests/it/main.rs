//! Integration tests of the `celeriac` facade, in one binary.

// The #[task] macro: trybuild pass/fail cases.
mod ui;

// Public handles are Send + Sync.
mod send_sync;

// The app on the in-memory drivers: wire format, routing, an in-process worker.
mod app;

// Canvas: chains, groups, chords, map/starmap/chunks, links, with an in-process worker.
mod canvas;

// Transactional enqueue on MariaDB/MySQL with a real worker (needs the server).
#[cfg(feature = "mysql")]
mod mysql;
// Transactional enqueue on PostgreSQL with an in-process worker.
#[cfg(feature = "postgres")]
mod postgres;
