//! The conformance suites against the in-memory broker and result backend.

use std::sync::Arc;

use celeriac_core::memory::{MemoryBackend, MemoryBroker};
use celeriac_core::{DynBackend, DynBroker};

async fn broker() -> Option<DynBroker> {
    Some(Arc::new(MemoryBroker::new()))
}

async fn backend() -> Option<DynBackend> {
    Some(Arc::new(MemoryBackend::new()))
}

celeriac_test::broker_conformance!(broker);
celeriac_test::broadcast_conformance!(broker);
celeriac_test::backend_conformance!(backend);
