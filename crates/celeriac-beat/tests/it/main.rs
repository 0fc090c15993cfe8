//! Integration tests of celeriac-beat, in one binary.

// Shared helpers: a recording dispatch, time grids.
mod support;

// The store: its conformance suite on the memory store, choosing a store from the URL,
// specs that no longer parse.
mod store;

// Several instances on one SQLite file: every tick once, leader loss, restart.
mod cluster;

// Missed-tick policies, restarts and run-time control on virtual time (memory store).
mod policy;

// Start-up checks and the command line (`beat add/list/pause/...`).
mod cli;

// The crontab parser and next-tick search under fuzzed text.
mod fuzz;
