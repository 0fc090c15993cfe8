//! The generic broker, broadcast, result backend and beat store conformance suites.

use std::sync::Arc;

use celeriac_core::{DynBackend, DynBeatStore, DynBroker};
use celeriac_postgres::{PgBackend, PgBeatStore, PgBroker};

use crate::util::{available, fresh_schema, options};

const SHARED: &str = "t_conformance";

async fn broker() -> Option<DynBroker> {
    if !available() {
        return None;
    }
    let b = PgBroker::open(options(SHARED))
        .await
        .expect("open postgres broker");
    Some(Arc::new(b))
}

async fn backend() -> Option<DynBackend> {
    if !available() {
        return None;
    }
    let b = PgBackend::open(options(SHARED))
        .await
        .expect("open postgres backend");
    Some(Arc::new(b))
}

async fn beat_store() -> Option<DynBeatStore> {
    if !available() {
        return None;
    }
    let s = PgBeatStore::open(options(&fresh_schema("beat")))
        .await
        .expect("open postgres beat store");
    Some(Arc::new(s))
}

celeriac_test::broker_conformance!(broker);
celeriac_test::broadcast_conformance!(broker);
celeriac_test::backend_conformance!(backend);
celeriac_test::beat_store_conformance!(beat_store);

/// The result probe: a broker and a backend on one schema read states with the fetch; a
/// backend on another schema is not this store.
#[test]
fn result_probe() {
    celeriac_test::conformance::run_case(async {
        if !available() {
            return;
        }
        let broker = PgBroker::open(options(SHARED)).await.expect("broker");
        let backend = PgBackend::open(options(SHARED)).await.expect("backend");
        let elsewhere = PgBackend::open(options("t_probe_other"))
            .await
            .expect("backend");
        celeriac_test::conformance::broker::case_result_probe(
            Arc::new(broker),
            Arc::new(backend),
            Arc::new(elsewhere),
        )
        .await;
    });
}
