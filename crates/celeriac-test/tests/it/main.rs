//! The integration tests of celeriac-test: one binary, one module per area.

// The conformance suites against the in-memory broker and backend.
mod memory;
// Broken drivers: proof that the conformance cases can fail.
mod broken;
// Service fixtures: skip notices, SQLite paths, queue names, messages.
mod services;
