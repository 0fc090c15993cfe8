//! Test support for celeriac: the driver conformance suite and service fixtures.
//!
//! This crate is for people who write or change a broker, result backend or beat store driver,
//! and for celeriac's own integration tests. It is not published.
//!
//! # A tour
//!
//! - [`conformance`]: [`broker_conformance!`], [`backend_conformance!`] and
//!   [`beat_store_conformance!`] stamp one test per contract case into a driver's test binary,
//!   given a setup function that opens the driver (or returns `None` when its server is
//!   unreachable). The cases themselves are plain async functions in [`conformance::broker`],
//!   [`conformance::backend`] and [`conformance::beat`].
//! - [`services`]: skip-or-fail checks for external servers ([`services::require_service`]),
//!   fresh SQLite files under `target/` ([`services::temp_sqlite_path`]), unique queue names and
//!   ready-made task messages.
//! - [`memcached`]: a private `memcached` on a free port, which a test may kill and restart.
//! - [`fuzz`]: a mutation fuzzer for the decoders of untrusted input, run for a fixed budget
//!   by the tests and for longer by `scripts/fuzz`.
//! - [`python`]: the Python Celery side of interop tests: a pinned venv made on first use, a
//!   Python worker process ([`python::PythonWorker`]) and Python client snippets
//!   ([`python::run_python_client`]).
//!
//! # Using the suite from a driver crate
//!
//! Add `celeriac-test` as a dev-dependency, then in the driver's integration binary:
//!
//! ```
//! use celeriac_core::{DynBackend, DynBroker};
//! use celeriac_core::memory::{MemoryBackend, MemoryBroker};
//!
//! async fn broker() -> Option<DynBroker> {
//!     Some(std::sync::Arc::new(MemoryBroker::new()))
//! }
//!
//! async fn backend() -> Option<DynBackend> {
//!     Some(std::sync::Arc::new(MemoryBackend::new()))
//! }
//!
//! celeriac_test::broker_conformance!(broker);
//! celeriac_test::backend_conformance!(backend);
//! # fn main() {}
//! ```
//!
//! The generated tests build their own multi-threaded tokio runtime through this crate, so the
//! driver crate needs no tokio dev-dependency for them.

pub mod conformance;
pub mod fuzz;
pub mod memcached;
pub mod python;
pub mod services;

#[doc(hidden)]
pub mod __private {
    //! Paths used by the macros' expansion; not a public API.
    pub use tokio;
}
