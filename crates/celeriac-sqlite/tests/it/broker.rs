//! Broker behaviour on one file: ordering, delays, leases, prefetch, settling, closing.

use std::time::{Duration, Instant};

use celeriac_core::{
    Broker, ConsumeOptions, ErrorKind, PublishOptions, QueueStats, Requeue, ResultBackend, TaskMeta,
};
use celeriac_sqlite::{SqliteBackend, SqliteBroker, SqliteOptions};

use crate::util::{db, msg, next_within, quiet_for};

const SOON: Duration = Duration::from_secs(5);

async fn broker(name: &str) -> SqliteBroker {
    SqliteBroker::open(db(name), SqliteOptions::default())
        .await
        .unwrap()
}

fn q(name: &str) -> Vec<String> {
    vec![name.to_owned()]
}

#[test]
fn handles_are_send_and_sync() {
    fn assert<T: Send + Sync + Clone + 'static>() {}
    assert::<SqliteBroker>();
    assert::<SqliteBackend>();
}

#[tokio::test]
async fn publish_consume_ack_round_trip() {
    let b = broker("round_trip").await;
    let m = msg();
    b.publish("q", &m, PublishOptions::default()).await.unwrap();
    assert_eq!(b.stats("q").await.unwrap(), QueueStats::new(1, 0, 0));
    let mut c = b.consume(&q("q"), ConsumeOptions::new(4)).await.unwrap();
    let d = next_within(&mut c, SOON).await;
    assert_eq!(d.message.as_ref().unwrap(), &m);
    assert_eq!(d.queue, "q");
    assert_eq!(d.redeliveries, 0);
    assert_eq!(b.stats("q").await.unwrap(), QueueStats::new(0, 0, 1));
    d.ack().await.unwrap();
    assert_eq!(b.stats("q").await.unwrap(), QueueStats::default());
    assert_eq!(b.queues().await.unwrap(), vec!["q".to_owned()]);
    assert!(b.capabilities().delay && b.capabilities().multi_process);
}

#[tokio::test]
async fn rows_hold_kombu_json_envelopes() {
    let path = db("envelope_rows");
    let b = SqliteBroker::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let m = msg();
    b.publish("q", &m, PublishOptions::default()).await.unwrap();
    let raw = rusqlite::Connection::open(&path).unwrap();
    let body: String = raw
        .query_row("SELECT body FROM celeriac_messages", [], |r| r.get(0))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["headers"]["id"], m.id());
    assert_eq!(v["properties"]["delivery_info"]["routing_key"], "q");
}

#[tokio::test]
async fn higher_priority_first_fifo_within() {
    let b = broker("priority").await;
    let mut sent = Vec::new();
    for p in [0u8, 5, 9, 5, 0, 9] {
        let m = msg();
        b.publish("q", &m, PublishOptions::default().priority(Some(p)))
            .await
            .unwrap();
        sent.push((p, m.id().to_owned()));
    }
    let mut want = sent.clone();
    want.sort_by_key(|(p, _)| std::cmp::Reverse(*p));
    let mut c = b.consume(&q("q"), ConsumeOptions::new(100)).await.unwrap();
    for (_, id) in want {
        let d = next_within(&mut c, SOON).await;
        assert_eq!(d.message.as_ref().unwrap().id(), id);
    }
}

#[tokio::test]
async fn delayed_messages_wait_in_the_database() {
    let b = broker("delay").await;
    let m = msg();
    let at = chrono::Utc::now() + chrono::Duration::milliseconds(400);
    b.publish("q", &m, PublishOptions::default().not_before(Some(at)))
        .await
        .unwrap();
    assert_eq!(b.stats("q").await.unwrap(), QueueStats::new(0, 1, 0));
    let mut c = b.consume(&q("q"), ConsumeOptions::new(1)).await.unwrap();
    let d = next_within(&mut c, SOON).await;
    assert!(chrono::Utc::now() >= at, "delivered early");
    assert_eq!(d.message.unwrap().id(), m.id());
}

#[tokio::test]
async fn an_idle_consumer_wakes_for_a_delayed_message_when_due() {
    let b = broker("delay_wake").await;
    let mut c = b.consume(&q("q"), ConsumeOptions::new(1)).await.unwrap();
    assert!(quiet_for(&mut c, Duration::from_millis(50)).await);
    let at = chrono::Utc::now() + chrono::Duration::milliseconds(200);
    b.publish("q", &msg(), PublishOptions::default().not_before(Some(at)))
        .await
        .unwrap();
    let d = next_within(&mut c, SOON).await;
    let late = chrono::Utc::now() - at;
    assert!(late >= chrono::Duration::zero(), "early by {late}");
    assert!(late < chrono::Duration::milliseconds(600), "late by {late}");
    d.ack().await.unwrap();
}

#[tokio::test]
async fn an_expired_lease_is_handed_out_again() {
    let b = broker("lease").await;
    b.publish("q", &msg(), PublishOptions::default())
        .await
        .unwrap();
    let opts = ConsumeOptions::new(1).lease(Duration::from_millis(200));
    let mut c1 = b.consume(&q("q"), opts.clone()).await.unwrap();
    let first = next_within(&mut c1, SOON).await;
    let mut c2 = b.consume(&q("q"), opts).await.unwrap();
    let again = next_within(&mut c2, SOON).await;
    assert_eq!(again.redeliveries, 1);
    assert_eq!(
        first.message.as_ref().unwrap().id(),
        again.message.as_ref().unwrap().id()
    );
    // The first holder lost its lease: it can neither extend nor settle the new copy.
    let e = first
        .extend_lease(Duration::from_secs(10))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Broker);
    first.ack().await.unwrap();
    assert_eq!(b.stats("q").await.unwrap().unacked, 1);
    again.extend_lease(Duration::from_secs(60)).await.unwrap();
    again.ack().await.unwrap();
    assert_eq!(b.stats("q").await.unwrap().total(), 0);
}

#[tokio::test]
async fn extend_lease_keeps_the_message() {
    let b = broker("extend").await;
    b.publish("q", &msg(), PublishOptions::default())
        .await
        .unwrap();
    let opts = ConsumeOptions::new(1).lease(Duration::from_millis(300));
    let mut c1 = b.consume(&q("q"), opts.clone()).await.unwrap();
    let d = next_within(&mut c1, SOON).await;
    d.extend_lease(Duration::from_secs(30)).await.unwrap();
    let mut c2 = b.consume(&q("q"), opts).await.unwrap();
    assert!(quiet_for(&mut c2, Duration::from_millis(600)).await);
    d.ack().await.unwrap();
}

#[tokio::test]
async fn reject_drops_or_requeues() {
    let b = broker("reject").await;
    let mut c = b.consume(&q("q"), ConsumeOptions::new(1)).await.unwrap();
    b.publish("q", &msg(), PublishOptions::default())
        .await
        .unwrap();
    let d = next_within(&mut c, SOON).await;
    d.reject(Requeue::Now).await.unwrap();
    let d = next_within(&mut c, SOON).await;
    assert_eq!(d.redeliveries, 1);
    let started = Instant::now();
    d.reject(Requeue::After(Duration::from_millis(300)))
        .await
        .unwrap();
    assert_eq!(b.stats("q").await.unwrap(), QueueStats::new(0, 1, 0));
    let d = next_within(&mut c, SOON).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(d.redeliveries, 2);
    d.reject(Requeue::Drop).await.unwrap();
    assert_eq!(b.stats("q").await.unwrap().total(), 0);
}

#[tokio::test]
async fn never_more_than_prefetch_unacked() {
    let b = broker("prefetch").await;
    for _ in 0..5 {
        b.publish("q", &msg(), PublishOptions::default())
            .await
            .unwrap();
    }
    let mut c = b.consume(&q("q"), ConsumeOptions::new(2)).await.unwrap();
    let d1 = next_within(&mut c, SOON).await;
    let _d2 = next_within(&mut c, SOON).await;
    assert_eq!(b.stats("q").await.unwrap(), QueueStats::new(3, 0, 2));
    assert!(quiet_for(&mut c, Duration::from_millis(200)).await);
    d1.ack().await.unwrap();
    let _d3 = next_within(&mut c, SOON).await;
    assert_eq!(b.stats("q").await.unwrap(), QueueStats::new(2, 0, 2));
}

#[tokio::test]
async fn a_dropped_consumer_gives_back_its_prefetched_messages() {
    let b = broker("drop_consumer").await;
    for _ in 0..5 {
        b.publish("q", &msg(), PublishOptions::default())
            .await
            .unwrap();
    }
    let mut c = b.consume(&q("q"), ConsumeOptions::new(10)).await.unwrap();
    let d = next_within(&mut c, SOON).await;
    drop(c);
    let mut c = b.consume(&q("q"), ConsumeOptions::new(10)).await.unwrap();
    for _ in 0..4 {
        let again = next_within(&mut c, SOON).await;
        assert_eq!(
            again.redeliveries, 0,
            "never handed out, so not redelivered"
        );
    }
    d.ack().await.unwrap();
}

#[tokio::test]
async fn an_undecodable_row_is_delivered_as_an_error_and_does_not_block() {
    let path = db("garbage_row");
    let b = SqliteBroker::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    b.declare("q").await.unwrap();
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute(
        "INSERT INTO celeriac_messages (queue, priority, state, visible_at, body) \
         VALUES ('q', 0, 0, 0, 'not json')",
        [],
    )
    .unwrap();
    let good = msg();
    b.publish("q", &good, PublishOptions::default())
        .await
        .unwrap();
    let mut c = b.consume(&q("q"), ConsumeOptions::new(4)).await.unwrap();
    let bad = next_within(&mut c, SOON).await;
    assert_eq!(
        bad.message.as_ref().unwrap_err().kind(),
        ErrorKind::Protocol
    );
    bad.reject(Requeue::Drop).await.unwrap();
    let d = next_within(&mut c, SOON).await;
    assert_eq!(d.message.unwrap().id(), good.id());
}

/// Rows another tool wrote badly (a BLOB body of bytes that are not text, TEXT that is not
/// UTF-8) in one fetch batch with good rows: the good ones arrive at once, each bad one is
/// handed over once as an undecodable delivery (the worker dead-letters it and acks), and no
/// row stays leased. A BLOB holding a valid envelope is a good row.
// See: issue 23 (C)
#[tokio::test]
async fn a_bad_row_does_not_block_its_fetch_batch() {
    let path = db("bad_rows_in_a_batch");
    let b = SqliteBroker::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    b.declare("q").await.unwrap();
    let raw = rusqlite::Connection::open(&path).unwrap();
    let insert = |sql_body: &str, param: &dyn rusqlite::ToSql| {
        raw.execute(
            &format!(
                "INSERT INTO celeriac_messages (queue, priority, state, visible_at, body) \
                 VALUES ('q', 0, 0, 0, {sql_body})"
            ),
            [param],
        )
        .unwrap();
    };
    let encode =
        |m: &celeriac_core::Message| celeriac_core::protocol::envelope::encode(m, "", "q").unwrap();
    let (first, in_blob, last) = (msg(), msg(), msg());
    insert("?1", &String::from_utf8(encode(&first)).unwrap());
    insert("?1", &vec![0x80_u8, 0xfe, 0xff, 0x00]);
    insert("CAST(?1 AS TEXT)", &b"{\"id\": \"\xff\"}".to_vec());
    insert("?1", &encode(&in_blob));
    insert("?1", &String::from_utf8(encode(&last)).unwrap());
    let types: Vec<String> = raw
        .prepare("SELECT typeof(body) FROM celeriac_messages ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(types, ["text", "blob", "text", "blob", "text"]);

    let mut c = b.consume(&q("q"), ConsumeOptions::new(8)).await.unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(next_within(&mut c, SOON).await);
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let ids: Vec<Option<&str>> = got
        .iter()
        .map(|d| d.message.as_ref().ok().map(celeriac_core::Message::id))
        .collect();
    assert_eq!(
        ids,
        [
            Some(first.id()),
            None,
            None,
            Some(in_blob.id()),
            Some(last.id())
        ]
    );
    for (d, what) in [
        (&got[1], "(blob, 4 bytes) is not utf-8"),
        (&got[2], "(text, 11 bytes) is not utf-8"),
    ] {
        let e = d.message.as_ref().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert!(e.to_string().contains(what), "{e:#}");
        assert!(format!("{e:#}").contains("invalid utf-8"), "{e:#}");
    }
    assert!(got.iter().all(|d| d.redeliveries == 0));
    assert!(quiet_for(&mut c, Duration::from_millis(300)).await);
    for d in got {
        d.ack().await.unwrap();
    }
    let left: i64 = raw
        .query_row("SELECT COUNT(*) FROM celeriac_messages", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0, "nothing stays leased");
    assert_eq!(b.stats("q").await.unwrap(), QueueStats::default());
}

#[tokio::test]
async fn purge_counts_ready_and_delayed() {
    let b = broker("purge").await;
    b.publish("q", &msg(), PublishOptions::default())
        .await
        .unwrap();
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    b.publish(
        "q",
        &msg(),
        PublishOptions::default().not_before(Some(later)),
    )
    .await
    .unwrap();
    b.publish("q", &msg(), PublishOptions::default())
        .await
        .unwrap();
    let mut c = b.consume(&q("q"), ConsumeOptions::new(1)).await.unwrap();
    let d = next_within(&mut c, SOON).await;
    assert_eq!(b.purge("q").await.unwrap(), 2);
    assert_eq!(b.stats("q").await.unwrap(), QueueStats::new(0, 0, 1));
    d.ack().await.unwrap();
    assert_eq!(b.purge("nothing-here").await.unwrap(), 0);
}

#[tokio::test]
async fn publish_batch_and_several_queues() {
    let b = broker("batch").await;
    let batch: Vec<_> = (0..10)
        .map(|_| (msg(), PublishOptions::default()))
        .collect();
    b.publish_batch("a", &batch).await.unwrap();
    b.publish("b", &msg(), PublishOptions::default())
        .await
        .unwrap();
    let mut c = b
        .consume(&["a".to_owned(), "b".to_owned()], ConsumeOptions::new(20))
        .await
        .unwrap();
    let mut from_b = 0;
    for _ in 0..11 {
        let d = next_within(&mut c, SOON).await;
        from_b += usize::from(d.queue == "b");
        d.ack().await.unwrap();
    }
    assert_eq!(from_b, 1);
    assert_eq!(
        b.queues().await.unwrap(),
        vec!["a".to_owned(), "b".to_owned()]
    );
}

#[tokio::test]
async fn a_waiting_consumer_wakes_on_publish() {
    let b = broker("wake").await;
    let mut c = b.consume(&q("q"), ConsumeOptions::new(1)).await.unwrap();
    let b2 = b.clone();
    let publisher = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        b2.publish("q", &msg(), PublishOptions::default())
            .await
            .unwrap();
        started
    });
    let d = next_within(&mut c, SOON).await;
    let latency = publisher.await.unwrap().elapsed();
    assert!(latency < Duration::from_millis(500), "{latency:?}");
    d.ack().await.unwrap();
}

#[tokio::test]
async fn another_connections_publish_is_seen() {
    // A second connection stands in for another process: no in-process notice reaches us.
    let path = db("other_conn");
    let b = SqliteBroker::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let mut c = b.consume(&q("q"), ConsumeOptions::new(1)).await.unwrap();
    assert!(quiet_for(&mut c, Duration::from_millis(100)).await);
    let body =
        String::from_utf8(celeriac_core::protocol::envelope::encode(&msg(), "", "q").unwrap())
            .unwrap();
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute(
        "INSERT INTO celeriac_messages (queue, priority, state, visible_at, body) \
         VALUES ('q', 0, 0, 0, ?1)",
        [body],
    )
    .unwrap();
    let started = Instant::now();
    let d = next_within(&mut c, SOON).await;
    assert!(started.elapsed() < Duration::from_millis(800));
    d.ack().await.unwrap();
}

#[tokio::test]
async fn close_ends_consumers_and_refuses_calls() {
    let b = broker("close").await;
    let mut c = b.consume(&q("q"), ConsumeOptions::new(1)).await.unwrap();
    let b2 = b.clone();
    let closer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        b2.close().await.unwrap();
    });
    let end = tokio::time::timeout(SOON, c.next()).await.unwrap().unwrap();
    assert!(end.is_none());
    closer.await.unwrap();
    let e = b
        .publish("q", &msg(), PublishOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Closed);
    assert_eq!(b.stats("q").await.unwrap_err().kind(), ErrorKind::Closed);
}

#[tokio::test]
async fn broker_and_backend_share_one_file() {
    let path = db("shared");
    let b = SqliteBroker::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let r = SqliteBackend::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    b.publish("q", &msg(), PublishOptions::default())
        .await
        .unwrap();
    r.store(&TaskMeta::success("t1", 3.into())).await.unwrap();
    assert_eq!(r.get("t1").await.unwrap().unwrap().result, 3);
    assert_eq!(b.stats("q").await.unwrap().ready, 1);
}

#[tokio::test]
async fn opens_from_urls_through_the_driver_table() {
    let mut drivers = celeriac_core::Drivers::new();
    celeriac_sqlite::register(&mut drivers);
    let config = celeriac_core::Config::default();
    let path = db("url");
    let url = format!("sqlite://{}", path.display());
    let broker = drivers.open_broker(&url, &config).await.unwrap();
    let backend = drivers.open_backend(&url, &config).await.unwrap();
    assert_eq!(broker.driver(), "sqlite");
    assert_eq!(backend.driver(), "sqlite");
    let mem = drivers
        .open_broker("sqlite://:memory:", &config)
        .await
        .unwrap();
    mem.publish("q", &msg(), PublishOptions::default())
        .await
        .unwrap();
    assert_eq!(mem.stats("q").await.unwrap().ready, 1);
}

/// Brokers and backends opened at the same instant on a new file all open: two connections
/// switching a file to WAL at once each hold the shared lock the other needs upgraded, and
/// SQLite answers one of them "database is locked" at once rather than wait (two workers
/// started together, each with a broker, a backend and beat, met this).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_openers_of_a_new_file_all_open() {
    for round in 0..60 {
        let path = db(&format!("openers_{round}"));
        let opens = (0..8).map(|i| {
            let path = path.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    SqliteBroker::open(&path, SqliteOptions::default())
                        .await
                        .map(drop)
                } else {
                    SqliteBackend::open(&path, SqliteOptions::default())
                        .await
                        .map(drop)
                }
            })
        });
        let opens: Vec<_> = opens.collect();
        for (i, open) in opens.into_iter().enumerate() {
            if let Err(e) = open.await.unwrap() {
                panic!("round {round}, opener {i}: {e:#}");
            }
        }
    }
}

/// A commit checkpoints only once the WAL holds 10,000 pages (SQLite's default is 1,000): after
/// about 3,500 pages of messages the database file has not grown, and the WAL holds them.
#[tokio::test]
async fn commits_checkpoint_only_past_ten_thousand_wal_pages() {
    let path = db("checkpoint_mark");
    let b = SqliteBroker::open(&path, SqliteOptions::default())
        .await
        .unwrap();
    let size = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let wal_path = std::path::PathBuf::from(format!("{}-wal", path.display()));
    let before = size(&path);
    let big = "x".repeat(8_000);
    for _ in 0..15 {
        let batch: Vec<_> = (0..100)
            .map(|_| {
                let headers =
                    celeriac_core::Headers::new("tests.big", celeriac_core::protocol::new_id());
                let body = celeriac_core::Body::new(vec![big.clone().into()], Default::default());
                let m =
                    celeriac_core::Message::new(headers, &body, celeriac_core::ContentType::Json)
                        .unwrap();
                (m, PublishOptions::default())
            })
            .collect();
        b.publish_batch("q", &batch).await.unwrap();
    }
    let wal = size(&wal_path);
    assert!(
        wal > 3_000 * 4_096,
        "the WAL holds the messages: {wal} bytes"
    );
    assert_eq!(
        size(&path),
        before,
        "no checkpoint copied pages into the file"
    );
    assert_eq!(b.stats("q").await.unwrap(), QueueStats::new(1_500, 0, 0));
}
