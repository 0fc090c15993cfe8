//! Transactional enqueue: a task message written by the caller's own transaction.

use celeriac_core::{Error, ErrorKind, Message, PublishOptions, Result};
use sqlx::PgConnection;

use crate::broker::{insert, new_row};
use crate::options::{PgOptions, db_error};
use crate::store::{channel, now_ms};

/// Writes `message` into `queue` of the broker whose tables are in `schema`, on `conn`: a
/// connection in the caller's transaction (`&mut *tx` for a `sqlx::Transaction`).
///
/// The message exists only if that transaction commits, and consumers are woken at the commit
/// (PostgreSQL delivers a `NOTIFY` sent in a transaction when it commits, and drops it on
/// rollback). There is no moment at which the business write is committed and the task is
/// not, or the other way round: a crash in between is impossible.
///
/// This is the low-level half: it takes a message that is already built. The facade's
/// `celeriac::postgres::send_in(&mut tx, &app, &signature)` builds the message exactly as
/// `apply_async` would (routing, options, eta) and calls this.
///
/// The tables must exist: open a [`PgBroker`](crate::PgBroker) on the database once (any
/// worker or app does) before sending this way.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool, message: celeriac_core::Message) -> celeriac_core::Result<()> {
/// let mut tx = pool.begin().await.unwrap();
/// sqlx::query("INSERT INTO orders (id) VALUES (1)").execute(&mut *tx).await.unwrap();
/// celeriac_postgres::publish_in(&mut tx, "celeriac", "celery", &message, Default::default()).await?;
/// tx.commit().await.unwrap(); // the order and its task, together
/// # Ok(()) }
/// ```
pub async fn publish_in(
    conn: &mut PgConnection,
    schema: &str,
    queue: &str,
    message: &Message,
    options: PublishOptions,
) -> Result<()> {
    // The schema is spliced into SQL: accept only what a URL would.
    let config = celeriac_core::Config::default();
    let checked = PgOptions::from_url(&format!("postgres://localhost/x?schema={schema}"), &config)?;
    let row = new_row(queue, message, &options, now_ms())?;
    insert(
        conn,
        &format!("\"{}\".", checked.schema()),
        &channel(checked.schema(), "queue"),
        queue,
        std::slice::from_ref(&row),
    )
    .await
    .map_err(|e| {
        let missing = matches!(&e, sqlx::Error::Database(d) if d.code().as_deref() == Some("42P01") || d.code().as_deref() == Some("3F000"));
        if missing {
            Error::new(
                ErrorKind::Broker,
                format!(
                    "cannot send the task in the transaction: schema {schema:?} has no celeriac \
                     tables (open a postgres broker on this database once to create them)"
                ),
            )
            .with_source(e)
        } else {
            db_error(
                ErrorKind::Broker,
                "cannot send the task in the transaction",
                e,
            )
        }
    })
}

/// The schema a broker URL puts its tables in (`celeriac` unless `?schema=` says otherwise).
///
/// ```
/// assert_eq!(celeriac_postgres::schema_of_url("postgres://h/db").unwrap(), "celeriac");
/// assert_eq!(celeriac_postgres::schema_of_url("postgres://h/db?schema=jobs").unwrap(), "jobs");
/// ```
pub fn schema_of_url(url: &str) -> Result<String> {
    Ok(PgOptions::from_url(url, &celeriac_core::Config::default())?
        .schema()
        .to_owned())
}
