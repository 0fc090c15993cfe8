//! Lost connections, bad passwords, unreachable ports and URLs.

use std::time::Duration;

use celeriac_core::{
    Broker, Config, ConsumeOptions, ErrorKind, PublishOptions, ResultBackend, TaskMeta,
};
use celeriac_redis::{RedisBackend, RedisBroker, RedisOptions};
use serde_json::json;

use crate::util::{self, backend_with, broker_with, msg, next_within, raw};

/// Kills every normal client connection except the killer's own.
async fn kill_clients() {
    let mut c = raw().await;
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut c)
        .await
        .unwrap();
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut c)
        .await
        .unwrap();
}

// One test: CLIENT KILL drops other tests' connections too, which they survive by design,
// but keep the killing in one place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_consume_and_wait_survive_killed_connections() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default()).await;
    let backend = backend_with(&p, RedisOptions::default()).await;
    let queues = ["rq".to_owned()];
    let mut consumer = broker
        .consume(&queues, ConsumeOptions::new(4))
        .await
        .unwrap();
    broker
        .publish("rq", &msg(), PublishOptions::default())
        .await
        .unwrap();
    let held = next_within(&mut consumer, Duration::from_secs(10)).await;
    let waiter = {
        let b = backend.clone();
        tokio::spawn(async move { b.wait("rt", Some(Duration::from_secs(30))).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    kill_clients().await;

    // The held delivery's entry survived in Redis: ack works over a new connection.
    held.ack()
        .await
        .expect("ack after the connection was killed");
    let m = msg();
    broker
        .publish("rq", &m, PublishOptions::default())
        .await
        .expect("publish reconnects");
    let d = next_within(&mut consumer, Duration::from_secs(15)).await;
    assert_eq!(d.message.as_ref().unwrap().id(), m.id());
    d.ack().await.unwrap();

    kill_clients().await;
    backend
        .store(&TaskMeta::success("rt", json!(1)))
        .await
        .expect("store reconnects");
    let meta = tokio::time::timeout(Duration::from_secs(15), waiter)
        .await
        .expect("the waiter resubscribed and re-read")
        .unwrap()
        .unwrap();
    assert_eq!(meta.result, json!(1));
}

#[tokio::test]
async fn an_unreachable_port_is_a_clear_transient_error() {
    let e = RedisBroker::connect("redis://:hunter2@127.0.0.1:1/0", &Config::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Broker);
    assert!(e.is_transient());
    let text = e.to_string();
    assert!(
        text.contains("cannot connect to redis (redis://:***@127.0.0.1:1/0)"),
        "{text}"
    );
    assert!(!format!("{e:?}").contains("hunter2"));
    assert!(std::error::Error::source(&e).is_some());
    let e = RedisBackend::connect("redis://127.0.0.1:1/0", &Config::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend);
}

#[tokio::test]
async fn a_bad_password_is_a_clear_error() {
    if !util::redis_up() {
        return;
    }
    let e = RedisBroker::connect(
        "redis://nobody:wrong-secret@127.0.0.1:6379/0",
        &Config::default(),
    )
    .await
    .unwrap_err();
    let text = format!("{e} / {:?}", std::error::Error::source(&e));
    assert!(!text.contains("wrong-secret"), "{text}");
    assert!(text.contains("cannot connect to redis"), "{text}");
    assert!(!e.is_transient(), "{text}");
}

#[tokio::test]
async fn urls_register_and_tls_fails_clearly() {
    let mut drivers = celeriac_core::Drivers::new();
    celeriac_redis::register(&mut drivers);
    #[cfg(not(feature = "tls"))]
    {
        let e = drivers
            .open_broker("rediss://:pw@127.0.0.1:6379/0", &Config::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("TLS"), "{e}");
        assert!(!e.to_string().contains("pw@"));
    }
    if util::redis_up() {
        // With TLS built in, rediss:// to a plain-text server fails the handshake clearly.
        #[cfg(feature = "tls")]
        {
            let e = tokio::time::timeout(
                std::time::Duration::from_secs(30),
                drivers.open_broker("rediss://:pw@127.0.0.1:6379/0", &Config::default()),
            )
            .await
            .expect("fails, does not hang")
            .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Broker);
            assert!(e.to_string().contains("cannot connect to redis"), "{e}");
            assert!(!format!("{e} {e:?}").contains("pw@"), "{e:?}");
        }
        let b = drivers
            .open_broker(util::URL, &Config::default())
            .await
            .unwrap();
        assert_eq!(b.driver(), "redis");
        let b = drivers
            .open_backend("redis://127.0.0.1:6379?virtual_host=0", &Config::default())
            .await
            .unwrap();
        assert_eq!(b.driver(), "redis");
    }
}

#[test]
fn public_handles_are_send_and_sync() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<RedisBroker>();
    check::<RedisBackend>();
    check::<RedisOptions>();
}
