//! Helpers: a key prefix per test (so tests share one Redis without colliding) and raw access.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use celeriac_core::{Consumer, Delivery, Handler, Message, Registry, TaskDef, TaskOptions};
use celeriac_redis::{RedisBackend, RedisBroker, RedisOptions};

pub(crate) const ADDR: &str = "127.0.0.1:6379";
pub(crate) const URL: &str = "redis://127.0.0.1:6379/0";

/// Every key a test writes starts with this, then the pid, then a counter.
const ROOT: &str = "celeriac-redis-test:";

/// Whether Redis is up (else the test prints SKIPPED and returns).
pub(crate) fn redis_up() -> bool {
    celeriac_test::services::require_service("redis", ADDR)
}

/// A fresh prefix `celeriac-redis-test:<pid>:<n>:`; the first call in a process deletes keys
/// left by test processes that have exited.
pub(crate) fn prefix() -> String {
    static CLEANED: Once = Once::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    CLEANED.call_once(clean_dead_runs);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{ROOT}{}:{n}:", std::process::id())
}

fn clean_dead_runs() {
    let Ok(client) = redis::Client::open(URL) else {
        return;
    };
    let Ok(mut c) = client.get_connection() else {
        return;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{ROOT}*"))
        .query(&mut c)
        .unwrap_or_default();
    for k in keys {
        let pid = k[ROOT.len()..]
            .split(':')
            .next()
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&k).query(&mut c);
            }
        }
    }
}

/// A plain async connection, to read what the drivers wrote.
pub(crate) async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(URL)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

pub(crate) async fn broker_with(prefix: &str, options: RedisOptions) -> RedisBroker {
    RedisBroker::connect_with(URL, options.global_keyprefix(prefix))
        .await
        .expect("connect redis broker")
}

pub(crate) async fn backend_with(prefix: &str, options: RedisOptions) -> RedisBackend {
    RedisBackend::connect_with(URL, options.global_keyprefix(prefix))
        .await
        .expect("connect redis backend")
}

/// A task message with a fresh id.
pub(crate) fn msg() -> Message {
    celeriac_test::services::test_message("tests.add")
}

/// The next delivery, failing the test after `within`.
pub(crate) async fn next_within(consumer: &mut Box<dyn Consumer>, within: Duration) -> Delivery {
    tokio::time::timeout(within, consumer.next())
        .await
        .expect("a delivery in time")
        .expect("next")
        .expect("not closed")
}

/// A registry with one blocking task, `tests.add`, that counts its runs (and returns null).
pub(crate) fn counting_registry() -> (Registry, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let mut registry = Registry::new();
    registry.insert(TaskDef {
        name: "tests.add".into(),
        params: &[],
        options: TaskOptions::default(),
        handler: Handler::Blocking(Arc::new(move |_, _| {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok(serde_json::Value::Null)
        })),
    });
    (registry, runs)
}
