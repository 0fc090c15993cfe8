//! Interop with Python Celery, tested for real: Celery 5.7 (pinned in
//! `examples/python/requirements.txt`, installed on first use into `target/py-venv`) and
//! celeriac share a local Redis at 127.0.0.1:6379 (the `amqp` module: a RabbitMQ at
//! 127.0.0.1:5672).
//!
//! Each test uses its own Redis database and its own queue names, so tests running in parallel
//! (here or in other test binaries) never take each other's messages. A test skips with a
//! `SKIPPED:` notice when Redis is unreachable, when the venv cannot be made (no PyPI), or when
//! celeriac's `redis://` driver is not registered; `CELERIAC_REQUIRE_SERVICES=1` turns the first
//! two into failures.

// Redis, the venv and the driver check; our worker process; raw Redis reads through Python.
mod support;

// A Python client (send_task, AsyncResult) calling tasks on our worker.
mod python_client;

// Our client calling tasks on a Python worker.
mod python_worker;

// One queue served by a Python worker and ours at once.
mod mixed;

// The raw layout of messages and result documents, each side against the other.
mod layout;

// The same over RabbitMQ, with the rpc:// and Redis result backends.
mod amqp;

// Canvas across languages: Python-built chains and chords on our worker, ours on Python's.
mod canvas;

// Celery's inspect, control, events and Flower against our worker; a mixed cluster's tools.
mod control;

// W3C trace context (feature otel): a Python client's traceparent continued by our worker.
mod otel;
// Signed messages (Celery's auth serializer) both ways, and forgeries refused.
mod security;

// Celery's cache result backend on memcached: results both ways (tasks through Redis).
mod memcached;
