//! Integration tests of the worker, on the in-memory broker and backend.
//!
//! Waits poll to a deadline (`support::until`, `backend.wait`) or use paused time; nothing
//! synchronises with a fixed sleep.

mod support;

// Running tasks: results and extended fields, both pools, concurrency and prefetch.
mod basics;
// Messages that cannot run: undecodable, unknown names, wrong arguments, panics.
mod refusals;
// When to run: duplicates, revocation, expiry, eta.
mod schedule;
// Acknowledgement: early, late, lease extension.
mod acks;
// Retries and rejections.
mod retry;
// Per-task rate limits.
mod ratelimit;
// Coordination across workers: cluster rate limits, concurrency caps, unique locks.
mod coord;
// Soft and hard time limits.
mod timelimit;
// The processes pool: children, hard limits that kill, crashes, recycling.
mod processes;
// Dead letters: refused and poison messages, list, inspect, requeue, purge.
mod dead;
// Revokes with terminate for running tasks.
mod revoke;
// Warm and cold shutdown.
mod shutdown;
// Canvas: callbacks, errbacks, chains and chords in `embed`.
mod canvas;
// Users' layers around runs and deliveries.
mod layers;
// Remote control (inspect, control) and events.
mod control;
// Tracing spans, auto traits.
mod misc;
