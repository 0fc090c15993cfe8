//! The integration tests of celeriac-mysql: one binary, one module per area. They need the
//! MariaDB/MySQL server at 127.0.0.1:3306 (root, no password) and skip with a notice without
//! it (they fail instead under `CELERIAC_REQUIRE_SERVICES=1`). Every test uses the database
//! `celeriac_it`, created on first use, with its own queue names, task ids and beat namespaces.

// The generic conformance suites of celeriac-test: broker, broadcast, backend, beat store.
mod conformance;
// Broker behaviour beyond the suite: the fencing token, giving rows back, concurrent starts.
mod broker;
// Result expiry; broadcast rows committed out of order.
mod backend;
// Clear errors: wrong password, missing database, missing privileges, bad URLs.
mod errors;
// A private MariaDB server SIGKILLed and restarted mid-run.
mod restart;
// Idle cost and polling latency on a private server (ignored; run by hand).
mod measure;
// Shared helpers.
mod util;
