//! The bodies of the example binaries (`src/bin/*.rs`), as functions: each binary is a
//! one-line `main` calling its function here, and so are the copies that the end-to-end tests
//! (crate `celeriac-e2e`) build to run as processes.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The example task app as a command line: `tasks worker`, `tasks call tasks.add --args
/// '[2,3]' --wait`, `tasks status`, ... against any broker URL (`--broker`,
/// `CELERIAC_BROKER_URL` or `celeriac.toml`; the default is `sqlite://celeriac.db`).
pub fn tasks_main() -> ExitCode {
    celeriac::cli::run(crate::app())
}

fn usage() -> ExitCode {
    eprintln!("usage: wordcount --broker URL [--timeout SECS] [FILE]");
    ExitCode::from(2)
}

/// The word-count dataflow as a command: sends a document (a file, or standard input) through
/// [`word_count_graph`](crate::word_count_graph) and prints the running word totals while the
/// workers (`tasks worker` on the same broker) count, then the final totals.
///
/// ```text
/// wordcount --broker sqlite://celeriac.db [--timeout SECS] [FILE]
/// ```
///
/// Each progress line is `pending=<n> words=<distinct> counted=<total>`; the final totals are
/// one `<word> <count>` line each, most frequent first, then `run <id> done`.
#[tokio::main]
pub async fn wordcount_main() -> ExitCode {
    let mut broker = None;
    let mut file = None;
    let mut timeout = Duration::from_secs(120);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--broker" => broker = args.next(),
            "--timeout" => match args.next().and_then(|s| s.parse::<f64>().ok()) {
                Some(s) if s > 0.0 => timeout = Duration::from_secs_f64(s),
                _ => return usage(),
            },
            _ if a.starts_with('-') => return usage(),
            _ => file = Some(a),
        }
    }
    let text = match &file {
        Some(path) => std::fs::read_to_string(path),
        None => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map(|_| s)
        }
    };
    let text = match text {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot read the document: {e}");
            return ExitCode::from(1);
        }
    };
    match run(broker, text, timeout).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(broker: Option<String>, text: String, timeout: Duration) -> celeriac::Result<()> {
    let mut builder = crate::app();
    if let Some(url) = broker {
        builder = builder.broker_url(url);
    }
    let app = builder.build().await?;
    let graph = crate::word_count_graph()?;
    let run = graph.start(&app, "split", text).await?;
    println!("run {} started", run.id());
    let deadline = Instant::now() + timeout;
    loop {
        let pending = run.pending().await?;
        let totals = run.totals("count").await?;
        let counted: i64 = totals.values().sum();
        println!("pending={pending} words={} counted={counted}", totals.len());
        if pending <= 0 {
            print_totals(&totals);
            let failed = run.failed().await?;
            if failed > 0 {
                println!("run {} done, {failed} messages failed", run.id());
            } else {
                println!("run {} done", run.id());
            }
            app.close().await?;
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(celeriac::Error::new(
                celeriac::ErrorKind::Timeout,
                format!("run {} not finished after {timeout:?}", run.id()),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print_totals(totals: &BTreeMap<String, i64>) {
    let mut by_count: Vec<(&String, &i64)> = totals.iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (word, n) in by_count {
        println!("{word} {n}");
    }
}
