//! The core of celeriac: the message protocol, the broker, result backend and beat store
//! contracts, and in-memory drivers.
//!
//! Depend on this crate, not on `celeriac`, to write a broker or backend driver: it names no
//! network library. Users of the task queue depend on the `celeriac` facade.
//!
//! # A tour
//!
//! - [`protocol`]: Celery's message protocol v2 ([`Message`], [`Headers`], [`Body`]) and
//!   kombu's JSON envelope, so Python Celery peers read what we write.
//! - [`TaskState`] and [`TaskMeta`]: states with Celery's ready sets and precedence, and the
//!   record a result backend keeps.
//! - [`broadcast`]: Celery's remote-control and event channels, for brokers that carry them.
//! - [`broker`] and [`backend`]: the [`Broker`] and [`ResultBackend`] traits every driver
//!   implements, held as [`DynBroker`] / [`DynBackend`] and opened from a URL through
//!   [`Drivers`].
//! - [`beat`]: the [`BeatStore`] contract (leader lease with a fencing token, entry state,
//!   run-time controls) that periodic tasks run on, implemented by the driver crates and
//!   opened from a URL through [`Drivers`] as a [`DynBeatStore`].
//! - [`canvas`]: how a call is sent ([`SendOptions`](canvas::SendOptions)), signature maps to
//!   messages (callbacks, chains, chords), chord counter keys; [`flow`]: dataflow graphs.
//! - [`task`]: what the worker runs: [`TaskDef`], [`Registry`], [`Args`], [`TaskError`],
//!   [`TaskContext`].
//! - [`memory`]: drivers with real semantics (leases, delays, priorities) for tests, and a
//!   beat store.
//! - [`security`]: signed message bodies on the wire of Celery's `auth` serializer (the
//!   [`BodySigner`](security::BodySigner) contract; keys and RSA-PSS with the `security`
//!   feature).
//! - [`Config`]: `celeriac.toml` plus `CELERIAC_*` variables.
//!
//! # Features
//!
//! - `msgpack`: the `application/x-msgpack` body codec.
//! - `otel`: [`otel`]: W3C `traceparent`/`tracestate` headers written from the sending span's
//!   OpenTelemetry context by [`canvas::build_call`], and read back for the worker.
//! - `security`: `security::Security`, signed messages on the wire of Celery's `auth`
//!   serializer (X.509 RSA keys through the `openssl` crate).

pub mod backend;
pub mod beat;
pub mod broadcast;
pub mod broker;
pub mod canvas;
pub mod config;
pub mod coord;
pub mod error;
pub mod flow;
pub mod memory;
pub mod meta;
#[cfg(feature = "otel")]
pub mod otel;
pub mod protocol;
pub mod ratelimit;
pub mod security;
pub mod state;
pub mod task;
pub mod time;
pub mod url;

pub use backend::{BackendCapabilities, DynBackend, ResultBackend};
pub use beat::{BeatStore, DynBeatStore};
pub use broker::{
    Acker, BoxFuture, Broker, Capabilities, ConsumeOptions, Consumer, Delivery, DeliveryHandle,
    DynBroker, PublishOptions, QueueStats, Requeue, ResultProbe, StoredState,
};
pub use config::{Config, hostname};
pub use error::{BoxError, Error, ErrorKind, Result};
pub use meta::{RemoteError, TaskMeta};
pub use protocol::{Body, ContentType, Embed, Headers, Message, Properties, Signature, TimeLimit};
pub use ratelimit::{RateLimit, TokenBucket};
pub use state::TaskState;
pub use task::{
    Args, Cancellation, Handler, RateLimitScope, Registry, Task, TaskContext, TaskDef, TaskError,
    TaskErrorKind, TaskOptions,
};
pub use url::Drivers;
