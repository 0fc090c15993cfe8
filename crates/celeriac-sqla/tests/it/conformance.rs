//! The backend and broker conformance suites on both servers.

use celeriac_core::DynBackend;

use crate::util::{Server, dyn_backend};

mod postgres {
    use super::*;

    async fn backend() -> Option<DynBackend> {
        dyn_backend(Server::Postgres).await
    }

    celeriac_test::backend_conformance!(backend);
}

mod mariadb {
    use super::*;

    async fn backend() -> Option<DynBackend> {
        dyn_backend(Server::Maria).await
    }

    celeriac_test::backend_conformance!(backend);
}
