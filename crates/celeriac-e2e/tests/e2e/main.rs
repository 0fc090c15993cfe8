//! End-to-end tests: the example task app runs as a separate worker process over a SQLite file,
//! and the test is the client.

// Spawning and stopping worker processes, and the client app.
mod support;

// Results, failures, panics, unknown tasks and bad arguments.
mod outcomes;

// Retries, countdown/eta, expiry, revoke, rate limits and time limits.
mod scheduling;

// Shutdown and crashes: nothing is lost.
mod shutdown;

// The command line: call, result, status, purge, and its errors.
mod cli;

// Fault injection: SIGKILL mid-run, a spinning task, an aborting task, malformed floods.
mod reliability;

// Canvas: chains, links, groups, chords (one across a killed worker), chunks.
mod canvas;

// `worker -B`: periodic tasks from celeriac.toml, two workers on one file, SIGTERM.
mod beat;

// The deployment files (systemd units, supervisor config).
mod deploy;

// The log flags: -l in Celery's words, --logfile, --log-format json.
mod logging;

// Trace propagation (feature otel): the worker's task span continues the client's trace.
mod otel;
// Coordination across worker processes: cluster rate limits, concurrency caps, unique tasks.
mod coordination;
