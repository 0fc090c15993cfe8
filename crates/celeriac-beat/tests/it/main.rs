//! Integration tests of celeriac-beat, in one binary.

// Shared helpers: a recording dispatch, time grids.
mod support;

// The store contract on memory, SQLite and Redis; choosing a store from the URL.
mod conformance;

// Several instances on one SQLite file: every tick once, leader loss, restart.
mod cluster;

// Missed-tick policies, restarts and run-time control on virtual time (memory store).
mod policy;

// Start-up checks and the command line (`beat add/list/pause/...`).
mod cli;
