//! The integration tests of celeriac-amqp: one binary, one module per area. Each needs a
//! RabbitMQ at 127.0.0.1:5672 (guest/guest) and skips with a notice without one.
//!
//! The Python Celery venv of `celeriac_test::python` is made on first use (`interop.rs`).
//!
//! Two tests live in binaries of their own, because they change what the whole process or
//! server sees: `rpc.rs` (an rpc backend makes every publish of the process carry its reply
//! queue) and `restart.rs` (restarts the server).

// Held-back acks (`basic.ack multiple`) around rejects; refused publishes among many in
// flight.
mod acks;
// Remote control and events: malformed messages, killed connections, node names in use.
mod broadcast;
// The generic broker and broadcast conformance suites of celeriac-test, on classic priority
// queues.
mod conformance;
// Entities and arguments as Celery declares them; properties and headers on the wire.
mod entities;
// Bad credentials and vhosts, unreachable ports, killed connections, malformed messages.
mod errors;
// `;`-separated url lists: a server killed mid-run (TCP proxies in front of the one RabbitMQ),
// a first url down at start-up.
mod failover;
// Remote control and events with Python Celery 5.7: entities, requests, replies, events.
mod interop;
// amqps:// through a TLS-terminating proxy (feature `tls`).
#[cfg(feature = "tls")]
mod tls;
// Shared helpers: URLs, raw channels, rabbitmqctl.
mod util;
