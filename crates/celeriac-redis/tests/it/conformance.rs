//! The generic broker and result backend conformance suites, each test under its own prefix.

use std::sync::Arc;

use celeriac_core::{DynBackend, DynBroker};
use celeriac_redis::RedisOptions;

use crate::util;

async fn broker() -> Option<DynBroker> {
    if !util::redis_up() {
        return None;
    }
    Some(Arc::new(
        util::broker_with(&util::prefix(), RedisOptions::default()).await,
    ))
}

async fn backend() -> Option<DynBackend> {
    if !util::redis_up() {
        return None;
    }
    Some(Arc::new(
        util::backend_with(&util::prefix(), RedisOptions::default()).await,
    ))
}

celeriac_test::broker_conformance!(broker);
celeriac_test::broadcast_conformance!(broker);
celeriac_test::backend_conformance!(backend);
