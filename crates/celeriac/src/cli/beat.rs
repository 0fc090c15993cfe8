//! `beat`: run the periodic-task scheduler, or list and change its entries; `worker -B`.
//!
//! Entries come from the `[beat]` table of the app's config (`celeriac.toml` or
//! `$CELERIAC_CONFIG`, read once by the core config) and from code through [`run_with_beat`];
//! the store is `--store`, else `[beat] store`, else the broker URL, opened through the app's
//! driver table (the drivers bring the stores).

use std::process::ExitCode;
use std::sync::Mutex;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use serde_json::{Map, Value};

use crate::App;
use crate::AppBuilder;
use celeriac_beat::{Beat, BeatConfig, BeatOptions, Control, Entry, EntrySpec};

/// Entries declared in code for this process's command line (see [`run_with_beat`]).
static DECLARED: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// Like [`super::run`], with periodic-task entries declared in code (in addition to the
/// `[beat]` table of `celeriac.toml`).
///
/// ```no_run
/// use std::time::Duration;
/// use celeriac::beat::{Entry, crontab, every};
///
/// fn main() -> std::process::ExitCode {
///     let entries = vec![
///         Entry::new("ping", "tasks.ping", every(Duration::from_secs(30))),
///         Entry::new("report", "tasks.report", crontab("0", "7", "mon-fri", "*", "*").unwrap()),
///     ];
///     celeriac::cli::run_with_beat(celeriac::App::builder().load_config(), entries)
/// }
/// ```
pub fn run_with_beat(builder: AppBuilder, entries: impl IntoIterator<Item = Entry>) -> ExitCode {
    DECLARED.lock().expect("beat entries lock").extend(entries);
    super::run(builder)
}

/// `beat` and its subcommands.
#[derive(Args, Debug, Default)]
pub(crate) struct BeatArgs {
    #[command(subcommand)]
    action: Option<Action>,
    /// Missed-tick policy: catch_up (send once for all missed ticks) or skip.
    #[arg(long, global = true)]
    missed: Option<String>,
    /// Seconds the leader lease lasts (a new leader takes over this long after a crash).
    #[arg(long, global = true)]
    lease: Option<f64>,
    /// Store URL (default: `store` of the beat section of the config, else the broker URL).
    #[arg(long, global = true)]
    store: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Action {
    /// Run the scheduler until SIGTERM/SIGINT (the default).
    Run,
    /// List the entries with their last and next run.
    List,
    /// Add (or replace) an entry at run time; the running leader picks it up.
    Add(Box<AddArgs>),
    /// Remove an entry added at run time.
    Remove {
        /// The entry name.
        name: String,
    },
    /// Pause an entry: its ticks pass without sending.
    Pause {
        /// The entry name.
        name: String,
    },
    /// Resume a paused entry.
    Resume {
        /// The entry name.
        name: String,
    },
    /// Send an entry's task once now.
    Trigger {
        /// The entry name.
        name: String,
    },
}

#[derive(Args, Debug)]
struct AddArgs {
    /// The entry name.
    name: String,
    /// The task name, e.g. tasks.cleanup.
    #[arg(long, short = 't')]
    task: String,
    /// Interval in seconds.
    #[arg(long)]
    every: Option<f64>,
    /// Round interval ticks to the interval's unit (Celery's `relative`).
    #[arg(long)]
    relative: bool,
    /// Crontab text: "minute hour day_of_month month_of_year day_of_week".
    #[arg(long)]
    crontab: Option<String>,
    /// One-off time (ISO-8601).
    #[arg(long)]
    at: Option<String>,
    /// IANA time zone of the crontab.
    #[arg(long)]
    timezone: Option<String>,
    /// Positional arguments as a JSON array.
    #[arg(long, short = 'a', default_value = "[]")]
    args: String,
    /// Keyword arguments as a JSON object.
    #[arg(long, short = 'k', default_value = "{}")]
    kwargs: String,
    /// Queue to send to.
    #[arg(long, short = 'Q')]
    queue: Option<String>,
    /// Priority 0-9.
    #[arg(long)]
    priority: Option<u8>,
    /// Seconds after sending at which the task expires.
    #[arg(long)]
    expires: Option<f64>,
}

/// The app's `[beat]` table (from `celeriac.toml` or `$CELERIAC_CONFIG`, as loaded by
/// [`AppBuilder::load_config`]); none is the default.
fn app_config(app: &App) -> anyhow::Result<BeatConfig> {
    match &app.config().beat {
        None => Ok(BeatConfig::default()),
        Some(table) => BeatConfig::from_table(table).context("invalid [beat] table in the config"),
    }
}

/// The entries of `app`'s beat (declared and added at run time), for the dashboard.
#[cfg(feature = "web")]
pub(super) async fn control_for(app: &App) -> anyhow::Result<Control> {
    Ok(build(app, &BeatArgs::default()).await?.control())
}

/// A beat for `app`, with its entries and settings checked: the start-up errors of the issue
/// (bad crontab, bad interval) come out of here.
async fn build(app: &App, args: &BeatArgs) -> anyhow::Result<Beat> {
    let config = app_config(app)?;
    let mut options = config.apply(BeatOptions::default())?;
    if let Some(m) = &args.missed {
        options.missed = m.parse()?;
    }
    if let Some(l) = args.lease {
        options.lease = std::time::Duration::try_from_secs_f64(l)
            .ok()
            .filter(|d| !d.is_zero())
            .context("--lease must be a positive number of seconds")?;
    }
    let url = args
        .store
        .clone()
        .or_else(|| config.store.clone())
        .unwrap_or_else(|| app.config().broker_url().to_owned());
    let store = app
        .drivers()
        .open_beat_store(&url, app.config())
        .await
        .context("cannot open the beat store")?;
    let mut entries = DECLARED.lock().expect("beat entries lock").clone();
    entries.extend(config.entries()?);
    let beat = Beat::from_parts(store, std::sync::Arc::new(app.clone()), options).entries(entries);
    beat.validate()?;
    Ok(beat)
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Runs `beat ...`.
pub(crate) async fn command(app: &App, args: BeatArgs) -> anyhow::Result<ExitCode> {
    let beat = build(app, &args).await?;
    let control = beat.control();
    match args.action.unwrap_or(Action::Run) {
        Action::Run => {
            beat.run(shutdown_signal()).await?;
        }
        Action::List => list(&control).await?,
        Action::Add(a) => {
            let spec = spec_of(&a)?;
            control.add(&a.name, &spec).await?;
            println!("added {}", a.name);
        }
        Action::Remove { name } => {
            control.remove(&name).await?;
            println!("removed {name}");
        }
        Action::Pause { name } => {
            control.pause(&name).await?;
            println!("paused {name}");
        }
        Action::Resume { name } => {
            control.resume(&name).await?;
            println!("resumed {name}");
        }
        Action::Trigger { name } => {
            control.trigger(&name).await?;
            println!("triggered {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn spec_of(a: &AddArgs) -> anyhow::Result<EntrySpec> {
    let mut spec = EntrySpec::new(&a.task);
    spec.every = a.every;
    spec.relative = a.relative.then_some(true);
    spec.crontab = a.crontab.clone().map(celeriac_beat::CrontabSpec::Text);
    spec.at = a.at.clone();
    spec.timezone = a.timezone.clone();
    spec.args =
        serde_json::from_str::<Vec<Value>>(&a.args).context("--args must be a JSON array")?;
    spec.kwargs = serde_json::from_str::<Map<String, Value>>(&a.kwargs)
        .context("--kwargs must be a JSON object")?;
    spec.queue = a.queue.clone();
    spec.priority = a.priority;
    spec.expires = a.expires;
    if spec.every.is_none() && spec.crontab.is_none() && spec.at.is_none() {
        bail!("give --every SECONDS, --crontab TEXT or --at TIME");
    }
    Ok(spec)
}

async fn list(control: &Control) -> anyhow::Result<()> {
    let fmt = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map_or_else(|| "-".to_owned(), celeriac_core::time::format)
    };
    println!(
        "{:<20} {:<24} {:<28} {:<7} {:>6} {:<26} {:<26}",
        "name", "task", "schedule", "state", "runs", "last run", "next run"
    );
    for e in control.list().await? {
        let state = if e.invalid.is_some() {
            "invalid"
        } else if e.paused {
            "paused"
        } else {
            "active"
        };
        println!(
            "{:<20} {:<24} {:<28} {:<7} {:>6} {:<26} {:<26}",
            e.name,
            e.task,
            e.schedule,
            state,
            e.total_run_count,
            fmt(e.last_run_at),
            fmt(e.next_run_at)
        );
        if let Some(why) = e.invalid {
            println!("  {why}");
        }
    }
    Ok(())
}

/// `worker -B`: the worker and a beat in one process; the beat stops (and gives up its lease)
/// when the worker does.
pub(crate) async fn with_worker(
    app: &App,
    options: celeriac_worker::WorkerOptions,
) -> anyhow::Result<()> {
    let beat = build(app, &BeatArgs::default()).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(beat.run(async {
        let _ = stopped.await;
    }));
    let worker = app.worker(options).run_until_signal().await;
    let _ = stop.send(());
    match running.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "embedded beat failed"),
        Err(e) => tracing::warn!(error = %e, "embedded beat panicked"),
    }
    worker?;
    Ok(())
}
