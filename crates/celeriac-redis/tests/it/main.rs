//! The integration tests of celeriac-redis: one binary, one module per area. Each needs a
//! Redis at 127.0.0.1:6379 and skips with a notice without one.

// The generic conformance suites of celeriac-test.
mod conformance;
// kombu's keys and formats, read back with a plain connection; Python-written entries.
mod kombu;
// Celery's result documents, PUBLISH and waiting.
mod backend;
// The beat store: its conformance suite, keys, the lease's expiry on the server, URLs.
mod beat;
// Remote control and events: kombu's channels, bindings and lists; Python on the other end.
mod broadcast;
// Lost connections, bad passwords, unreachable ports, URLs.
mod errors;
// The redelivery counter, batched fetching, wake-ups.
mod redelivery;
// The result probe: task states read with the fetch.
mod probe;
// rediss:// against a private TLS redis-server.
#[cfg(feature = "tls")]
mod tls;
// The worker's max_redeliveries on Redis.
mod worker;
// The native layout (Redis Streams): the conformance suite again, its keys and counters.
mod native;
// Shared helpers: unique key prefixes, raw connections.
mod util;
