//! The backend and broker conformance suites on both servers.

use celeriac_core::{DynBackend, DynBroker};

use crate::util::{Server, dyn_backend, dyn_broker};

mod postgres {
    use super::*;

    async fn backend() -> Option<DynBackend> {
        dyn_backend(Server::Postgres).await
    }

    async fn broker() -> Option<DynBroker> {
        dyn_broker(Server::Postgres).await
    }

    celeriac_test::backend_conformance!(backend);
    celeriac_test::broker_conformance!(broker);
}

mod mariadb {
    use super::*;

    async fn backend() -> Option<DynBackend> {
        dyn_backend(Server::Maria).await
    }

    async fn broker() -> Option<DynBroker> {
        dyn_broker(Server::Maria).await
    }

    celeriac_test::backend_conformance!(backend);
    celeriac_test::broker_conformance!(broker);
}
