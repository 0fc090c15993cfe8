//! A rough throughput check of kombu's tables as a broker and Celery's result table:
//! publish, consume and ack N messages, then store and read N results.
//!
//! `cargo run --release -p celeriac-sqla --example sqla_throughput [URL-LOCATION] [N]
//! [consumers] [prefetch] [publishers]`, where the location is e.g.
//! `postgresql://postgres@127.0.0.1/celeriac_sqla` or `mysql://root@127.0.0.1/celeriac_sqla`
//! (the `sqla+` and `db+` prefixes are added).
//!
//! Publishers and consumers run at once in one process; the rate is N over the time until the
//! last ack. Then N results are stored by `publishers` concurrent tasks, and read back.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use celeriac_core::protocol::{Body, ContentType, Headers, Message, new_id};
use celeriac_core::{Broker, Config, ConsumeOptions, PublishOptions, ResultBackend, TaskMeta};
use celeriac_sqla::{SqlaBackend, SqlaBroker};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> celeriac_core::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let location = args
        .first()
        .cloned()
        .unwrap_or_else(|| "postgresql://postgres@127.0.0.1/celeriac_sqla".to_owned());
    let num = |i: usize, d: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let n = num(1, 20_000);
    let consumers = num(2, 2);
    let prefetch = num(3, 64);
    let publishers = num(4, 8);
    let mut config = Config::default();
    config.worker.concurrency = 16;
    let broker = Arc::new(SqlaBroker::connect(&format!("sqla+{location}"), &config).await?);
    let queue = format!("bench-{}", &new_id()[..8]);
    broker.declare(&queue).await?;
    let body = Body::new(vec![1.into(), 2.into()], Default::default());

    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let (broker, body, queue) = (broker.clone(), body.clone(), queue.clone());
        let count = n / publishers + usize::from(p < n % publishers);
        tasks.push(tokio::spawn(async move {
            for _ in 0..count {
                let m = Message::new(
                    Headers::new("bench.add", new_id()),
                    &body,
                    ContentType::Json,
                )?;
                broker
                    .publish(&queue, &m, PublishOptions::default())
                    .await?;
            }
            Ok::<(), celeriac_core::Error>(())
        }));
    }
    let taken = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..consumers {
        let (broker, taken, queue) = (broker.clone(), taken.clone(), queue.clone());
        workers.push(tokio::spawn(async move {
            let mut c = broker
                .consume(&[queue], ConsumeOptions::new(prefetch))
                .await?;
            let mut acks = tokio::task::JoinSet::new();
            while taken.fetch_add(1, Ordering::AcqRel) < n {
                let d = c.next().await?.expect("open");
                d.message.as_ref().expect("decodes");
                acks.spawn(d.ack());
                while let Some(r) = acks.try_join_next() {
                    r.expect("ack task")?;
                }
            }
            while let Some(r) = acks.join_next().await {
                r.expect("ack task")?;
            }
            Ok::<(), celeriac_core::Error>(())
        }));
    }
    for t in tasks {
        t.await.expect("publisher")?;
    }
    let publish_time = started.elapsed();
    for w in workers {
        w.await.expect("consumer")?;
    }
    let total = started.elapsed();
    println!(
        "broker {location}: {n} messages published in {:.2}s ({:.0}/s), all acked in {:.2}s = \
         {:.0} msg/s end-to-end ({consumers} consumers, prefetch {prefetch}, {publishers} \
         publishers); left: {:?}",
        publish_time.as_secs_f64(),
        n as f64 / publish_time.as_secs_f64(),
        total.as_secs_f64(),
        n as f64 / total.as_secs_f64(),
        broker.stats(&queue).await?
    );
    broker.purge(&queue).await?;

    let backend = Arc::new(SqlaBackend::connect(&format!("db+{location}"), &config).await?);
    let ids: Arc<Vec<String>> = Arc::new((0..n).map(|_| new_id()).collect());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let (backend, ids) = (backend.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            for id in ids.iter().skip(p).step_by(publishers) {
                backend
                    .store(&TaskMeta::success(id.clone(), 3.into()))
                    .await?;
            }
            Ok::<(), celeriac_core::Error>(())
        }));
    }
    for t in tasks {
        t.await.expect("store task")?;
    }
    let stored = started.elapsed();
    let started = Instant::now();
    for chunk in ids.chunks(500) {
        let got = backend.get_many(chunk).await?;
        assert!(got.iter().all(Option::is_some));
    }
    let read = started.elapsed();
    println!(
        "backend {location}: {n} results stored in {:.2}s ({:.0}/s, {publishers} concurrent), \
         read in batches of 500 in {:.2}s ({:.0}/s)",
        stored.as_secs_f64(),
        n as f64 / stored.as_secs_f64(),
        read.as_secs_f64(),
        n as f64 / read.as_secs_f64()
    );
    for id in ids.iter() {
        backend.forget(id).await?;
    }
    Ok(())
}
