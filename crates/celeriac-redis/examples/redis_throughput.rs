//! Publish N messages, then consume and ack them, against a local Redis; prints rates.
//!
//! `cargo run --release -p celeriac-redis --example redis_throughput -- 20000`

use std::time::Instant;

use celeriac_core::{Broker, ConsumeOptions, PublishOptions};
use celeriac_redis::{RedisBroker, RedisOptions};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> celeriac_core::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let prefix = format!("celeriac-bench-{}:", std::process::id());
    let broker = RedisBroker::connect_with(
        "redis://127.0.0.1:6379/0",
        RedisOptions::default().global_keyprefix(prefix),
    )
    .await?;
    let q = "bench".to_owned();
    let messages: Vec<_> = (0..n)
        .map(|_| {
            (
                celeriac_test::services::test_message("bench.task"),
                PublishOptions::default(),
            )
        })
        .collect();

    let t = Instant::now();
    for (m, o) in &messages {
        broker.publish(&q, m, o.clone()).await?;
    }
    let one_by_one = t.elapsed();
    broker.purge(&q).await?;

    let t = Instant::now();
    for chunk in messages.chunks(500) {
        broker.publish_batch(&q, chunk).await?;
    }
    let batched = t.elapsed();

    let mut consumer = broker
        .consume(std::slice::from_ref(&q), ConsumeOptions::new(64))
        .await?;
    let t = Instant::now();
    for _ in 0..n {
        let d = consumer.next().await?.expect("open");
        d.ack().await?;
    }
    let consumed = t.elapsed();
    let rate = |d: std::time::Duration| n as f64 / d.as_secs_f64();
    println!("{n} messages");
    println!("publish, one at a time: {:>9.0} msg/s", rate(one_by_one));
    println!("publish_batch of 500:   {:>9.0} msg/s", rate(batched));
    println!(
        "consume + ack (1 consumer, sequential): {:>9.0} msg/s",
        rate(consumed)
    );
    Ok(())
}
