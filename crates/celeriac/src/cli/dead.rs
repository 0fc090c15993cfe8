//! `dead`: list, inspect, requeue and purge dead letters (messages a worker set aside in
//! `<queue>.dead` because they could not run or were delivered too often).
//!
//! A thin front end over [`celeriac_worker::dead`]; see docs/RELIABILITY.md.

use std::process::ExitCode;

use anyhow::bail;
use clap::{Args, Subcommand};

use crate::App;
use celeriac_worker::dead::{self, DeadLetter};

/// `dead` and its subcommands.
#[derive(Args, Debug)]
pub(crate) struct DeadArgs {
    #[command(subcommand)]
    action: Option<Action>,
    /// The queue whose dead letters to act on (default: the default queue); `<queue>.dead`
    /// works too.
    #[arg(short = 'Q', long, global = true)]
    queue: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Action {
    /// List dead-letter queues with their counts, or with -Q the dead letters of one queue
    /// (the default).
    List {
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one dead letter: reason, origin, headers, body.
    Inspect {
        /// The task id.
        id: String,
    },
    /// Send dead letters back to their queue (their stored FAILURE is forgotten).
    Requeue {
        /// Task ids to requeue.
        ids: Vec<String>,
        /// Requeue every dead letter of the queue.
        #[arg(long)]
        all: bool,
    },
    /// Delete every dead letter of the queue.
    Purge,
}

pub(crate) async fn command(app: &App, args: DeadArgs) -> anyhow::Result<ExitCode> {
    let broker = &**app.broker();
    let queue = args
        .queue
        .clone()
        .unwrap_or_else(|| app.config().default_queue.clone());
    match args.action.unwrap_or(Action::List { limit: 100 }) {
        Action::List { limit } if args.queue.is_none() => {
            let queues = dead::dead_queues(broker).await?;
            if queues.is_empty() {
                println!("no dead letters");
            }
            for q in queues {
                let n = broker.stats(&q).await?.total();
                println!("{q:<32} {n:>10}");
            }
            // With no -Q, also show the default queue's dead letters.
            print_list(&dead::list(broker, &queue, limit).await?);
        }
        Action::List { limit } => print_list(&dead::list(broker, &queue, limit).await?),
        Action::Inspect { id } => {
            let Some(d) = dead::inspect(broker, &queue, &id).await? else {
                bail!("no dead letter {id} in {}", dead::dead_queue(&queue));
            };
            println!("id        {}", d.id());
            println!("task      {}", d.task());
            println!("queue     {}", d.queue);
            println!("reason    {}", d.reason);
            println!("dead at   {}", d.dead_at.as_deref().unwrap_or("-"));
            println!("worker    {}", d.worker.as_deref().unwrap_or("-"));
            if let Some(n) = d.deliveries {
                println!("delivered {n} time(s)");
            }
            println!("headers   {}", serde_json::to_string(&d.message.headers)?);
            println!("content   {}", d.message.content_type);
            println!("body      {}", String::from_utf8_lossy(&d.message.body));
        }
        Action::Requeue { ids, all } => {
            if ids.is_empty() && !all {
                bail!("name the task ids to requeue, or pass --all");
            }
            let ids = (!all).then_some(ids);
            let n = dead::requeue(broker, Some(&**app.backend()), &queue, ids.as_deref()).await?;
            println!("requeued {n} message(s) from {}", dead::dead_queue(&queue));
        }
        Action::Purge => {
            let n = dead::purge(broker, &queue).await?;
            println!(
                "purged {n} dead letter(s) from {}",
                dead::dead_queue(&queue)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_list(letters: &[DeadLetter]) {
    for d in letters {
        println!(
            "{}  {}  {}  {}  {}",
            d.id(),
            d.task(),
            d.dead_queue,
            d.dead_at.as_deref().unwrap_or("-"),
            d.reason
        );
    }
}
