//! Worker processes: start, stop (the whole process group), and their resident memory read
//! from `/proc`.

use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// A child process in its own process group, stopped (group and all) when dropped.
#[derive(Debug)]
pub(crate) struct Proc {
    child: Child,
}

impl Proc {
    pub(crate) fn spawn(mut cmd: Command) -> anyhow::Result<Proc> {
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let child = cmd.spawn()?;
        Ok(Proc { child })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process still runs.
    pub(crate) fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        // A Celery prefork worker leaves its children behind when only the parent dies.
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    out
}

fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// `of` summed over `pid` and all its live descendants.
fn tree_sum<T: std::iter::Sum<T>>(pid: u32, of: &dyn Fn(u32) -> T) -> T {
    std::iter::once(of(pid))
        .chain(children(pid).into_iter().map(|c| tree_sum(c, of)))
        .sum()
}

/// Resident memory of `pid` and all its descendants, in KiB.
pub(crate) fn tree_rss_kb(pid: u32) -> u64 {
    tree_sum(pid, &|p| status_kb(p, "VmRSS:"))
}

/// How often [`Sampler`] reads `/proc`. Each reading opens a file per thread of each sampled
/// process (to find child processes); at every 10 ms this took a third of the client's CPU in
/// a profile, which the CPU-per-task figures then charged to the client.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Samples the resident memory of process trees every [`SAMPLE_EVERY`] and keeps the peak of
/// their sum.
#[derive(Debug)]
pub(crate) struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    pub(crate) fn start(pids: Vec<u32>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                let now: u64 = pids.iter().map(|&pid| tree_rss_kb(pid)).sum();
                p.fetch_max(now, Ordering::Relaxed);
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
        });
        Sampler { stop, peak, task }
    }

    /// Stops sampling; returns the peak in MiB.
    pub(crate) async fn finish(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.peak.load(Ordering::Relaxed) as f64 / 1024.0
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` times (`sysconf(_SC_CLK_TCK)`; 100 on every
/// Linux this runs on).
const TICKS_PER_SEC: f64 = 100.0;

/// Fields 14.. of `/proc/<pid>/stat` (utime, stime, cutime, cstime, ...), in ticks; empty when
/// the process is gone.
fn stat_times(pid: &str) -> Vec<u64> {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Vec::new();
    };
    // The command name (field 2) may hold spaces: the fields after it follow the last ')'.
    let Some(rest) = s.rfind(')').map(|i| &s[i + 1..]) else {
        return Vec::new();
    };
    rest.split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|v| v.parse().ok())
        .collect()
}

/// CPU seconds (user + system) used so far by `pid` and all its live descendants.
pub(crate) fn tree_cpu_secs(pid: u32) -> f64 {
    tree_sum(pid, &|p| {
        stat_times(&p.to_string()).iter().take(2).sum::<u64>() as f64 / TICKS_PER_SEC
    })
}

/// CPU seconds used so far by this process (`self`) and by its children it has waited for
/// (the Python client runs as such a child).
fn own_cpu_secs() -> (f64, f64) {
    let t = stat_times("self");
    let secs = |a: usize, b: usize| {
        (t.get(a).copied().unwrap_or(0) + t.get(b).copied().unwrap_or(0)) as f64 / TICKS_PER_SEC
    };
    (secs(0, 1), secs(2, 3))
}

/// The pid of the broker server process on this machine: a process whose command name is
/// `comm` (`redis-server`; RabbitMQ's Erlang VM is `beam.smp`), preferring one whose command
/// line names `listen` (redis-server shows `127.0.0.1:6379` there), so that another server of
/// the same kind on the machine (a test's private Redis) is not measured instead.
pub(crate) fn server_pid(comm: &str, listen: Option<&str>) -> Option<u32> {
    let mut first = None;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(name) = std::fs::read_to_string(e.path().join("comm")) else {
            continue;
        };
        if name.trim_end() != comm {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if listen.is_some_and(|l| String::from_utf8_lossy(&cmdline).contains(l)) {
            return Some(pid);
        }
        first.get_or_insert(pid);
    }
    first
}

/// Where the CPU time of a phase went: the client (this process, or its Python child), the
/// worker process trees and the broker server.
#[derive(Debug)]
pub(crate) struct CpuMeter {
    workers: Vec<u32>,
    server: Option<u32>,
    start: [f64; 4],
}

/// CPU seconds of one phase, split by process.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuSplit {
    /// This process (our client).
    pub(crate) client: f64,
    /// Children this process reaped during the phase (a Python client).
    pub(crate) child_client: f64,
    pub(crate) workers: f64,
    pub(crate) server: Option<f64>,
}

impl CpuMeter {
    pub(crate) fn start(workers: Vec<u32>, server: Option<u32>) -> CpuMeter {
        let mut m = CpuMeter {
            workers,
            server,
            start: [0.0; 4],
        };
        m.start = m.now();
        m
    }

    fn now(&self) -> [f64; 4] {
        let (own, reaped) = own_cpu_secs();
        [
            own,
            reaped,
            self.workers.iter().map(|&p| tree_cpu_secs(p)).sum(),
            self.server.map_or(0.0, server_cpu_secs),
        ]
    }

    pub(crate) fn finish(self) -> CpuSplit {
        let end = self.now();
        let d = |i: usize| (end[i] - self.start[i]).max(0.0);
        CpuSplit {
            client: d(0),
            child_client: d(1),
            workers: d(2),
            server: self.server.map(|_| d(3)),
        }
    }
}

/// CPU seconds of a server: its process tree, plus the children it has reaped (PostgreSQL
/// runs one process per connection; their time moves to the postmaster's when they exit).
fn server_cpu_secs(pid: u32) -> f64 {
    let reaped = stat_times(&pid.to_string())
        .iter()
        .skip(2)
        .take(2)
        .sum::<u64>() as f64
        / TICKS_PER_SEC;
    tree_cpu_secs(pid) + reaped
}

/// The PostgreSQL postmaster: the `postgres` process whose parent is not one.
fn postmaster() -> Option<u32> {
    let parent_of = |pid: &str| -> Option<String> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        s.rfind(')')
            .and_then(|i| s[i + 1..].split_whitespace().nth(1).map(str::to_owned))
    };
    let comm = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/comm")).ok();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if pid.parse::<u32>().is_err()
            || comm(&pid).as_deref().map(str::trim_end) != Some("postgres")
        {
            continue;
        }
        let parent = parent_of(&pid).unwrap_or_default();
        if comm(&parent).as_deref().map(str::trim_end) != Some("postgres") {
            return pid.parse().ok();
        }
    }
    None
}

/// The broker server process of a benchmark broker (`sqlite` has none: it runs inside the
/// client and the workers).
pub(crate) fn server_of(broker: &str) -> Option<u32> {
    match broker {
        "redis" | "redis-native" => server_pid("redis-server", Some(":6379")),
        "amqp" => server_pid("beam.smp", None),
        "postgres" | "postgres-async" | "sqla" => postmaster(),
        "mysql" => server_pid("mariadbd", None).or_else(|| server_pid("mysqld", None)),
        _ => None,
    }
}
