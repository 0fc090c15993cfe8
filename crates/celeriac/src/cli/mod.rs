//! A command line for the user's own binary: `worker`, `call`, `result`, `purge`, `status`,
//! `tasks`, `dead` (dead letters), and with the `beat` feature `beat` and `worker -B`. Started
//! as a processes-pool child (`CELERIAC_POOL_CHILD=1`), it serves the pool instead.
//!
//! ```no_run
//! #[celeriac::task(name = "tasks.add")]
//! fn add(x: i64, y: i64) -> i64 {
//!     x + y
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     celeriac::cli::run(celeriac::App::builder().load_config().task::<add>())
//! }
//! ```
//!
//! Then `my-app worker -Q celery -c 8`, `my-app call tasks.add --args '[2, 3]' --wait`,
//! `my-app result <id>`, `my-app status`. Errors print with their causes and exit with 1;
//! a task that failed exits with 2.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use serde_json::{Map, Value};

use crate::{App, AppBuilder, Signature};
use celeriac_core::{ErrorKind, TaskMeta};

#[cfg(feature = "beat")]
mod beat;
#[cfg(feature = "beat")]
pub use beat::run_with_beat;

mod canvas;
mod control;
mod dead;
mod logging;
mod pool_child;
#[cfg(test)]
mod reference;
#[cfg(feature = "web")]
mod web;

#[derive(Parser, Debug)]
#[command(about = "celeriac: run workers, send tasks, read results", version)]
struct Cli {
    /// Broker URL (overrides celeriac.toml and CELERIAC_BROKER_URL).
    #[arg(long, short = 'b', global = true)]
    broker: Option<String>,
    /// Result backend URL.
    #[arg(long, global = true)]
    result_backend: Option<String>,
    #[command(flatten)]
    logging: logging::LogArgs,
    #[command(subcommand)]
    command: Command,
}

/// The `worker` command's flags; each overrides the `[worker]` configuration.
#[derive(clap::Args, Debug, Default)]
struct WorkerArgs {
    /// Queues to consume, comma separated.
    #[arg(short = 'Q', long, value_delimiter = ',')]
    queues: Vec<String>,
    /// Queues not to consume, comma separated (removed from -Q or the configured ones).
    #[arg(short = 'X', long, value_delimiter = ',')]
    exclude_queues: Vec<String>,
    /// Tasks run at once.
    #[arg(short = 'c', long)]
    concurrency: Option<usize>,
    /// Pool: async, threads or processes.
    #[arg(short = 'P', long)]
    pool: Option<String>,
    /// Node name (default celeriac@<host>); %h is the host name, %n its first label, %d its
    /// domain, %i the process index (0), %I the same with a dash (empty here); a name
    /// without @ is taken as the host part (celeriac@NAME), as Celery does.
    #[arg(short = 'n', long)]
    hostname: Option<String>,
    /// Hard time limit in seconds of every task that sets none itself.
    #[arg(long)]
    time_limit: Option<f64>,
    /// Soft time limit in seconds of every task that sets none itself.
    #[arg(long)]
    soft_time_limit: Option<f64>,
    /// Write the process id to this file; refuse to start when a live process holds it.
    #[arg(long)]
    pidfile: Option<std::path::PathBuf>,
    /// Deliveries held beyond what can run at once.
    #[arg(long, conflicts_with = "prefetch_multiplier")]
    prefetch_buffer: Option<usize>,
    /// Deliveries held per concurrency slot, as Celery counts them (prefetch = multiplier x
    /// concurrency; sets the prefetch buffer to (multiplier - 1) x concurrency).
    #[arg(long)]
    prefetch_multiplier: Option<usize>,
    /// Processes pool: replace a child after this many tasks.
    #[arg(long)]
    max_tasks_per_child: Option<u32>,
    /// Processes pool: replace a child whose resident memory is above this many KiB after a
    /// task.
    #[arg(long)]
    max_memory_per_child: Option<u64>,
    /// Seconds a warm shutdown waits for running tasks before it turns cold (Celery 5.5's
    /// soft shutdown); default: as long as they take.
    #[arg(long)]
    soft_shutdown_timeout: Option<f64>,
    /// Dead-letter a message delivered more than this many times before.
    #[arg(long)]
    max_redeliveries: Option<u32>,
    /// Also run beat (periodic tasks) in this process.
    #[arg(short = 'B', long = "beat")]
    beat: bool,
    /// Send task events (task-received, -started, -succeeded, ...) for monitors.
    #[arg(short = 'E', long = "task-events")]
    task_events: bool,
    /// Seconds between worker heartbeat events (default 2).
    #[arg(long)]
    heartbeat_interval: Option<f64>,
    /// Grow the pool up to MAX while tasks wait, shrink it back to MIN when idle: `MAX,MIN`.
    #[arg(long, value_name = "MAX,MIN")]
    autoscale: Option<String>,
    /// Do not answer remote control (inspect, control).
    #[arg(long)]
    without_remote_control: bool,
    /// Obey only these remote-control commands, comma separated: names and the groups
    /// `inspect` (read-only) and `control` (changes); e.g. `inspect,revoke`.
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    control_allow: Vec<String>,
    /// Celery's optimization profile, `fair` or `default`, accepted so Celery command lines
    /// carry over: every pool here hands a task only to a free slot, which is what `fair` asks.
    #[arg(short = 'O', value_name = "PROFILE", value_parser = ["fair", "default"])]
    optimization: Option<String>,
}

impl WorkerArgs {
    /// Applies the flags given to `o`; a bad value is an error naming its flag.
    fn apply(self, o: &mut celeriac_worker::WorkerOptions) -> anyhow::Result<()> {
        let trimmed = |list: Vec<String>| -> Vec<String> {
            list.iter()
                .map(|q| q.trim())
                .filter(|q| !q.is_empty())
                .map(str::to_owned)
                .collect()
        };
        let queues = trimmed(self.queues);
        if !queues.is_empty() {
            o.queues = queues;
        }
        let excluded = trimmed(self.exclude_queues);
        if !excluded.is_empty() {
            o.queues.retain(|q| !excluded.contains(q));
            if o.queues.is_empty() {
                bail!("-X {} leaves no queue to consume", excluded.join(","));
            }
        }
        if let Some(c) = self.concurrency {
            if c == 0 {
                bail!("--concurrency must be at least 1");
            }
            o.concurrency = c;
        }
        if let Some(p) = self.pool {
            o.pool = p
                .parse()
                .map_err(|e: celeriac_core::Error| anyhow::anyhow!(e))?;
        }
        if let Some(h) = self.hostname {
            o.hostname = node_name(&h, &celeriac_core::hostname());
        }
        if let Some(t) = self.time_limit {
            o.time_limit = Some(secs(t, "--time-limit")?).filter(|d| !d.is_zero());
        }
        if let Some(t) = self.soft_time_limit {
            o.soft_time_limit = Some(secs(t, "--soft-time-limit")?).filter(|d| !d.is_zero());
        }
        if let Some(b) = self.prefetch_buffer {
            o.prefetch_buffer = b;
        }
        if let Some(m) = self.prefetch_multiplier {
            if m == 0 {
                bail!("--prefetch-multiplier must be at least 1");
            }
            o.prefetch_buffer = (m - 1).saturating_mul(o.concurrency.max(1));
        }
        if let Some(n) = self.max_tasks_per_child {
            if n == 0 {
                bail!("--max-tasks-per-child must be at least 1");
            }
            o.max_tasks_per_child = Some(n);
        }
        if let Some(kib) = self.max_memory_per_child {
            if kib == 0 {
                bail!("--max-memory-per-child must be at least 1 (KiB)");
            }
            o.max_memory_per_child = Some(kib);
        }
        if let Some(t) = self.soft_shutdown_timeout {
            o.soft_shutdown_timeout = Some(secs(t, "--soft-shutdown-timeout")?);
        }
        if let Some(n) = self.max_redeliveries {
            o.max_redeliveries = n;
        }
        if self.task_events {
            o.task_events = true;
        }
        if let Some(t) = self.heartbeat_interval {
            let d = secs(t, "--heartbeat-interval")?;
            if d.is_zero() {
                bail!("--heartbeat-interval must be more than 0 seconds");
            }
            o.heartbeat_interval = d;
        }
        if let Some(a) = self.autoscale {
            o.autoscale = Some(autoscale(&a)?);
            if let Some((max, _)) = o.autoscale {
                o.concurrency = o.concurrency.min(max);
            }
        }
        if self.without_remote_control {
            o.remote_control = false;
        }
        if !self.control_allow.is_empty() {
            o.control_allow =
                celeriac_core::broadcast::control::ControlAllow::from_names(&self.control_allow)?;
        }
        celeriac_core::config::check_prefetch(o.concurrency, o.prefetch_buffer)
            .map_err(anyhow::Error::from)
    }
}

/// A node name as Celery expands `-n`: `%h` the host name, `%n` its first label, `%d` the
/// rest (the domain), `%i` the process index (always 0: one process), `%I` the same with a
/// dash (empty for the main process), `%%` a percent sign; a name without `@` is the host
/// part of `celeriac@<name>`.
fn node_name(spec: &str, host: &str) -> String {
    let (first, domain) = host.split_once('.').unwrap_or((host, ""));
    let mut out = String::with_capacity(spec.len() + host.len());
    let mut chars = spec.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('h') => out.push_str(host),
            Some('n') => out.push_str(first),
            Some('d') => out.push_str(domain),
            Some('i') => out.push('0'),
            Some('I') => {}
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    if out.contains('@') {
        out
    } else {
        format!("celeriac@{out}")
    }
}

/// `--autoscale MAX,MIN` (MIN defaults to 1, as Celery's).
fn autoscale(a: &str) -> anyhow::Result<(usize, usize)> {
    let bad = || anyhow::anyhow!("--autoscale must be MAX,MIN (e.g. 10,3), got {a:?}");
    let mut parts = a.split(',').map(str::trim);
    let max: usize = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let min: usize = match parts.next() {
        Some(s) => s.parse().map_err(|_| bad())?,
        None => 1,
    };
    if parts.next().is_some() || max == 0 || min > max {
        return Err(bad());
    }
    Ok((max, min.max(1)))
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a worker until SIGTERM/SIGINT (a second signal stops at once).
    Worker(WorkerArgs),
    /// Send a task by name.
    Call {
        /// The task name, e.g. tasks.add.
        name: String,
        /// Positional arguments as a JSON array.
        #[arg(long, short = 'a', default_value = "[]")]
        args: String,
        /// Keyword arguments as a JSON object.
        #[arg(long, short = 'k', default_value = "{}")]
        kwargs: String,
        /// Queue to send to.
        #[arg(long, short = 'Q')]
        queue: Option<String>,
        /// Seconds to wait before running.
        #[arg(long)]
        countdown: Option<f64>,
        /// Seconds after which the task is revoked instead of run.
        #[arg(long)]
        expires: Option<f64>,
        /// Run at this time (ISO-8601, e.g. 2026-12-24T18:00:00+01:00) instead of now.
        #[arg(long, conflicts_with = "countdown")]
        eta: Option<String>,
        /// Priority 0-9.
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=9))]
        priority: Option<u8>,
        /// Send this many copies (progress is shown while waiting).
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Wait for the result(s) and print them.
        #[arg(long, short = 'w')]
        wait: bool,
        /// Seconds to wait at most with --wait (0: for ever).
        #[arg(long, default_value_t = DEFAULT_WAIT_SECS)]
        timeout: f64,
    },
    /// Show a task's state and result.
    Result {
        /// The task id.
        id: String,
        /// Wait until it is ready.
        #[arg(long, short = 'w')]
        wait: bool,
        /// Seconds to wait at most.
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// Delete all ready and delayed messages of queues (asks first unless -f).
    Purge {
        /// Queues to purge, comma separated (default: the default queue).
        #[arg(short = 'Q', long, value_delimiter = ',')]
        queues: Vec<String>,
        /// Do not ask.
        #[arg(short = 'f', long)]
        force: bool,
    },
    /// Show the nodes that answer (as `celery status`) and the queue lengths.
    Status,
    /// Show queue lengths.
    Queues,
    /// Ask the workers (`celery inspect`): ping, stats, active, reserved, scheduled, revoked,
    /// registered, query_task, active_queues, conf, report, clock.
    Inspect(control::InspectArgs),
    /// Tell the workers (`celery control`): rate_limit, time_limit, revoke, terminate,
    /// shutdown, pool_grow, pool_shrink, autoscale, add_consumer, cancel_consumer,
    /// enable_events, disable_events, heartbeat.
    Control(control::ControlArgs),
    /// Watch the workers and their tasks live (`--dump`: every event as a line).
    Events(control::EventsArgs),
    /// List the tasks this binary can run.
    Tasks,
    /// Run the periodic-task scheduler, or list, add, remove, pause, resume, trigger entries.
    #[cfg(feature = "beat")]
    Beat(beat::BeatArgs),
    /// List, inspect, requeue or purge dead letters (`<queue>.dead`).
    Dead(dead::DeadArgs),
    /// Serve the dashboard, the JSON API, Celery's status view and /metrics.
    #[cfg(feature = "web")]
    Dashboard(web::DashboardArgs),
}

impl Command {
    /// Whether the command runs until stopped (and so waits for its broker at start).
    fn long_running(&self) -> bool {
        match self {
            Command::Worker(_) => true,
            #[cfg(feature = "beat")]
            Command::Beat(_) => true,
            #[cfg(feature = "web")]
            Command::Dashboard(_) => true,
            _ => false,
        }
    }
}

/// How long the runtime may wait for leftover blocking threads once the command is done.
const RUNTIME_SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// Parses the process arguments, builds the app and runs the command.
pub fn run(builder: AppBuilder) -> ExitCode {
    run_with(builder, std::env::args_os(), true, Vec::new())
}

pub use logging::BoxedLayer;

/// Like [`run`], adding `layer` to the subscriber the command line installs, beside its log
/// output: an OpenTelemetry exporter (`tracing_opentelemetry::layer().with_tracer(..)`), for
/// example. `-l` filters the log output only, not `layer`.
pub fn run_with_layer<L>(builder: AppBuilder, layer: L) -> ExitCode
where
    L: tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync + 'static,
{
    run_with(builder, std::env::args_os(), true, vec![Box::new(layer)])
}

/// Like [`run`], with explicit arguments (the first is the program name).
pub fn run_from<I, T>(builder: AppBuilder, args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    run_with(builder, args, false, Vec::new())
}

/// Runs the command line; `own_process` when it is the process's `main` (not a test calling
/// [`run_from`]), which may then set process-wide signal dispositions; `layers` are added to
/// the subscriber beside the log output.
fn run_with<I, T>(
    builder: AppBuilder,
    args: I,
    own_process: bool,
    mut layers: Vec<BoxedLayer>,
) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    if let Some(code) = pool_child::run_if_child(&builder, &mut layers) {
        return code;
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => return parse_error(e),
    };
    run_parsed(builder, cli, own_process, layers)
}

/// A command line for a binary that holds no task code, such as the standalone `celeriac`
/// (crate `celeriac-cli`): the same commands as [`run_from`] but `worker`, `beat` and `tasks`,
/// which are hidden from the help and refused with a hint, under the program name `name`.
pub fn run_without_tasks<I, T>(builder: AppBuilder, name: &'static str, args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::{CommandFactory as _, FromArgMatches as _};
    const NEEDS_TASKS: [&str; 3] = ["worker", "beat", "tasks"];
    let mut command = Cli::command().name(name).bin_name(name).about(
        "Watch and steer a Celery or celeriac cluster with no task code: dashboard, inspect, \
         control, events, call, result, queues, purge",
    );
    for sub in NEEDS_TASKS {
        if command.find_subcommand(sub).is_some() {
            command = command.mut_subcommand(sub, |c| c.hide(true));
        }
    }
    let cli = match command
        .try_get_matches_from(args)
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(c) => c,
        Err(e) => return parse_error(e),
    };
    let refused = match cli.command {
        Command::Worker(_) => Some("worker"),
        #[cfg(feature = "beat")]
        Command::Beat(_) => Some("beat"),
        Command::Tasks => Some("tasks"),
        _ => None,
    };
    if let Some(sub) = refused {
        let hint = if sub == "tasks" {
            format!("`{name} inspect registered` lists the tasks the running workers know")
        } else {
            format!("run `{sub}` from your app's own binary (celeriac::cli::run) or Celery's")
        };
        eprintln!(
            "error: `{name} {sub}` needs task code, which {name} does not hold\nhint: {hint}"
        );
        return ExitCode::from(64);
    }
    // A monitor of a cluster has no default broker of its own: without one named it would
    // open (and create) the embedded SQLite file in the working directory.
    if cli.broker.is_none() && celeriac_core::Config::load().is_ok_and(|c| c.broker_url.is_none()) {
        eprintln!(
            "error: {name} needs the cluster's broker\nhint: pass -b URL (e.g. -b \
             redis://127.0.0.1:6379/0), or set CELERIAC_BROKER_URL or broker_url in celeriac.toml"
        );
        return ExitCode::from(64);
    }
    run_parsed(builder, cli, true, Vec::new())
}

/// Prints a command-line parse error (or the help) and gives the exit code.
fn parse_error(e: clap::Error) -> ExitCode {
    let _ = e.print();
    if e.use_stderr() {
        ExitCode::from(64)
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs a parsed command line (see [`run_with`] for `own_process` and `layers`).
fn run_parsed(
    builder: AppBuilder,
    cli: Cli,
    own_process: bool,
    layers: Vec<BoxedLayer>,
) -> ExitCode {
    if own_process && !cli.command.long_running() {
        // A one-shot command whose output is cut short (`| head`) ends quietly, as Unix
        // tools do, instead of panicking on the broken pipe. Long-running commands keep
        // Rust's default (SIGPIPE ignored): a worker must never die of a closed pipe.
        sigpipe::reset();
    }
    if let Err(e) = logging::init(&cli.logging, layers) {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(builder, cli));
    // A blocking task abandoned at its hard limit (a thread cannot be killed) may still run
    // on tokio's blocking pool, which dropping the runtime would wait for, forever if it
    // spins. The worker has stopped by now (its soft and cold deadlines passed): give what
    // is left a moment, then leave it; the process exits when `main` returns.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_GRACE);
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            let task_failed = e.chain().any(|c| {
                c.downcast_ref::<crate::Error>()
                    .is_some_and(|e| e.kind() == ErrorKind::TaskFailed)
            });
            if task_failed {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// An error and its causes on one line, `a: b: c`, leaving out a cause whose text the line
/// already ends with (client libraries often wrap an error in one that says the same).
fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.is_empty() {
            line = text;
        } else if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

async fn dispatch(mut builder: AppBuilder, cli: Cli) -> anyhow::Result<ExitCode> {
    if let Some(b) = cli.broker {
        builder = builder.broker_url(b);
    }
    if let Some(b) = cli.result_backend {
        builder = builder.result_backend(b);
    }
    // A worker or beat waits for its broker to come up, as Celery's do; one-shot commands
    // fail at once.
    let long_running = cli.command.long_running();
    if let Command::Tasks = cli.command {
        // Listing the tasks opens nothing (no broker, no celeriac.db made as a side effect).
        for name in builder.task_registry().names() {
            println!("{name}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let app = builder
        .retry_on_startup(long_running)
        .build()
        .await
        .context("cannot start the app")?;
    let code = match cli.command {
        Command::Worker(args) => {
            let beat = args.beat;
            let pidfile = args.pidfile.clone();
            let mut o = app.worker_options();
            args.apply(&mut o)?;
            if o.pool == celeriac_worker::Pool::Processes && o.child_command.is_none() {
                // Pool children are this binary again: they log as the worker does.
                let program = std::env::current_exe().context("cannot find this program")?;
                o.child_command = Some(celeriac_worker::ChildCommand {
                    program,
                    args: cli.logging.to_args(),
                });
            }
            let _pidfile = pidfile.as_deref().map(Pidfile::acquire).transpose()?;
            eprint!("{}", banner(&app, &o));
            if app.registry().is_empty() {
                tracing::warn!("no task is registered: every message will fail as NotRegistered");
            }
            if beat {
                #[cfg(feature = "beat")]
                beat::with_worker(&app, o).await?;
                #[cfg(not(feature = "beat"))]
                bail!("-B needs the `beat` feature of celeriac");
            } else {
                app.worker(o).run_until_signal().await?;
            }
            ExitCode::SUCCESS
        }
        Command::Call {
            name,
            args,
            kwargs,
            queue,
            countdown,
            eta,
            expires,
            priority,
            repeat,
            wait,
            timeout,
        } => {
            let args: Vec<Value> =
                serde_json::from_str(&args).context("--args must be a JSON array")?;
            let kwargs: Map<String, Value> =
                serde_json::from_str(&kwargs).context("--kwargs must be a JSON object")?;
            let mut sig = Signature::<Value>::new(&name)
                .args_json(args)
                .kwargs_json(kwargs);
            if let Some(q) = queue {
                sig = sig.queue(q);
            }
            if let Some(c) = countdown {
                sig = sig.countdown(secs(c, "--countdown")?);
            }
            if let Some(t) = eta {
                let at = celeriac_core::time::parse(&t)
                    .with_context(|| format!("--eta must be an ISO-8601 time, got {t:?}"))?;
                sig = sig.eta(at);
            }
            if let Some(e) = expires {
                sig = sig.expires_in(secs(e, "--expires")?);
            }
            if let Some(p) = priority {
                sig = sig.priority(p);
            }
            let mut ids = Vec::with_capacity(repeat);
            for _ in 0..repeat.max(1) {
                ids.push(sig.clone().apply_async(&app).await?.id().to_owned());
            }
            if !wait {
                for id in &ids {
                    println!("{id}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            let timeout = Some(secs(timeout, "--timeout")?).filter(|t| !t.is_zero());
            match wait_all(&app, &ids, timeout).await {
                Err(e) if is_timeout(&e) => {
                    bail!(
                        "{e:#}\nhint: no result came back in time. Is a worker consuming the \
                         queue, and does it store results where this client reads them \
                         (result backend {})? Raise --timeout for long tasks, or --timeout 0 \
                         to wait for ever.",
                        celeriac_core::url::redact(app.config().result_backend_url())
                    )
                }
                other => other?,
            }
        }
        Command::Result { id, wait, timeout } => {
            let t = timeout.map(|t| secs(t, "--timeout")).transpose()?;
            if let Some(code) = canvas::group_result(&app, &id, wait, t).await? {
                app.close().await?;
                return Ok(code);
            }
            let r = app.result::<Value>(&id);
            let meta = if wait {
                let timeout = timeout.map(|t| secs(t, "--timeout")).transpose()?;
                r.wait_meta(timeout).await?
            } else {
                r.meta().await?
            };
            print_meta(&meta)?
        }
        Command::Purge { queues, force } => {
            let queues: Vec<String> = queues
                .iter()
                .map(|q| q.trim())
                .filter(|q| !q.is_empty())
                .map(str::to_owned)
                .collect();
            let queues = if queues.is_empty() {
                vec![app.config().default_queue.clone()]
            } else {
                queues
            };
            if !force && !confirm_purge(&queues)? {
                println!("nothing purged");
                return Ok(ExitCode::from(1));
            }
            for q in queues {
                let n = app.broker().purge(&q).await?;
                println!("purged {n} message(s) from {q}");
            }
            ExitCode::SUCCESS
        }
        Command::Status => {
            let nodes = control::status(&app).await?;
            println!();
            queue_table(&app).await?;
            // No node answering is Celery's `EX_UNAVAILABLE`, for scripts that check liveness.
            if nodes == Some(0) {
                ExitCode::from(69)
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Queues => {
            queue_table(&app).await?;
            ExitCode::SUCCESS
        }
        Command::Inspect(a) => control::inspect(&app, a).await?,
        Command::Control(a) => control::control_command(&app, a).await?,
        Command::Events(a) => control::events(&app, a).await?,
        #[cfg(feature = "beat")]
        Command::Beat(args) => beat::command(&app, args).await?,
        Command::Dead(args) => dead::command(&app, args).await?,
        #[cfg(feature = "web")]
        Command::Dashboard(args) => web::dashboard(&app, args).await?,
        Command::Tasks => unreachable!("answered before the app is built"),
    };
    app.close().await?;
    Ok(code)
}

/// Queue lengths: ready, delayed, unacked.
async fn queue_table(app: &App) -> anyhow::Result<()> {
    // The broker's own list, plus the queues the configuration names: a broker that cannot
    // list its queues (RabbitMQ without its management API) still shows those.
    let c = app.config();
    let mut queues: std::collections::BTreeSet<String> = app
        .broker()
        .queues()
        .await?
        .into_iter()
        .filter(|q| !celeriac_core::broadcast::is_internal_queue(q))
        .collect();
    queues.insert(c.default_queue.clone());
    queues.extend(c.worker.queues.iter().cloned());
    queues.extend(c.routes.values().cloned());
    queues.extend(c.celery_worker_queues.iter().cloned());
    println!(
        "{:<24} {:>10} {:>10} {:>10}",
        "queue", "ready", "delayed", "unacked"
    );
    for q in queues {
        match app.broker().stats(&q).await {
            Ok(s) => println!(
                "{q:<24} {:>10} {:>10} {:>10}",
                s.ready, s.delayed, s.unacked
            ),
            Err(e) => println!("{q:<24} {:>10} ({e:#})", "-"),
        }
    }
    Ok(())
}

/// Celery's start-up banner, in plain lines: the node, where messages and results live
/// (passwords hidden), the pool, the queues and the tasks.
fn banner(app: &App, o: &celeriac_worker::WorkerOptions) -> String {
    use std::fmt::Write as _;
    let c = app.config();
    let mut s = String::new();
    let _ = writeln!(s, "{} (celeriac {})", o.hostname, env!("CARGO_PKG_VERSION"));
    let _ = writeln!(
        s,
        "  broker:      {}",
        celeriac_core::url::redact(c.broker_url())
    );
    let _ = writeln!(
        s,
        "  results:     {}",
        celeriac_core::url::redact(c.result_backend_url())
    );
    let _ = writeln!(
        s,
        "  concurrency: {} ({} pool), prefetch {}",
        o.concurrency,
        o.pool,
        o.prefetch()
    );
    let _ = writeln!(
        s,
        "  task events: {}",
        if o.task_events {
            "on"
        } else {
            "off (-E to turn on)"
        }
    );
    let _ = writeln!(s, "  queues:      {}", o.queues.join(", "));
    let names = app.registry().names();
    let _ = writeln!(s, "  tasks ({}):", names.len());
    for name in names {
        let _ = writeln!(s, "    . {name}");
    }
    s
}

/// A pid file held while the worker runs: refused when a live process holds it, removed on
/// the way out when it still names this process.
#[derive(Debug)]
struct Pidfile {
    path: std::path::PathBuf,
}

impl Pidfile {
    fn acquire(path: &std::path::Path) -> anyhow::Result<Pidfile> {
        let me = std::process::id();
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(pid) = text.trim().parse::<u32>()
            && pid != me
            && process_alive(pid)
        {
            bail!(
                "pid file {} is held by process {pid}, which is running; stop it or remove \
                 the file",
                path.display()
            );
        }
        std::fs::write(path, format!("{me}\n"))
            .with_context(|| format!("cannot write pid file {}", path.display()))?;
        Ok(Pidfile {
            path: path.to_owned(),
        })
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(&self.path)
            .is_ok_and(|t| t.trim() == std::process::id().to_string());
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether process `pid` exists (and is not a zombie).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        // No /proc (not Linux): ask `kill -0`.
        Err(_) if !std::path::Path::new("/proc/self").exists() => {
            std::process::Command::new("kill")
                .args(["-0", &pid.to_string()])
                .status()
                .is_ok_and(|s| s.success())
        }
        Err(_) => false,
    }
}

/// `call --wait`'s default `--timeout`: long enough for most tasks, short enough that a
/// client reading another result backend than the worker's does not hang unseen.
const DEFAULT_WAIT_SECS: f64 = 300.0;

fn is_timeout(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<crate::Error>()
            .is_some_and(|e| e.kind() == ErrorKind::Timeout)
    })
}

/// Asks before a purge, as `celery purge` does; without a terminal to ask on, refuses.
fn confirm_purge(queues: &[String]) -> anyhow::Result<bool> {
    use std::io::{BufRead as _, IsTerminal as _};
    if !std::io::stdin().is_terminal() {
        bail!(
            "purge removes every waiting message of {} with no undo; pass -f to confirm when \
             not at a terminal",
            queues.join(", ")
        );
    }
    eprint!(
        "This removes every waiting message of {} and cannot be undone. Purge? [y/N] ",
        queues.join(", ")
    );
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

fn secs(s: f64, flag: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s)
        .with_context(|| format!("{flag} must be a non-negative number of seconds"))
}

/// Prints one record; the exit code says whether it failed.
fn print_meta(meta: &TaskMeta) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{} {}", meta.task_id, meta.status)?;
    if let Some(e) = meta.error() {
        writeln!(out, "{}", e.summary())?;
        if let Some(tb) = &e.traceback {
            writeln!(out, "{tb}")?;
        }
    } else if !meta.result.is_null() {
        writeln!(out, "{}", meta.result)?;
    }
    Ok(if meta.status.propagates() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// Waits for every id, with a progress line on stderr when there are several.
async fn wait_all(
    app: &App,
    ids: &[String],
    timeout: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    if let [id] = ids {
        let meta = app.result::<Value>(id).wait_meta(timeout).await?;
        return print_meta(&meta);
    }
    let started = Instant::now();
    let mut failed = 0usize;
    let mut progress = Progress::new(ids.len());
    for (i, id) in ids.iter().enumerate() {
        let left = timeout.map(|t| t.saturating_sub(started.elapsed()));
        let meta = app.result::<Value>(id).wait_meta(left).await?;
        if meta.status.propagates() {
            failed += 1;
        }
        progress.update(i + 1);
    }
    progress.finish();
    println!(
        "{} task(s) done, {failed} failed, in {:.2}s",
        ids.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(if failed > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// A one-line progress bar on stderr, redrawn at most every 100 ms.
#[derive(Debug)]
pub struct Progress {
    total: usize,
    started: Instant,
    last_draw: Option<Instant>,
}

impl Progress {
    /// A bar for `total` items.
    pub fn new(total: usize) -> Self {
        Progress {
            total,
            started: Instant::now(),
            last_draw: None,
        }
    }

    /// Shows `done` of the total.
    pub fn update(&mut self, done: usize) {
        let now = Instant::now();
        if done < self.total
            && self
                .last_draw
                .is_some_and(|t| now - t < Duration::from_millis(100))
        {
            return;
        }
        self.last_draw = Some(now);
        let width = 30;
        let filled = (done * width)
            .checked_div(self.total)
            .unwrap_or(width)
            .min(width);
        let rate = done as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        eprint!(
            "\r[{}{}] {done}/{} {rate:.0}/s",
            "#".repeat(filled),
            " ".repeat(width - filled),
            self.total
        );
        let _ = std::io::stderr().flush();
    }

    /// Ends the line.
    pub fn finish(&mut self) {
        eprintln!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use celeriac_worker::{Pool, WorkerOptions};

    #[test]
    fn flags_after_control_arguments_stay_flags() {
        let cli =
            Cli::try_parse_from(["app", "control", "revoke", "id-1", "-j", "--terminate"]).unwrap();
        let Command::Control(c) = cli.command else {
            unreachable!("parsed the control command")
        };
        let text = format!("{c:?}");
        assert!(text.contains(r#"args: ["id-1"]"#), "{text}");
        assert!(
            text.contains("json: true") && text.contains("terminate: true"),
            "{text}"
        );
        // A negative number is still an argument (`time_limit tasks.add -1`).
        let cli = Cli::try_parse_from(["app", "control", "time_limit", "tasks.add", "-1"]).unwrap();
        assert!(format!("{:?}", cli.command).contains(r#"["tasks.add", "-1"]"#));
    }

    #[test]
    fn celerys_optimization_profiles_are_accepted_and_others_refused() {
        for profile in ["fair", "default"] {
            assert!(worker(&["-O", profile]).is_ok(), "{profile}");
        }
        let e = worker(&["-O", "greedy"]).unwrap_err().to_string();
        assert!(e.contains("fair") && e.contains("default"), "{e}");
    }

    fn worker(args: &[&str]) -> anyhow::Result<WorkerOptions> {
        let cli = Cli::try_parse_from(["app", "worker"].iter().chain(args))?;
        let Command::Worker(w) = cli.command else {
            unreachable!("parsed the worker command")
        };
        let mut o = WorkerOptions::default();
        o.concurrency = 2;
        w.apply(&mut o)?;
        Ok(o)
    }

    #[test]
    fn worker_flags_reach_the_worker_options() {
        let o = worker(&[
            "-c",
            "3",
            "-P",
            "processes",
            "-Q",
            "a,b",
            "--max-tasks-per-child",
            "100",
            "--max-memory-per-child",
            "204800",
            "--soft-shutdown-timeout",
            "2.5",
            "--max-redeliveries",
            "4",
            "--prefetch-multiplier",
            "4",
        ])
        .unwrap();
        assert_eq!(o.concurrency, 3);
        assert_eq!(o.pool, Pool::Processes);
        assert_eq!(o.queues, ["a", "b"]);
        assert_eq!(o.max_tasks_per_child, Some(100));
        assert_eq!(o.max_memory_per_child, Some(204_800));
        assert_eq!(o.soft_shutdown_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(o.max_redeliveries, 4);
        assert_eq!(o.prefetch(), 12, "4 x concurrency, as Celery counts");

        let o = worker(&["--prefetch-buffer", "0"]).unwrap();
        assert_eq!(o.prefetch(), 2);
        let defaults = worker(&[]).unwrap();
        assert_eq!(defaults.soft_shutdown_timeout, None);
        assert_eq!(defaults.max_tasks_per_child, None);
        assert_eq!(defaults.max_redeliveries, 10);
    }

    #[test]
    fn node_names_expand_as_celerys() {
        let host = "box1.example.com";
        for (spec, want) in [
            ("ux1@%h", "ux1@box1.example.com"),
            ("w@%n.%d", "w@box1.example.com"),
            ("w%i%I@%n", "w0@box1"),
            ("plain", "celeriac@plain"),
            ("%h", "celeriac@box1.example.com"),
            ("a@100%%", "a@100%"),
            ("a@%x", "a@%x"),
        ] {
            assert_eq!(node_name(spec, host), want, "{spec}");
        }
        assert_eq!(node_name("w@%n", "solo"), "w@solo");
        assert_eq!(node_name("w@%d", "solo"), "w@");
    }

    #[test]
    fn bad_worker_flags_are_refused_by_name() {
        for (args, needle) in [
            (&["-c", "0"][..], "--concurrency must be at least 1"),
            (&["--max-tasks-per-child", "0"], "--max-tasks-per-child"),
            (&["--max-memory-per-child", "0"], "--max-memory-per-child"),
            (&["--soft-shutdown-timeout=-1"], "--soft-shutdown-timeout"),
            (
                &["--soft-shutdown-timeout", "nan"],
                "--soft-shutdown-timeout",
            ),
            (&["--prefetch-multiplier", "0"], "--prefetch-multiplier"),
            (&["--max-redeliveries", "x"], "--max-redeliveries"),
            (
                &["--prefetch-buffer", "1", "--prefetch-multiplier", "2"],
                "cannot be used with",
            ),
            (&["-P", "forks"], "unknown pool"),
            (
                &["--control-allow", "inspect,shutdwon"],
                "unknown remote-control command",
            ),
            (
                &["-c", "2", "--prefetch-buffer", "1000000"],
                "prefetch 1000002 (concurrency 2 + prefetch_buffer 1000000) is more than 65535",
            ),
        ] {
            let e = format!("{:#}", worker(args).unwrap_err());
            assert!(e.contains(needle), "{args:?}: {e}");
        }
    }

    #[test]
    fn an_error_line_says_each_cause_once() {
        // A driver error whose source repeats it (as the Redis client's NOAUTH does).
        #[derive(Debug)]
        struct Echo(std::io::Error);
        impl std::fmt::Display for Echo {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
        impl std::error::Error for Echo {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let driver = Echo(std::io::Error::other("NOAUTH Authentication required."));
        let e =
            anyhow::Error::new(crate::Error::broker("cannot connect to redis").with_source(driver))
                .context("cannot start the app");
        assert_eq!(
            error_line(&e),
            "cannot start the app: cannot connect to redis: NOAUTH Authentication required."
        );
    }
}
