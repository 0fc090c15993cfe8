//! celeriac-sqla's tests: the conformance suites and Python Celery interop on PostgreSQL
//! (127.0.0.1:5432) and MariaDB (127.0.0.1:3306); each skips with a notice when its server is
//! not there (fails under CELERIAC_REQUIRE_SERVICES=1).

mod conformance;
// Coordination tables beside Celery's, made on first use.
mod coord;
mod interop;
mod rows;
mod util;
