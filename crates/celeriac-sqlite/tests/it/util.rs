//! Helpers: fresh database files and messages.

use std::path::PathBuf;
use std::time::Duration;

use celeriac_core::{Consumer, Delivery, Message};

/// A fresh database path under `target/`.
pub(crate) fn db(name: &str) -> PathBuf {
    celeriac_test::services::temp_sqlite_path(&format!("celeriac_sqlite_{name}"))
}

/// A task message with a fresh id.
pub(crate) fn msg() -> Message {
    celeriac_test::services::test_message("tests.add")
}

/// The next delivery, failing the test after `within`.
pub(crate) async fn next_within(consumer: &mut Box<dyn Consumer>, within: Duration) -> Delivery {
    tokio::time::timeout(within, consumer.next())
        .await
        .expect("a delivery in time")
        .expect("next")
        .expect("not closed")
}

/// Whether `next` stays pending for `window`.
pub(crate) async fn quiet_for(consumer: &mut Box<dyn Consumer>, window: Duration) -> bool {
    tokio::time::timeout(window, consumer.next()).await.is_err()
}
