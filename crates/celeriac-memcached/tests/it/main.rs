//! The memcached result backend against a private `memcached` (Debian's package) on a free
//! port; every test skips with a `SKIPPED:` notice when the program is missing, and fails
//! instead under `CELERIAC_REQUIRE_SERVICES=1`.

// The result backend conformance suite, on one server shared by the binary.
mod conformance;

// Coordination across workers (locks, rate limits, slots): over two servers, on the wire.
mod coord;

// The client alone: pipelining, several servers, errors (too large, server down, timeouts).
mod client;

// Killing and restarting the server under the backend: recovery and what is lost.
mod restart;

// The stored bytes: keys, flags and documents as Celery's cache backend writes them.
mod wire;

// How quickly a polled wait sees a result, and what it costs the server.
mod latency;
