//! The quickstart: no server needed. Opens the embedded SQLite broker and backend in
//! `quickstart.db`, starts a worker in this process, sends a few thousand tasks, shows progress
//! while they run, prints some results, and shuts the worker down cleanly.
//!
//! `cargo run --release -p celeriac-examples --bin quickstart [-- <count>]`

use std::process::ExitCode;
use std::time::{Duration, Instant};

use celeriac::cli::Progress;
use celeriac_examples::{add, fail, xsum};

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

async fn run() -> celeriac::Result<()> {
    let count: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5_000);
    let path = "quickstart.db";
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{path}{suffix}"));
    }
    let app = celeriac::App::builder()
        .broker_url(format!("sqlite://{path}"))
        .task::<add>()
        .task::<xsum>()
        .task::<fail>()
        .build()
        .await?;
    println!("broker and results: sqlite://{path}");

    let mut options = app.worker_options();
    options.concurrency = 64;
    let worker = app.worker(options);
    let stop = worker.shutdown_handle();
    let running = tokio::spawn(worker.run());

    // Several concurrent senders: each publish waits for the broker's group commit, and
    // concurrent ones share it.
    let started = Instant::now();
    let senders = 16;
    let mut batches = Vec::with_capacity(senders);
    for s in 0..senders {
        let app = app.clone();
        batches.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for i in (s..count).step_by(senders) {
                sent.push(add::delay(&app, i as i64, i as i64).await?);
            }
            Ok::<_, celeriac::Error>(sent)
        }));
    }
    let mut results = Vec::with_capacity(count);
    for b in batches {
        results.extend(b.await.map_err(|e| {
            celeriac::Error::new(celeriac::ErrorKind::Io, "sender died").with_source(e)
        })??);
    }
    let sent = started.elapsed();
    println!(
        "sent {count} tasks in {:.2}s ({:.0}/s)",
        sent.as_secs_f64(),
        count as f64 / sent.as_secs_f64()
    );

    let mut progress = Progress::new(count);
    let mut total: i64 = 0;
    for (i, r) in results.iter().enumerate() {
        total += r.get_timeout(Duration::from_secs(60)).await?;
        progress.update(i + 1);
    }
    progress.finish();
    let elapsed = started.elapsed();
    println!(
        "{count} results in {:.2}s ({:.0} tasks/s end to end); sum of results = {total}",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64()
    );

    let s = xsum::delay(&app, vec![1.5, 2.5, 3.0]).await?;
    println!(
        "tasks.xsum([1.5, 2.5, 3.0]) = {}",
        s.get_timeout(Duration::from_secs(10)).await?
    );
    let f = fail::delay(&app, "this task always fails".to_owned()).await?;
    match f.get_timeout(Duration::from_secs(10)).await {
        Ok(()) => println!("tasks.fail unexpectedly succeeded"),
        Err(e) => println!("tasks.fail -> {} ({})", e, f.state().await?),
    }

    stop.warm();
    let report = running.await.map_err(|e| {
        celeriac::Error::new(celeriac::ErrorKind::Io, "worker task died").with_source(e)
    })??;
    println!("worker stopped cleanly: {report:?}");
    app.close().await
}
