//! The integration tests of celeriac-sqlite: one binary, one module per area.

// Broker behaviour on one file: ordering, delays, leases, prefetch, settling, closing.
mod broker;
// Result backend: precedence, waiting, expiry, groups, counters.
mod backend;
// Remote control and events: rows, malformed rows, the sweep, older files.
mod broadcast;
// The beat store: its conformance suite, URLs, older files, corrupt rows, one thread per file.
mod beat;
// The generic conformance suites of celeriac-test.
mod conformance;
// Clear errors for bad input: missing directory, not a database, locked, closed, bad URL.
mod errors;
// Several OS processes on one file, including one killed while holding leases.
mod multiprocess;
// Shared helpers.
mod util;
