//! The result backend conformance suite on a shared private memcached.

use std::sync::Arc;

use celeriac_core::{Config, DynBackend};
use celeriac_memcached::MemcachedBackend;
use celeriac_test::memcached::Memcached;

async fn backend() -> Option<DynBackend> {
    let server = Memcached::shared()?;
    let b = MemcachedBackend::connect(&server.url(), &Config::default())
        .await
        .expect("connect to the private memcached");
    Some(Arc::new(b))
}

celeriac_test::backend_conformance!(backend);
