//! The generic broker, broadcast, result backend and beat store conformance suites.

use std::sync::Arc;

use celeriac_core::{Config, DynBeatStore};
use celeriac_mysql::{MysqlBeatStore, MysqlOptions};

use crate::util::{dyn_backend, dyn_broker};

/// A beat store of its own: a fresh namespace per case.
async fn beat_store() -> Option<DynBeatStore> {
    let url = crate::util::url().await?;
    let options = MysqlOptions::from_url(&url, &Config::default())
        .expect("url")
        .beat_namespace(celeriac_test::services::unique_queue("beat"));
    Some(Arc::new(
        MysqlBeatStore::open(options)
            .await
            .expect("open mysql beat store"),
    ))
}

celeriac_test::broker_conformance!(dyn_broker);
celeriac_test::broadcast_conformance!(dyn_broker);
celeriac_test::backend_conformance!(dyn_backend);
celeriac_test::beat_store_conformance!(beat_store);
