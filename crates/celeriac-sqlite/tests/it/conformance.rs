//! The generic broker and result backend conformance suites, each test on a fresh file.

use std::sync::Arc;

use celeriac_core::{DynBackend, DynBroker};
use celeriac_sqlite::{SqliteBackend, SqliteBroker, SqliteOptions};

async fn broker() -> Option<DynBroker> {
    let b = SqliteBroker::open(
        crate::util::db("conformance_broker"),
        SqliteOptions::default(),
    )
    .await
    .expect("open sqlite broker");
    Some(Arc::new(b))
}

async fn backend() -> Option<DynBackend> {
    let b = SqliteBackend::open(
        crate::util::db("conformance_backend"),
        SqliteOptions::default(),
    )
    .await
    .expect("open sqlite backend");
    Some(Arc::new(b))
}

celeriac_test::broker_conformance!(broker);
celeriac_test::backend_conformance!(backend);
