//! Transactional enqueue: a message written by the caller's own transaction.

use celeriac_core::{ErrorKind, Message, PublishOptions, Result};
use sqlx::mysql::MySqlConnection;

use crate::broker::{insert_query, new_row};
use crate::db::map_err;

/// Publishes `message` to `queue` inside the caller's transaction (or on any connection): the
/// message exists only if that transaction commits, and no worker sees it before.
///
/// `conn` must be a connection to the database of the broker's URL, whose tables exist (any
/// [`MysqlBroker`](crate::MysqlBroker) opened on it once creates them). Pass `&mut tx` for a
/// `sqlx::Transaction<'_, MySql>`. The insert is the broker's own (`celeriac_messages`), so
/// delays and priorities work as with [`Broker::publish`](celeriac_core::Broker::publish).
/// Workers poll, so a committed message is picked up within their poll interval.
///
/// The facade's `celeriac::mysql::send_in` builds the message as `apply_async` would and calls
/// this; use it rather than building messages by hand.
///
/// Holds no lock that makes concurrent transactions wait for each other: the queue's row in
/// `celeriac_queues` is read without a lock and only inserted when missing (`INSERT IGNORE`).
pub async fn publish_in(
    conn: &mut MySqlConnection,
    queue: &str,
    message: &Message,
    options: PublishOptions,
) -> Result<()> {
    const WHAT: &str = "cannot publish to mysql queue in the caller's transaction";
    let row = new_row(queue, message, &options)?;
    let found = sqlx::query("SELECT 1 FROM celeriac_queues WHERE name = ?")
        .bind(queue)
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| map_err(ErrorKind::Broker, WHAT, e))?;
    if found.is_none() {
        sqlx::query("INSERT IGNORE INTO celeriac_queues (name) VALUES (?)")
            .bind(queue)
            .execute(&mut *conn)
            .await
            .map_err(|e| map_err(ErrorKind::Broker, WHAT, e))?;
    }
    let rows = [row];
    insert_query(queue, &rows)
        .execute(&mut *conn)
        .await
        .map_err(|e| map_err(ErrorKind::Broker, WHAT, e))?;
    Ok(())
}
