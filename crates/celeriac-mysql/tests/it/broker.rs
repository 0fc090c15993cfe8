//! Broker behaviour beyond the conformance suite.

use std::time::Duration;

use celeriac_core::{Broker, ConsumeOptions, PublishOptions};

use crate::util::{broker, msg};

/// A consumer whose lease ran out cannot settle the copy now leased to another: its late ack
/// deletes nothing, and the second consumer's ack does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_ack_of_an_expired_lease_is_fenced_off() {
    let Some(b) = broker().await else { return };
    let q = celeriac_test::services::unique_queue("fence");
    b.publish(&q, &msg(), PublishOptions::default())
        .await
        .unwrap();
    let mut first = b
        .consume(
            std::slice::from_ref(&q),
            ConsumeOptions::new(1).lease(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    let d1 = first.next().await.unwrap().unwrap();
    assert_eq!(d1.redeliveries, 0);
    let mut second = b
        .consume(
            std::slice::from_ref(&q),
            ConsumeOptions::new(1).lease(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    let d2 = tokio::time::timeout(Duration::from_secs(10), second.next())
        .await
        .expect("redelivered after the lease")
        .unwrap()
        .unwrap();
    assert_eq!(d2.redeliveries, 1);
    d1.ack().await.unwrap();
    assert_eq!(
        b.stats(&q).await.unwrap().unacked,
        1,
        "the late ack deleted the new lease's row"
    );
    assert!(
        d2.extend_lease(Duration::from_secs(30)).await.is_ok(),
        "the new lease holds"
    );
    d2.ack().await.unwrap();
    assert_eq!(b.stats(&q).await.unwrap().total(), 0);
}

/// Rows a dropped consumer prefetched but never handed out come back at once, as never
/// delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_consumer_gives_its_prefetched_rows_back() {
    let Some(b) = broker().await else { return };
    let q = celeriac_test::services::unique_queue("giveback");
    for _ in 0..5 {
        b.publish(&q, &msg(), PublishOptions::default())
            .await
            .unwrap();
    }
    let mut c = b
        .consume(std::slice::from_ref(&q), ConsumeOptions::new(5))
        .await
        .unwrap();
    let d = c.next().await.unwrap().unwrap();
    drop(c);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = b.stats(&q).await.unwrap();
        if s.ready == 4 && s.unacked == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    d.ack().await.unwrap();
    let mut c = b
        .consume(std::slice::from_ref(&q), ConsumeOptions::new(5))
        .await
        .unwrap();
    for _ in 0..4 {
        let d = c.next().await.unwrap().unwrap();
        assert_eq!(d.redeliveries, 0, "a row given back is not a redelivery");
        d.ack().await.unwrap();
    }
}

/// Many brokers opening one fresh database at once all succeed: schema creation is idempotent
/// and serialised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_opens_create_the_schema_once() {
    if crate::util::url().await.is_none() {
        return;
    }
    let db = format!("celeriac_it_schema_{}", std::process::id());
    crate::util::create_database(&db).await;
    let url = format!("mysql://root@{}/{db}", crate::util::ADDR);
    let config = celeriac_core::Config::default();
    let opens = (0..6).map(|_| {
        let (url, config) = (url.clone(), config.clone());
        tokio::spawn(async move { celeriac_mysql::MysqlBroker::connect(&url, &config).await })
    });
    for o in opens {
        o.await
            .unwrap()
            .expect("open while others create the schema");
    }
    let b = celeriac_mysql::MysqlBroker::connect(&url, &config)
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE {db}")))
        .execute(b.pool())
        .await
        .unwrap();
}
