//! A rough throughput check of the SQLite broker: publish, consume and ack N messages.
//!
//! `cargo run --release -p celeriac-sqlite --example sqlite_throughput [N] [consumers] [prefetch]
//! [publishers]`
//!
//! Publishers and consumers run at once in one process (by default four publisher tasks, each
//! sending one message per call and awaiting it, so group commit is what batches them); the
//! rate is N over the time until the last ack. The rate grows with the number of publishers:
//! each one waits a round trip to the connection thread per message.

use std::sync::Arc;
use std::time::Instant;

use celeriac_core::protocol::{Body, ContentType, Headers, Message, new_id};
use celeriac_core::{Broker, ConsumeOptions, PublishOptions};
use celeriac_sqlite::{SqliteBroker, SqliteOptions};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> celeriac_core::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(50_000);
    let consumers = args.get(1).copied().unwrap_or(2);
    let prefetch = args.get(2).copied().unwrap_or(64);
    let path = std::env::temp_dir().join(format!("celeriac-throughput-{}.db", std::process::id()));
    let broker = Arc::new(SqliteBroker::open(&path, SqliteOptions::default()).await?);
    broker.declare("bench").await?;
    let body = Body::new(vec![1.into(), 2.into()], Default::default());
    let started = Instant::now();
    let publishers = args.get(3).copied().unwrap_or(4);
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let broker = broker.clone();
        let body = body.clone();
        let count = n / publishers + usize::from(p < n % publishers);
        tasks.push(tokio::spawn(async move {
            for _ in 0..count {
                let m = Message::new(
                    Headers::new("bench.add", new_id()),
                    &body,
                    ContentType::Json,
                )?;
                broker
                    .publish("bench", &m, PublishOptions::default())
                    .await?;
            }
            Ok::<(), celeriac_core::Error>(())
        }));
    }
    let published = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..consumers {
        let broker = broker.clone();
        let published = published.clone();
        workers.push(tokio::spawn(async move {
            let mut c = broker
                .consume(&["bench".to_owned()], ConsumeOptions::new(prefetch))
                .await?;
            let mut acks = tokio::task::JoinSet::new();
            while published.fetch_add(1, std::sync::atomic::Ordering::AcqRel) < n {
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
    let stats = broker.stats("bench").await?;
    println!(
        "{n} messages: published in {:.2}s, all acked in {:.2}s = {:.0} msg/s end-to-end \
         ({consumers} consumers, prefetch {prefetch}); left: {stats:?}",
        publish_time.as_secs_f64(),
        total.as_secs_f64(),
        n as f64 / total.as_secs_f64()
    );
    drop(broker);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    Ok(())
}
