//! Helpers: the server's URL, fresh schemas.

use celeriac_core::Config;
use celeriac_postgres::PgOptions;

/// The shared test server (trust auth).
pub(crate) const ADDR: &str = "127.0.0.1:5432";
pub(crate) const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Whether the server is up (prints a SKIPPED notice when not).
pub(crate) fn available() -> bool {
    celeriac_test::services::require_service("postgres", ADDR)
}

/// A schema no other test uses.
pub(crate) fn fresh_schema(prefix: &str) -> String {
    let id = celeriac_core::protocol::new_id().replace('-', "");
    format!("t_{prefix}_{}", &id[20..])
}

/// Options on the shared test schema (tests use unique queue names and ids).
pub(crate) fn options(schema: &str) -> PgOptions {
    PgOptions::from_url(&format!("{URL}?schema={schema}"), &Config::default())
        .expect("valid url")
        .with_pool_size(4)
}
