//! The integration tests of celeriac-postgres: one binary, one module per area. They need the
//! PostgreSQL server at 127.0.0.1:5432 (user postgres, database test) and skip with a notice
//! without it (fail instead under CELERIAC_REQUIRE_SERVICES=1).

// The generic conformance suites of celeriac-test (broker, broadcast, backend, beat store).
mod conformance;
// Batched result stores keep precedence.
mod backend;
// The fencing token: a late ack of an expired lease.
mod broker;
// Clear errors: wrong password, missing database, missing permission, bad URLs.
mod errors;
// A private server (initdb/pg_ctl) for the tests that need a password or a restart.
mod private_pg;
// A private server stopped (as a crash) and started mid-run: nothing lost, consumers resume.
mod restart;
// Shared helpers.
mod util;
