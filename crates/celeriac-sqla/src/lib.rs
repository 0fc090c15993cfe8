//! Celery's own SQL layouts for celeriac, on PostgreSQL and MariaDB/MySQL, so that Python
//! Celery and celeriac share one database.
//!
//! - [`SqlaBackend`]: Celery's database result backend (`db+postgresql://…`,
//!   `db+mysql://…`): rows in `celery_taskmeta` and `celery_tasksetmeta` as Celery 5.7's
//!   SQLAlchemy models make them. Chord counters and coordination across workers (cluster
//!   rate limits, unique tasks, `max_concurrency`; [`celeriac_core::coord`]) live in small
//!   tables of celeriac's own beside them ([`COUNTERS_TABLE`], [`COORD_KEYS_TABLE`],
//!   [`COORD_SLOTS_TABLE`]), so Celery's stay exactly as Celery makes them.
//! - [`SqlaBroker`]: kombu's SQLAlchemy transport (`sqla+postgresql://…`, `sqla+mysql://…`):
//!   messages in `kombu_message`, queues in `kombu_queue`.
//!
//! The layouts, what works and the limits: docs/celery-sql.md. The native drivers
//! (celeriac-postgres, celeriac-mysql) are faster and do more; these exist for sharing a
//! database with Python Celery.

// With one database only, the other's statements and helpers go unused.
#![cfg_attr(
    not(all(feature = "postgres", feature = "mysql")),
    allow(dead_code, unused_imports, unused_variables)
)]

#[cfg(not(any(feature = "postgres", feature = "mysql")))]
compile_error!("celeriac-sqla needs its `postgres` feature, its `mysql` feature, or both");

mod backend;
mod broker;
mod db;
mod schema;
mod url;

use std::sync::Arc;

use celeriac_core::{Drivers, DynBackend, DynBroker};

pub use backend::{
    COORD_KEYS_TABLE, COORD_SLOTS_TABLE, COUNTERS_TABLE, SqlaBackend, SqlaBackendOptions,
};
pub use broker::{SqlaBroker, SqlaBrokerOptions};
pub use url::Dialect;

/// The `db+…` schemes of the result backend, Celery's spellings (SQLAlchemy's
/// `dialect+driver`; the driver part is ignored).
pub const BACKEND_SCHEMES: &[&str] = &[
    "db+postgresql",
    "db+postgres",
    "db+postgresql+psycopg2",
    "db+postgresql+psycopg",
    "db+postgresql+asyncpg",
    "db+postgresql+pg8000",
    "db+mysql",
    "db+mariadb",
    "db+mysql+pymysql",
    "db+mysql+mysqldb",
    "db+mysql+mysqlconnector",
    "db+mysql+asyncmy",
    "db+mysql+aiomysql",
    "db+mariadb+pymysql",
    "db+mariadb+mysqldb",
    "db+mariadb+mariadbconnector",
];

/// The `sqla+…` schemes of the broker.
pub const BROKER_SCHEMES: &[&str] = &[
    "sqla+postgresql",
    "sqla+postgres",
    "sqla+postgresql+psycopg2",
    "sqla+postgresql+psycopg",
    "sqla+postgresql+asyncpg",
    "sqla+postgresql+pg8000",
    "sqla+mysql",
    "sqla+mariadb",
    "sqla+mysql+pymysql",
    "sqla+mysql+mysqldb",
    "sqla+mysql+mysqlconnector",
    "sqla+mysql+asyncmy",
    "sqla+mysql+aiomysql",
    "sqla+mariadb+pymysql",
    "sqla+mariadb+mysqldb",
    "sqla+mariadb+mariadbconnector",
];

/// Adds the `db+…` result backend schemes and the `sqla+…` broker schemes to `drivers`.
///
/// ```
/// let mut drivers = celeriac_core::Drivers::new();
/// celeriac_sqla::register(&mut drivers);
/// assert!(format!("{drivers:?}").contains("db+postgresql"));
/// ```
pub fn register(drivers: &mut Drivers) {
    for scheme in BACKEND_SCHEMES {
        drivers.add_backend(scheme, |url, config| {
            Box::pin(async move {
                Ok(Arc::new(SqlaBackend::connect(&url, &config).await?) as DynBackend)
            })
        });
    }
    for scheme in BROKER_SCHEMES {
        drivers.add_broker(scheme, |url, config| {
            Box::pin(
                async move { Ok(Arc::new(SqlaBroker::connect(&url, &config).await?) as DynBroker) },
            )
        });
    }
}
