//! PostgreSQL: the driver crate ([`celeriac_postgres`], re-exported here) and transactional
//! enqueue, [`send_in`].
//!
//! With the `postgres` feature, `postgres://` and `postgresql://` URLs open the PostgreSQL
//! broker, result backend and beat store (see `docs/postgres.md`).

pub use celeriac_postgres::*;

use crate::{App, AsyncResult, Error, ErrorKind, Result, Signature};

/// Sends `sig` inside the caller's transaction: the task exists if and only if the
/// transaction commits.
///
/// The message is built exactly as [`Signature::apply_async`] builds it
/// ([`App::prepare_send`]: routing, options, eta, priority) and written by `conn`, a
/// connection in the caller's transaction (`&mut *tx` for a `sqlx::Transaction`), into the
/// tables of the app's PostgreSQL broker. Workers are woken at the commit; after a rollback
/// the task never existed. The app's broker must be this database's (`postgres://…`, the
/// same schema); the task-sent event (`task_send_sent_event`) is not sent this way.
///
/// ```no_run
/// # async fn demo(app: celeriac::App, pool: celeriac::postgres::sqlx::PgPool) -> celeriac::Result<()> {
/// use celeriac::postgres::sqlx;
/// use celeriac::Signature;
///
/// let mut tx = pool.begin().await.expect("begin");
/// sqlx::query("INSERT INTO orders (id, total) VALUES (42, 990)")
///     .execute(&mut *tx)
///     .await
///     .expect("insert");
/// let receipt = celeriac::postgres::send_in(
///     &mut tx,
///     &app,
///     &Signature::<()>::new("orders.send_receipt").arg(42),
/// )
/// .await?;
/// tx.commit().await.expect("commit"); // the order and its task, or neither
/// # let _ = receipt; Ok(()) }
/// ```
pub async fn send_in<O>(
    conn: &mut sqlx::PgConnection,
    app: &App,
    sig: &Signature<O>,
) -> Result<AsyncResult<O>> {
    if app.broker().driver() != "postgres" {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "send_in needs the app's broker on PostgreSQL (postgres://…), not {}",
                app.broker().driver()
            ),
        ));
    }
    let url = app.config().broker_url.as_deref().unwrap_or_default();
    let schema = schema_of_url(url)?;
    let prepared = app.prepare_send(sig)?;
    let id = prepared.message.id().to_owned();
    publish_in(
        conn,
        &schema,
        &prepared.queue,
        &prepared.message,
        prepared.options,
    )
    .await?;
    tracing::debug!(task_id = %id, task_name = %sig.task, queue = %prepared.queue, "task sent in a transaction");
    Ok(AsyncResult::sent(app, id))
}
