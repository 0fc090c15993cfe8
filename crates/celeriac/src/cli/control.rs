//! `inspect`, `control`, `status` and `events`: Celery's remote-control and monitoring
//! commands, for our workers and Python ones alike.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use celeriac_core::broadcast::control::{CONTROL_COMMANDS, INSPECT_COMMANDS};
use celeriac_core::broadcast::event::{Event, EventKind, now_unix};
use serde_json::{Map, Value, json};

use crate::App;
use crate::control::Replies;

/// Options every remote-control command takes.
#[derive(clap::Args, Debug, Clone)]
pub(super) struct RemoteArgs {
    /// Comma separated node names that should act (default: every node).
    #[arg(short = 'd', long, value_delimiter = ',')]
    destination: Vec<String>,
    /// Seconds to wait for replies.
    #[arg(short = 't', long, default_value_t = 1.0)]
    timeout: f64,
    /// Print the replies as one JSON object (node → answer).
    #[arg(short = 'j', long)]
    json: bool,
}

/// `inspect <command> [args]`.
#[derive(clap::Args, Debug)]
pub(super) struct InspectArgs {
    /// ping, stats, active, reserved, scheduled, revoked, registered, query_task,
    /// active_queues, conf, report, clock.
    command: String,
    /// The command's arguments (query_task: task ids; registered: attributes).
    args: Vec<String>,
    /// `active`: arguments as repr strings, as Flower asks.
    #[arg(long)]
    safe: bool,
    #[command(flatten)]
    remote: RemoteArgs,
}

/// `control <command> [args]`.
#[derive(clap::Args, Debug)]
pub(super) struct ControlArgs {
    /// rate_limit, time_limit, revoke, terminate, shutdown, pool_grow, pool_shrink,
    /// autoscale, add_consumer, cancel_consumer, enable_events, disable_events, heartbeat.
    command: String,
    /// The command's arguments, as `celery control` takes them (e.g. `rate_limit tasks.add
    /// 10/m`, `revoke ID...`, `terminate SIGKILL ID...`, `autoscale 8 2`).
    #[arg(allow_negative_numbers = true)]
    args: Vec<String>,
    /// `revoke`: also stop running copies.
    #[arg(long)]
    terminate: bool,
    /// `revoke --terminate`: the signal (default SIGTERM).
    #[arg(long, short = 's')]
    signal: Option<String>,
    #[command(flatten)]
    remote: RemoteArgs,
}

/// `events`.
#[derive(clap::Args, Debug)]
pub(super) struct EventsArgs {
    /// Print every event as a line instead of the live view.
    #[arg(long)]
    dump: bool,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long)]
    duration: Option<f64>,
}

/// Commands of the worker's lists that the CLI does not offer: `hello` (mingle, between
/// workers), `pool_restart` (always refused: no pool reloads code) and
/// `revoke_by_stamped_headers` (no stamping here).
const NOT_OFFERED: &[&str] = &["hello", "pool_restart", "revoke_by_stamped_headers"];

/// The commands of `all` the CLI offers.
fn offered(all: &'static [&'static str]) -> Vec<&'static str> {
    all.iter()
        .copied()
        .filter(|c| !NOT_OFFERED.contains(c))
        .collect()
}

fn control<'a>(app: &'a App, r: &RemoteArgs) -> anyhow::Result<crate::Control<'a>> {
    let timeout = Duration::try_from_secs_f64(r.timeout)
        .context("--timeout must be a non-negative number of seconds")?;
    Ok(app
        .control()
        .timeout(timeout)
        .destination(r.destination.clone()))
}

pub(super) async fn inspect(app: &App, a: InspectArgs) -> anyhow::Result<ExitCode> {
    let known = offered(INSPECT_COMMANDS);
    if !known.contains(&a.command.as_str()) {
        bail!(
            "unknown inspect command {:?} (known: {})",
            a.command,
            known.join(", ")
        );
    }
    let mut arguments = Map::new();
    match a.command.as_str() {
        "query_task" => {
            arguments.insert("ids".into(), json!(a.args));
        }
        "registered" if !a.args.is_empty() => {
            arguments.insert("taskinfoitems".into(), json!(a.args));
        }
        "active" => {
            arguments.insert("safe".into(), a.safe.into());
        }
        _ => {}
    }
    let c = control(app, &a.remote)?;
    let replies = c.call(&a.command, arguments).await?;
    say(&replies, a.remote.json, &a.remote.destination)
}

pub(super) async fn control_command(app: &App, a: ControlArgs) -> anyhow::Result<ExitCode> {
    let cmd = a.command.as_str();
    let known = offered(CONTROL_COMMANDS);
    if !known.contains(&cmd) {
        bail!(
            "unknown control command {cmd:?} (known: {})",
            known.join(", ")
        );
    }
    let c = control(app, &a.remote)?;
    let args = &a.args;
    let need = |n: usize, usage: &str| -> anyhow::Result<()> {
        if args.len() < n {
            bail!("usage: control {cmd} {usage}");
        }
        Ok(())
    };
    let num = |i: usize, what: &str| -> anyhow::Result<Option<f64>> {
        args.get(i)
            .map(|s| {
                s.parse::<f64>()
                    .with_context(|| format!("{what} must be a number, got {s:?}"))
            })
            .transpose()
    };
    let mut arguments = Map::new();
    let mut put = |k: &str, v: Value| {
        arguments.insert(k.to_owned(), v);
    };
    match cmd {
        "rate_limit" => {
            need(2, "<task_name> <rate_limit (e.g. 5/s | 5/m | 5/h)>")?;
            put("task_name", args[0].clone().into());
            put("rate_limit", args[1].clone().into());
        }
        "time_limit" => {
            need(2, "<task_name> <soft_secs> [hard_secs]")?;
            put("task_name", args[0].clone().into());
            put("soft", num(1, "soft_secs")?.into());
            put("hard", num(2, "hard_secs")?.into());
        }
        "revoke" => {
            need(1, "<task_id>... [--terminate] [--signal SIGNAL]")?;
            put("task_id", json!(args));
            put("terminate", a.terminate.into());
            if let Some(s) = &a.signal {
                put("signal", checked_signal(s)?.into());
            }
        }
        "terminate" => {
            need(2, "<signal> <task_id>...")?;
            put("signal", checked_signal(&args[0])?.into());
            put("task_id", json!(args[1..]));
        }
        "pool_grow" | "pool_shrink" => {
            if let Some(n) = num(0, "n")? {
                put("n", (n.max(0.0) as u64).into());
            }
        }
        "autoscale" => {
            if let Some(max) = num(0, "max")? {
                put("max", (max.max(0.0) as u64).into());
            }
            if let Some(min) = num(1, "min")? {
                put("min", (min.max(0.0) as u64).into());
            }
        }
        "add_consumer" | "cancel_consumer" => {
            need(1, "<queue>")?;
            put("queue", args[0].clone().into());
        }
        _ => {}
    }
    if matches!(cmd, "shutdown" | "heartbeat") {
        c.cast(cmd, arguments).await?;
        println!("{cmd} sent");
        return Ok(ExitCode::SUCCESS);
    }
    let replies = c.call(cmd, arguments).await?;
    say(&replies, a.remote.json, &a.remote.destination)
}

fn checked_signal(s: &str) -> anyhow::Result<&'static str> {
    Ok(s.parse::<crate::Signal>()?.name())
}

/// `status`: the nodes that answer `ping`, as Celery's `celery status` prints them.
pub(super) async fn status(app: &App) -> anyhow::Result<Option<usize>> {
    if app.broker().broadcast().is_none() {
        println!(
            "(the {} broker carries no remote control: nodes cannot be listed)",
            app.broker().driver()
        );
        return Ok(None);
    }
    let replies = app.control().inspect().ping().await?;
    for node in replies.keys() {
        println!("->  {node}: OK");
    }
    let n = replies.len();
    if n == 0 {
        eprintln!("Error: No nodes replied within time constraint");
    } else {
        println!("\n{n} {} online.", if n == 1 { "node" } else { "nodes" });
    }
    Ok(Some(n))
}

/// Prints replies as Celery's CLI does (`->  node: OK` and the answer indented), or as JSON.
/// No reply at all is an error (exit 69, as Celery's `EX_UNAVAILABLE`).
fn say(replies: &Replies, json: bool, destination: &[String]) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string(replies)?);
    } else {
        for (node, answer) in replies {
            let (status, body) = pretty(answer);
            println!("->  {node}: {status}");
            for line in body.lines() {
                println!("        {line}");
            }
        }
    }
    if replies.is_empty() {
        eprintln!("Error: No nodes replied within time constraint");
        return Ok(ExitCode::from(69));
    }
    if !json {
        let n = replies.len();
        println!("\n{n} {} online.", if n == 1 { "node" } else { "nodes" });
    }
    let missing: Vec<&String> = destination
        .iter()
        .filter(|d| !replies.contains_key(*d))
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "warning: no reply from {}",
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn pretty(answer: &Value) -> (&'static str, String) {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => serde_json::to_string_pretty(other).unwrap_or_default(),
    };
    match answer {
        Value::Object(m) if m.len() == 1 && m.contains_key("ok") => ("OK", text(&m["ok"])),
        Value::Object(m) if m.len() == 1 && m.contains_key("error") => ("ERROR", text(&m["error"])),
        Value::Array(items) if items.is_empty() => ("OK", "- empty -".to_owned()),
        Value::Array(items) => (
            "OK",
            items
                .iter()
                .map(|i| format!("* {}", text(i)))
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        other => ("OK", text(other)),
    }
}

/// What `events` knows of one worker.
#[derive(Debug, Default)]
struct Worker {
    last_seen: f64,
    freq: f64,
    active: u64,
    processed: u64,
    loadavg: String,
    offline: bool,
    sw: String,
}

pub(super) async fn events(app: &App, a: EventsArgs) -> anyhow::Result<ExitCode> {
    let mut stream = app.events().await?;
    // Monitors wake workers up so that they show at once (as `celery events` does).
    if let Err(e) = app.control().heartbeat().await {
        tracing::warn!(error = %e, "cannot ask the workers for a heartbeat");
    }
    let until = a
        .duration
        .map(Duration::try_from_secs_f64)
        .transpose()
        .context("--duration must be a non-negative number of seconds")?
        .map(|d| tokio::time::Instant::now() + d);
    let live = !a.dump && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut workers: BTreeMap<String, Worker> = BTreeMap::new();
    let mut states: BTreeMap<String, u64> = BTreeMap::new();
    let mut recent: std::collections::VecDeque<Instant> = std::collections::VecDeque::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let stop = async {
            match until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick(), if !a.dump => {
                view(&workers, &states, &mut recent, live);
            }
            e = stream.next() => match e {
                None => break,
                Some(Err(e)) => tracing::warn!(error = %e, "skipping a malformed event"),
                Some(Ok(e)) => {
                    if a.dump {
                        dump(&e);
                    } else {
                        note(&e, &mut workers, &mut states, &mut recent);
                    }
                }
            },
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One line per event: `hostname [time] type: field=value, ...`, as `celery events --dump`.
fn dump(e: &Event) {
    let fields: Vec<String> = e
        .fields()
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "type" | "hostname" | "timestamp"))
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect();
    let at = chrono::DateTime::from_timestamp_micros((e.timestamp() * 1e6) as i64)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.6f").to_string())
        .unwrap_or_default();
    println!(
        "{} [{at}] {}: {}",
        e.hostname(),
        e.kind(),
        fields.join(", ")
    );
    let _ = std::io::stdout().flush();
}

fn note(
    e: &Event,
    workers: &mut BTreeMap<String, Worker>,
    states: &mut BTreeMap<String, u64>,
    recent: &mut std::collections::VecDeque<Instant>,
) {
    let kind = e.kind();
    if kind.is_task() {
        *states
            .entry(kind.as_str().trim_start_matches("task-").to_owned())
            .or_default() += 1;
        if kind == EventKind::TaskSucceeded || kind == EventKind::TaskFailed {
            recent.push_back(Instant::now());
        }
        return;
    }
    let w = workers.entry(e.hostname().to_owned()).or_default();
    w.last_seen = now_unix();
    let num = |k: &str| e.get(k).and_then(Value::as_u64).unwrap_or_default();
    w.freq = e.get("freq").and_then(Value::as_f64).unwrap_or(2.0);
    w.active = num("active");
    w.processed = num("processed");
    w.loadavg = e.get("loadavg").map(|l| l.to_string()).unwrap_or_default();
    w.sw = format!(
        "{} {}",
        e.get("sw_ident").and_then(Value::as_str).unwrap_or("?"),
        e.get("sw_ver").and_then(Value::as_str).unwrap_or("")
    );
    w.offline = kind == EventKind::WorkerOffline;
}

fn view(
    workers: &BTreeMap<String, Worker>,
    states: &BTreeMap<String, u64>,
    recent: &mut std::collections::VecDeque<Instant>,
    live: bool,
) {
    while recent
        .front()
        .is_some_and(|t| t.elapsed() > Duration::from_secs(10))
    {
        recent.pop_front();
    }
    let rate = recent.len() as f64 / 10.0;
    let mut out = String::new();
    if live {
        out.push_str("\x1b[2J\x1b[H");
    }
    out.push_str(&format!(
        "{:<32} {:<8} {:>7} {:>10} {:<22} {}\n",
        "worker", "status", "active", "processed", "load", "software"
    ));
    let now = now_unix();
    for (name, w) in workers {
        let alive = !w.offline && now < w.last_seen + w.freq * 2.0;
        out.push_str(&format!(
            "{name:<32} {:<8} {:>7} {:>10} {:<22} {}\n",
            if alive { "online" } else { "offline" },
            w.active,
            w.processed,
            w.loadavg,
            w.sw
        ));
    }
    let counts: Vec<String> = states.iter().map(|(k, v)| format!("{k}={v}")).collect();
    out.push_str(&format!(
        "\ntasks: {}  ({rate:.1} finished/s over 10 s)\n",
        if counts.is_empty() {
            "none yet".to_owned()
        } else {
            counts.join(" ")
        }
    ));
    print!("{out}");
    let _ = std::io::stdout().flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_print_as_celerys_cli_prints_them() {
        assert_eq!(pretty(&json!({"ok": "pong"})), ("OK", "pong".to_owned()));
        assert_eq!(
            pretty(&json!({"error": "unknown task"})),
            ("ERROR", "unknown task".to_owned())
        );
        assert_eq!(pretty(&json!([])), ("OK", "- empty -".to_owned()));
        assert_eq!(pretty(&json!(["a", "b"])).1, "* a\n* b");
        assert!(
            pretty(&json!({"total": {}, "pid": 3}))
                .1
                .contains("\"pid\": 3")
        );
    }
}
