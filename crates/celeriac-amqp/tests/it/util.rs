//! Helpers: the server's address, raw channels (the crate's own client) and connection killing.

use std::sync::Arc;

use celeriac_amqp::AmqpBroker;
use celeriac_amqp::wire::{Channel, Connection, ConnectionParams};
use celeriac_core::{Config, DynBroker};

pub(crate) const ADDR: &str = "127.0.0.1:5672";
pub(crate) const URL: &str = "amqp://guest:guest@127.0.0.1:5672//";

/// Whether RabbitMQ is up (else the test prints SKIPPED and returns).
pub(crate) fn rabbit_up() -> bool {
    celeriac_test::services::require_service("rabbitmq", ADDR)
}

/// A broker on `URL` plus `query` (e.g. `max_priority=10`).
pub(crate) async fn broker(query: &str) -> AmqpBroker {
    let url = if query.is_empty() {
        URL.to_owned()
    } else {
        format!("{URL}?{query}")
    };
    AmqpBroker::connect(&url, &Config::default())
        .await
        .expect("connect to rabbitmq")
}

/// The same, as a trait object.
pub(crate) async fn dyn_broker(query: &str) -> DynBroker {
    Arc::new(broker(query).await)
}

/// A plain connection and channel, to look at what the driver did.
pub(crate) async fn raw() -> (Connection, Channel) {
    let conn = Connection::open(&ConnectionParams::new("127.0.0.1", 5672))
        .await
        .expect("raw connection");
    let ch = conn.open_channel().await.expect("raw channel");
    (conn, ch)
}

/// Closes, server side, every connection whose name contains `marker`; returns how many.
pub(crate) async fn kill_connections(marker: &str) -> usize {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .await
        .expect("run rabbitmqctl (needed to close connections server side)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut killed = 0;
    for line in text.lines().filter(|l| l.contains(marker)) {
        let Some(pid) = line.split_whitespace().next() else {
            continue;
        };
        let status = tokio::process::Command::new("rabbitmqctl")
            .args(["-q", "close_connection", pid, "celeriac test"])
            .status()
            .await
            .expect("rabbitmqctl close_connection");
        if status.success() {
            killed += 1;
        }
    }
    killed
}
