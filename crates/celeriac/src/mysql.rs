//! MariaDB/MySQL: the driver crate ([`celeriac_mysql`], re-exported here) and transactional
//! enqueue, [`send_in`].
//!
//! With the `mysql` feature, `mysql://` and `mariadb://` URLs open the MariaDB/MySQL broker,
//! result backend and beat store (see `docs/mysql.md`).

pub use celeriac_mysql::*;

use crate::{App, AsyncResult, Error, ErrorKind, Result, Signature};

/// Sends `sig` inside the caller's transaction: the task exists if and only if the
/// transaction commits.
///
/// The message is built exactly as [`Signature::apply_async`] builds it
/// ([`App::prepare_send`]: routing, options, eta, priority) and written by `conn`, a
/// connection in the caller's transaction (`&mut tx` for a `sqlx::Transaction<'_, MySql>`),
/// into the `celeriac_messages` table of the app's MariaDB/MySQL broker. Workers poll, so
/// they find it within their poll interval after the commit; after a rollback the task
/// never existed. The transaction must be on the broker's database; the task-sent event
/// (`task_send_sent_event`) is not sent this way. Composite signatures (chains, groups,
/// chords) are refused: they are several messages.
///
/// ```no_run
/// # async fn demo(app: celeriac::App, pool: celeriac::mysql::sqlx::MySqlPool) -> celeriac::Result<()> {
/// use celeriac::mysql::sqlx;
/// use celeriac::Signature;
///
/// let mut tx = pool.begin().await.expect("begin");
/// sqlx::query("INSERT INTO orders (id, total) VALUES (42, 990)")
///     .execute(&mut *tx)
///     .await
///     .expect("insert");
/// let receipt = celeriac::mysql::send_in(
///     &mut tx,
///     &app,
///     &Signature::<()>::new("orders.send_receipt").arg(42),
/// )
/// .await?;
/// tx.commit().await.expect("commit"); // the order and its task, or neither
/// # let _ = receipt; Ok(()) }
/// ```
pub async fn send_in<O>(
    conn: &mut sqlx::mysql::MySqlConnection,
    app: &App,
    sig: &Signature<O>,
) -> Result<AsyncResult<O>> {
    if app.broker().driver() != "mysql" {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "send_in needs the app's broker on MariaDB/MySQL (mysql://…), not {}",
                app.broker().driver()
            ),
        ));
    }
    let prepared = app.prepare_send(sig)?;
    let id = prepared.message.id().to_owned();
    publish_in(conn, &prepared.queue, &prepared.message, prepared.options).await?;
    tracing::debug!(task_id = %id, task_name = %sig.task, queue = %prepared.queue, "task sent in a transaction");
    Ok(AsyncResult::sent(app, id))
}
