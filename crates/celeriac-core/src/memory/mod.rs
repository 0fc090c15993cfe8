//! In-memory broker, result backend and beat store with the same semantics as the real drivers.
//!
//! For unit tests and eager mode: leases, delays, priorities and precedence behave as they do on
//! SQLite, but nothing survives the process. URL: `memory://`.

mod backend;
mod beat;
mod broadcast;
mod broker;

pub use backend::MemoryBackend;
pub use beat::MemoryBeatStore;
pub use broker::MemoryBroker;
