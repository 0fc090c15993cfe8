//! Killing the server under a backend in use, and starting it again.

use std::time::Duration;

use celeriac_core::{Config, ErrorKind, ResultBackend, TaskMeta};
use celeriac_memcached::client::ClientOptions;
use celeriac_memcached::{MemcachedBackend, MemcachedOptions};
use celeriac_test::memcached::Memcached;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_recovers_after_a_restart_and_says_what_was_lost() {
    let Some(mut server) = Memcached::start() else {
        return;
    };
    let options = MemcachedOptions::from_config(&Config::default()).client(
        ClientOptions::default()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(1)),
    );
    let b = MemcachedBackend::connect_with(&server.url(), options)
        .await
        .unwrap();
    b.store(&TaskMeta::success("before", json!(1)))
        .await
        .unwrap();
    assert!(b.get("before").await.unwrap().is_some());

    // A wait in progress across the whole outage.
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.wait("never-stored", Some(Duration::from_secs(3))).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    server.kill();
    // While it is down: a transient error naming the server, not a hang.
    let e = b.get("before").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend, "{e:?}");
    assert!(e.is_transient(), "{e:?}");
    assert!(e.to_string().contains(&server.addr()), "{e}");
    let e = b
        .store(&TaskMeta::success("during", json!(2)))
        .await
        .unwrap_err();
    assert!(e.is_transient(), "{e:?}");

    server.restart();
    // Back: the client reconnects by itself; what the old process held is gone.
    assert_eq!(
        b.get("before").await.unwrap(),
        None,
        "memcached keeps nothing"
    );
    assert_eq!(b.client().restarts(), 1, "the restart is noticed");
    b.store(&TaskMeta::success("after", json!(3)))
        .await
        .unwrap();
    assert_eq!(b.get("after").await.unwrap().unwrap().result, 3);

    // The wait that spanned the restart times out saying a result may have been lost.
    let e = waiter.await.unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e:?}");
    assert!(
        e.to_string()
            .contains("memcached restarted during the wait"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_to_a_restarted_server_is_replaced_without_an_error() {
    let Some(mut server) = Memcached::start() else {
        return;
    };
    let b = MemcachedBackend::connect(&server.url(), &Config::default())
        .await
        .unwrap();
    b.store(&TaskMeta::success("x", json!(1))).await.unwrap();
    server.restart();
    // The old connection is dead; the read goes out again on a new one.
    for _ in 0..3 {
        assert_eq!(b.get("x").await.unwrap(), None);
    }
    b.store(&TaskMeta::success("x", json!(2))).await.unwrap();
    assert_eq!(b.get("x").await.unwrap().unwrap().result, 2);
}
