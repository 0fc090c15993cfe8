//! Tests for per-task rate limits.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::support::*;

#[tokio::test(start_paused = true)]
async fn a_limited_name_is_spaced_out_and_other_names_are_not_held_up() {
    let t0 = Instant::now();
    let log = Arc::new(Mutex::new(Vec::new()));
    let logged = |name: &'static str| {
        let log = log.clone();
        async_task(name, move |_, _| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push((name, t0.elapsed()));
                Ok(json!(null))
            }
        })
    };
    let limited = with_options(logged("tasks.limited"), |o| {
        o.rate_limit = Some("2/s".parse().unwrap());
    });
    let h = start(
        vec![limited, logged("tasks.free")],
        options(|o| {
            o.concurrency = 4;
            o.prefetch_buffer = 4;
        }),
    );
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(h.call("tasks.limited", vec![]).await);
    }
    h.until("limited tasks waiting, unacked", || async {
        h.stats().await.unacked == 2
    })
    .await;
    let free = h.call("tasks.free", vec![]).await;
    h.result(&free).await;
    for id in &ids {
        h.result(id).await;
    }
    h.stop().await;
    let log = log.lock().unwrap().clone();
    let limited: Vec<Duration> = log
        .iter()
        .filter(|(n, _)| *n == "tasks.limited")
        .map(|(_, t)| *t)
        .collect();
    assert_eq!(limited.len(), 3);
    for w in limited.windows(2) {
        assert!(w[1] - w[0] >= Duration::from_millis(500), "{limited:?}");
    }
    let free_at = log.iter().find(|(n, _)| *n == "tasks.free").unwrap().1;
    assert!(
        free_at < limited[1],
        "free ran at {free_at:?}, limited at {limited:?}"
    );
}
