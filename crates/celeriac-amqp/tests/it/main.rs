//! The integration tests of celeriac-amqp: one binary, one module per area (plus `restart.rs`,
//! alone because it restarts the server). Each needs a
//! RabbitMQ at 127.0.0.1:5672 (guest/guest) and skips with a notice without one.

// The generic broker conformance suite of celeriac-test, on classic priority queues.
mod conformance;
// Entities and arguments as Celery declares them; properties and headers on the wire.
mod entities;
// The rpc result backend.
mod rpc;
// Bad credentials and vhosts, unreachable ports, killed connections, malformed messages.
mod errors;
// Shared helpers: URLs, raw channels, rabbitmqctl.
mod util;
