//! The client alone, against a private memcached.

use std::time::{Duration, Instant};

use celeriac_core::ErrorKind;
use celeriac_memcached::client::{CasOutcome, Client, ClientOptions, Distribution, flags};
use celeriac_test::memcached::Memcached;
use celeriac_test::services::free_port;

fn client(server: &Memcached) -> Client {
    Client::new(&[server.addr()], ClientOptions::default()).expect("client")
}

#[tokio::test]
async fn commands_round_trip() {
    let Some(server) = Memcached::start() else {
        return;
    };
    let c = client(&server);
    assert_eq!(c.version().await.unwrap().len(), 1);
    assert_eq!(c.get("k").await.unwrap(), None);
    c.set("k", flags::TEXT, b"v\r\nwith crlf", 60)
        .await
        .unwrap();
    let item = c.get("k").await.unwrap().unwrap();
    assert_eq!(
        (item.flags, item.data.as_slice()),
        (flags::TEXT, &b"v\r\nwith crlf"[..])
    );
    assert!(!c.add("k", 0, b"x", 0).await.unwrap(), "add onto an item");
    let cas = c.gets("k").await.unwrap().unwrap().cas.unwrap();
    assert_eq!(
        c.cas("k", 0, b"1", 0, cas).await.unwrap(),
        CasOutcome::Stored
    );
    assert_eq!(
        c.cas("k", 0, b"2", 0, cas).await.unwrap(),
        CasOutcome::Exists
    );
    assert_eq!(c.incr("k", 41).await.unwrap(), Some(42));
    assert_eq!(c.incr("nothing", 1).await.unwrap(), None);
    assert!(c.touch("k", 100).await.unwrap());
    assert!(c.delete("k").await.unwrap());
    assert!(!c.delete("k").await.unwrap());
    assert_eq!(
        c.cas("k", 0, b"3", 0, cas).await.unwrap(),
        CasOutcome::NotFound
    );
    // An empty value is a value.
    c.set("empty", 0, b"", 0).await.unwrap();
    assert_eq!(c.get("empty").await.unwrap().unwrap().data, b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_one_pipelined_connection() {
    let Some(server) = Memcached::start() else {
        return;
    };
    let c = client(&server);
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                let key = format!("p{i}");
                let value = format!("value {i} ").repeat(i % 50 + 1);
                c.set(&key, 0, value.as_bytes(), 0).await.unwrap();
                let got = c.get(&key).await.unwrap().unwrap();
                assert_eq!(
                    got.data,
                    value.as_bytes(),
                    "reply matched to the wrong request"
                );
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let keys: Vec<String> = (0..200)
        .map(|i| format!("p{i}"))
        .chain(["none".into()])
        .collect();
    let many = c.get_many(&keys).await.unwrap();
    assert_eq!(many.len(), 201);
    assert!(many[..200].iter().all(Option::is_some) && many[200].is_none());
    // Only one connection was opened (plus none per call).
    assert_eq!(c.restarts(), 0);
}

#[tokio::test]
async fn keys_spread_over_servers_as_python_memcached_spreads_them() {
    let (Some(a), Some(b)) = (Memcached::start(), Memcached::start()) else {
        return;
    };
    let both = Client::new(
        &[a.addr(), b.addr()],
        ClientOptions::default().distribution(Distribution::Crc32),
    )
    .unwrap();
    let keys: Vec<String> = (0..40).map(|i| format!("celery-task-meta-{i}")).collect();
    for k in &keys {
        both.set(k, flags::TEXT, k.as_bytes(), 0).await.unwrap();
    }
    let (on_a, on_b) = (client(&a), client(&b));
    let mut counts = [0, 0];
    for k in &keys {
        // python-memcached: ((crc32(key) >> 16) & 0x7fff) % 2.
        let want = ((crc32(k.as_bytes()) >> 16) & 0x7fff) % 2;
        let found_a = on_a.get(k).await.unwrap().is_some();
        let found_b = on_b.get(k).await.unwrap().is_some();
        assert_eq!((found_a, found_b), (want == 0, want == 1), "{k}");
        counts[want as usize] += 1;
    }
    assert!(counts[0] > 5 && counts[1] > 5, "{counts:?}");
    let many = both.get_many(&keys).await.unwrap();
    assert!(
        many.iter()
            .zip(&keys)
            .all(|(i, k)| i.as_ref().unwrap().data == k.as_bytes())
    );
}

/// pymemcache's rendezvous hashing (the default) spreads keys too, and a multi-key read finds
/// each where it was written. That the spread is pymemcache's own is shown by the unit tests
/// (Python's numbers) and the interop test (a Python client reads through two servers).
#[tokio::test]
async fn keys_spread_over_servers_by_rendezvous_hashing() {
    let (Some(a), Some(b)) = (Memcached::start(), Memcached::start()) else {
        return;
    };
    let both = Client::new(&[a.addr(), b.addr()], ClientOptions::default()).unwrap();
    let keys: Vec<String> = (0..40).map(|i| format!("celery-task-meta-{i}")).collect();
    for k in &keys {
        both.set(k, flags::TEXT, k.as_bytes(), 0).await.unwrap();
    }
    let (on_a, on_b) = (client(&a), client(&b));
    let mut counts = [0, 0];
    for k in &keys {
        let found_a = on_a.get(k).await.unwrap().is_some();
        let found_b = on_b.get(k).await.unwrap().is_some();
        assert!(found_a != found_b, "{k} on exactly one server");
        counts[usize::from(found_b)] += 1;
    }
    assert!(counts[0] > 5 && counts[1] > 5, "{counts:?}");
    let many = both.get_many(&keys).await.unwrap();
    assert!(
        many.iter()
            .zip(&keys)
            .all(|(i, k)| i.as_ref().unwrap().data == k.as_bytes())
    );
}

/// zlib's CRC-32, written out again so the test does not trust the crate's.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for b in bytes {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[tokio::test]
async fn errors_say_what_went_wrong() {
    let Some(server) = Memcached::start() else {
        return;
    };
    let c = client(&server);
    // Too large: refused before sending.
    let big = vec![b'x'; 1024 * 1024 + 1];
    let e = c.set("big", 0, &big, 0).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend);
    assert!(e.to_string().contains("too large"), "{e}");
    assert!(!e.is_transient());
    // Just under the client's limit, over the server's (its item holds the key and a header
    // too): the server's refusal reads the same.
    let e = c.set("big", 0, &big[..1024 * 1024], 0).await.unwrap_err();
    assert!(e.to_string().contains("too large"), "{e}");
    // The connection is still fine after both.
    c.set("after", 0, b"ok", 0).await.unwrap();
    // Bad keys.
    let e = c.get("has space").await.unwrap_err();
    assert!(e.to_string().contains("not allowed"), "{e}");
    let e = c.get(&"k".repeat(251)).await.unwrap_err();
    assert!(e.to_string().contains("longer than 250"), "{e}");
    // incr of something that is not a number.
    c.set("text", 0, b"abc", 0).await.unwrap();
    let e = c.incr("text", 1).await.unwrap_err();
    assert!(e.to_string().contains("non-numeric"), "{e}");

    // A server that is not there: a transient error naming it, quickly.
    let port = free_port();
    let down = Client::new(
        &[format!("127.0.0.1:{port}")],
        ClientOptions::default().connect_timeout(Duration::from_secs(1)),
    )
    .unwrap();
    let from = Instant::now();
    let e = down.get("k").await.unwrap_err();
    assert!(from.elapsed() < Duration::from_secs(2));
    assert_eq!(e.kind(), ErrorKind::Backend);
    assert!(e.is_transient(), "{e:?}");
    assert!(
        e.to_string()
            .contains(&format!("cannot connect to memcached at 127.0.0.1:{port}")),
        "{e}"
    );
}

#[tokio::test]
async fn a_server_that_does_not_answer_times_out() {
    // A listener that accepts and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let c = Client::new(
        std::slice::from_ref(&addr),
        ClientOptions::default().timeout(Duration::from_millis(300)),
    )
    .unwrap();
    let from = Instant::now();
    let e = c.get("k").await.unwrap_err();
    assert!(
        from.elapsed() < Duration::from_secs(2),
        "{:?}",
        from.elapsed()
    );
    assert!(e.is_transient(), "{e:?}");
    assert!(e.to_string().contains("did not answer"), "{e}");
    assert!(e.to_string().contains(&addr), "{e}");
    hold.abort();
}
