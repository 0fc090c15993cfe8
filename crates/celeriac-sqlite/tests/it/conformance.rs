//! The generic broker, broadcast and result backend conformance suites, each test on a fresh
//! file.

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
celeriac_test::broadcast_conformance!(broker);
celeriac_test::backend_conformance!(backend);

/// The result probe: a broker and a backend in one file read states with the fetch; a
/// backend in another file is not this store.
#[test]
fn result_probe() {
    celeriac_test::conformance::run_case(async {
        let path = crate::util::db("probe");
        let broker = SqliteBroker::open(&path, SqliteOptions::default())
            .await
            .expect("open sqlite broker");
        let backend = SqliteBackend::open(&path, SqliteOptions::default())
            .await
            .expect("open sqlite backend");
        let elsewhere =
            SqliteBackend::open(crate::util::db("probe_other"), SqliteOptions::default())
                .await
                .expect("open sqlite backend");
        celeriac_test::conformance::broker::case_result_probe(
            Arc::new(broker),
            Arc::new(backend),
            Arc::new(elsewhere),
        )
        .await;
    });
}
