//! Coordination across workers on memcached: the conformance cases over two servers, the
//! stored keys and values, compare-and-delete, and items that expire by themselves.

use std::sync::Arc;
use std::time::{Duration, Instant};

use celeriac_core::coord::{Admission, Coordination};
use celeriac_core::{Config, DynBackend};
use celeriac_memcached::client::{CasOutcome, Client, ClientOptions, flags};
use celeriac_memcached::{MemcachedBackend, MemcachedOptions};
use celeriac_test::conformance::{backend as cases, run_case};
use celeriac_test::memcached::Memcached;

fn client(server: &Memcached) -> Client {
    Client::new(&[server.addr()], ClientOptions::default()).expect("client")
}

/// The three coordination cases, 20-way races included, with keys spread over two servers
/// (Celery's `h1;h2` URL); then a batch of locks, each found on exactly one server and both
/// servers holding some.
#[test]
fn coordination_conforms_across_two_servers() {
    let (Some(a), Some(b)) = (Memcached::start(), Memcached::start()) else {
        return;
    };
    run_case(async {
        let url = format!("cache+memcached://{};{}/", a.addr(), b.addr());
        let connect = || async {
            Arc::new(
                MemcachedBackend::connect(&url, &Config::default())
                    .await
                    .unwrap(),
            ) as DynBackend
        };
        cases::case_coord_throttle(connect().await).await;
        cases::case_coord_lock(connect().await).await;
        cases::case_coord_slots(connect().await).await;

        let backend = connect().await;
        let c = backend.capabilities().coordination.expect("coordination");
        let (on_a, on_b) = (client(&a), client(&b));
        let mut counts = [0, 0];
        for i in 0..32 {
            let key = format!("two-servers-{i}");
            assert_eq!(
                c.lock(&key, "h", Duration::from_secs(30)).await.unwrap(),
                "h"
            );
            let raw = format!("celeriac-coord-lock-{key}");
            let found = (
                on_a.get(&raw).await.unwrap().is_some(),
                on_b.get(&raw).await.unwrap().is_some(),
            );
            match found {
                (true, false) => counts[0] += 1,
                (false, true) => counts[1] += 1,
                other => panic!("{raw} on (a, b) = {other:?}: expected on exactly one"),
            }
            assert!(c.unlock(&key, "h").await.unwrap());
        }
        assert!(counts[0] > 0 && counts[1] > 0, "{counts:?}");
    });
}

/// Keys sit under our own stem (after Celery's `global_keyprefix`), values are short text
/// with flags 0; a key memcached cannot take as it is (a space, too long) is hashed.
#[tokio::test]
async fn keys_and_values_are_small_text_outside_celerys_keys() {
    let Some(server) = Memcached::start() else {
        return;
    };
    let b = MemcachedBackend::connect_with(
        &server.url(),
        MemcachedOptions::default().global_keyprefix("app"),
    )
    .await
    .unwrap();
    let raw = client(&server);
    let long = Duration::from_secs(30);

    assert_eq!(b.lock("k", "holder one", long).await.unwrap(), "holder one");
    let item = raw.get("app_celeriac-coord-lock-k").await.unwrap().unwrap();
    assert_eq!(item.flags, flags::BYTES);
    let text = String::from_utf8(item.data).unwrap();
    let (until, holder) = text.split_once(' ').unwrap();
    assert_eq!(holder, "holder one");
    let until: u64 = until.parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    assert!(
        until > now && until <= now + 31_000_000,
        "the lease end is the worker's clock in microseconds: {until} vs {now}"
    );

    assert_eq!(
        b.throttle("k", "10/s".parse().unwrap()).await.unwrap(),
        Admission::At(Duration::ZERO)
    );
    let item = raw.get("app_celeriac-coord-rate-k").await.unwrap().unwrap();
    assert!(item.data.iter().all(u8::is_ascii_digit), "{item:?}");

    assert!(b.acquire("k", "s1", 2, long).await.unwrap());
    let item = raw
        .get("app_celeriac-coord-slots-k")
        .await
        .unwrap()
        .unwrap();
    let table: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&item.data).unwrap();
    assert_eq!(table.keys().collect::<Vec<_>>(), ["s1"]);
    b.release("k", "s1").await.unwrap();
    assert!(
        raw.get("app_celeriac-coord-slots-k")
            .await
            .unwrap()
            .is_none(),
        "the last holder leaving deletes the table"
    );

    // A unique task's key with spaces in its arguments, and one too long for memcached.
    for key in [
        "unique:t:[[\"two words\"],{}]".to_owned(),
        format!("unique:t:[[\"{}\"],{{}}]", "x".repeat(400)),
    ] {
        assert_eq!(b.lock(&key, "a", long).await.unwrap(), "a");
        assert_eq!(b.lock(&key, "b", long).await.unwrap(), "a");
        assert!(b.unlock(&key, "a").await.unwrap());
        assert_eq!(b.lock(&key, "b", long).await.unwrap(), "b");
    }
}

/// A holder whose lease ran out and was taken over cannot free the new holder's lock; the
/// compare-and-delete underneath refuses an item changed since it was read.
#[tokio::test]
async fn an_old_holder_never_frees_a_lock_taken_over() {
    let Some(server) = Memcached::start() else {
        return;
    };
    let b = MemcachedBackend::connect(&server.url(), &Config::default())
        .await
        .unwrap();
    assert_eq!(
        b.lock("k", "old", Duration::from_millis(100))
            .await
            .unwrap(),
        "old"
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        b.lock("k", "new", Duration::from_secs(30)).await.unwrap(),
        "new"
    );
    assert!(!b.unlock("k", "old").await.unwrap());
    assert_eq!(
        b.lock("k", "third", Duration::from_secs(30)).await.unwrap(),
        "new"
    );

    let raw = client(&server);
    raw.set("cd", flags::BYTES, b"1", 0).await.unwrap();
    let read = raw.gets("cd").await.unwrap().unwrap();
    raw.set("cd", flags::BYTES, b"2", 0).await.unwrap();
    assert_eq!(
        raw.delete_cas("cd", read.cas.unwrap()).await.unwrap(),
        CasOutcome::Exists
    );
    assert_eq!(raw.get("cd").await.unwrap().unwrap().data, b"2");
    let read = raw.gets("cd").await.unwrap().unwrap();
    assert_eq!(
        raw.delete_cas("cd", read.cas.unwrap()).await.unwrap(),
        CasOutcome::Stored
    );
    assert_eq!(
        raw.delete_cas("cd", read.cas.unwrap()).await.unwrap(),
        CasOutcome::NotFound
    );
}

/// A crashed holder's lock and slot leave memcached by themselves (memcached's own expiry, a
/// second or two after the lease), without anyone asking for the key again.
#[tokio::test]
async fn a_crashed_holders_items_expire_in_memcached() {
    let Some(server) = Memcached::start() else {
        return;
    };
    let b = MemcachedBackend::connect(&server.url(), &Config::default())
        .await
        .unwrap();
    let short = Duration::from_millis(200);
    b.lock("crash", "gone", short).await.unwrap();
    assert!(b.acquire("crash", "gone", 1, short).await.unwrap());
    let raw = client(&server);
    let keys = ["celeriac-coord-lock-crash", "celeriac-coord-slots-crash"];
    let deadline = Instant::now() + Duration::from_secs(10);
    for key in keys {
        assert!(raw.get(key).await.unwrap().is_some(), "{key} was stored");
    }
    for key in keys {
        while raw.get(key).await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "{key} never expired");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Four clients (each its own connection, as four worker processes would have), four callers
/// each, share one `20/s` budget, each starting at its slot: 61 starts span at least 60
/// intervals (less a little for timer jitter). Prints the rate (`-- --nocapture`).
#[test]
fn a_cluster_rate_holds_across_clients() {
    let Some(server) = Memcached::start() else {
        return;
    };
    run_case(async {
        let rate: celeriac_core::RateLimit = "20/s".parse().unwrap();
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(
                MemcachedBackend::connect(&server.url(), &Config::default())
                    .await
                    .unwrap(),
            );
        }
        let times = std::sync::Mutex::new(Vec::new());
        let caller = |b: MemcachedBackend| {
            let times = &times;
            async move {
                loop {
                    if times.lock().unwrap().len() >= 61 {
                        return;
                    }
                    let asked = Instant::now();
                    match b.throttle("partner", rate).await.unwrap() {
                        Admission::At(delay) => {
                            // The caller starts at its slot.
                            tokio::time::sleep(delay).await;
                            times.lock().unwrap().push((asked, Instant::now()));
                        }
                        Admission::Wait(wait) => tokio::time::sleep(wait).await,
                    }
                }
            }
        };
        let mut tasks = Vec::new();
        for b in &clients {
            for _ in 0..4 {
                tasks.push(caller(b.clone()));
            }
        }
        join_all(tasks).await;
        let times = times.into_inner().unwrap();
        let n = times.len();
        let mut answered: Vec<Instant> = times.iter().map(|t| t.1).collect();
        answered.sort();
        let rate_seen = (n - 1) as f64 / (answered[n - 1] - answered[0]).as_secs_f64();
        println!("{n} starts at 20/s from 16 callers on 4 clients: {rate_seen:.2}/s");
        let first_asked = times.iter().map(|t| t.0).min().unwrap();
        let span = answered[n - 1] - first_asked;
        assert!(
            span >= Duration::from_millis(50) * (n as u32 - 1) - Duration::from_micros(12_500),
            "{n} starts within {span:?}: faster than 20/s"
        );
    });
}

async fn join_all<F: std::future::Future<Output = ()>>(fs: Vec<F>) {
    let mut set: Vec<std::pin::Pin<Box<F>>> = fs.into_iter().map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        set.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if set.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}
