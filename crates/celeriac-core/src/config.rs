//! Configuration: defaults, then `celeriac.toml`, then `CELERIAC_*` environment variables.
//!
//! This is the only module that reads the environment (clippy.toml bans `std::env::var`
//! elsewhere).
#![allow(clippy::disallowed_methods)]
//!
//! ```toml
//! broker_url = "sqlite://celeriac.db"
//! result_backend = "sqlite://celeriac.db"
//! default_queue = "celery"
//! result_expires = 86400          # seconds; 0 keeps results forever
//! visibility_timeout = 3600       # seconds a delivery stays leased
//! max_message_size = 16777216     # bytes of a task's body; 0 = no limit
//! broker_connection_retry_on_startup = true  # a worker waits for its broker to come up
//! broker_connection_max_retries = 100        # then gives up; 0 = never
//!
//! celery_worker_queues = ["celery"]   # also served by Python Celery workers
//! celeriac_only_queues = ["internal.*"] # no Python worker: delays parked in the broker at once
//!
//! [routes]
//! "tasks.send_*" = "email"        # task-name glob -> queue
//!
//! [worker]
//! concurrency = 8
//! pool = "async"                  # async | threads | processes
//! queues = ["celery", "email"]
//! prefetch_buffer = 4
//! max_tasks_per_child = 1000       # processes pool: recycle a child after this many tasks
//! max_memory_per_child = 512000    # processes pool: KiB of resident memory, then recycle
//! max_redeliveries = 10            # a message delivered more often goes to `<queue>.dead`
//! soft_shutdown_timeout = 30       # seconds running tasks get after a stop signal; 0 = wait
//! inline_brief = true              # async pool: run blocking tasks proved brief inline
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::error::{Error, Result};
use crate::ratelimit::RateLimit;
use crate::task::{RateLimitScope, Registry, TaskOptions};

/// The file read by [`Config::load`] when present in the working directory.
pub const DEFAULT_FILE: &str = "celeriac.toml";

/// The URL used when none is configured: a SQLite file in the working directory.
pub const DEFAULT_URL: &str = "sqlite://celeriac.db";

/// The default [`Config::max_message_size`]: 16 MiB, RabbitMQ's own default limit.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 << 20;

/// The most deliveries a worker may hold unacknowledged (`concurrency + prefetch_buffer`):
/// 65,535, the largest prefetch count AMQP can express, on every broker alike.
pub const MAX_PREFETCH: usize = u16::MAX as usize;

/// Application configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// Broker URL (`sqlite://path`, `memory://`, ...). Default: [`DEFAULT_URL`].
    pub broker_url: Option<String>,
    /// The order in which a broker given several URLs separated by `;` tries them, at start-up
    /// and after a lost connection (Celery's `broker_failover_strategy`): `round-robin`
    /// (default) or `shuffle`; any other name fails the load.
    pub broker_failover_strategy: FailoverStrategy,
    /// Options of the broker's transport (Celery's `broker_transport_options`): for a Redis
    /// Sentinel URL (`sentinel://…`), the monitored master's `master_name` and the Sentinels'
    /// own credentials (`sentinel_kwargs`). Default: none set.
    pub broker_transport_options: TransportOptions,
    /// Result backend URL. Default: the broker URL, or `rpc://` (replies over the broker)
    /// when the broker is RabbitMQ, which stores no results itself.
    pub result_backend: Option<String>,
    /// Options of the result backend's transport (Celery's
    /// `result_backend_transport_options`), as [`Config::broker_transport_options`]; see
    /// [`Config::backend_transport_options`] for when the broker's apply instead.
    pub result_backend_transport_options: TransportOptions,
    /// Queue for tasks with no queue option and no route. Default `celery`.
    pub default_queue: String,
    /// How long results are kept; `None` keeps them. Default one day.
    #[serde(deserialize_with = "opt_secs")]
    pub result_expires: Option<Duration>,
    /// How long a delivery stays leased before it is handed out again. Default one hour.
    #[serde(deserialize_with = "secs")]
    pub visibility_timeout: Duration,
    /// The largest task body, in bytes as serialized (arguments and canvas data), that the
    /// client sends and the worker runs: the client refuses a larger one, and the worker
    /// fails it (`LimitExceeded`) and moves it to the dead letters without decoding its
    /// arguments. `0` in the file: no limit. Default [`DEFAULT_MAX_MESSAGE_SIZE`].
    #[serde(deserialize_with = "opt_size")]
    pub max_message_size: Option<usize>,
    /// A worker (or beat) whose broker or result backend cannot be reached when it starts
    /// keeps trying, as Celery's `broker_connection_retry_on_startup`: after 2 s, then 4 s,
    /// 6 s, ... at most 30 s apart, logging the cause of each failed attempt. Clients (`call`,
    /// an app built in a program) fail at once. Default true.
    pub broker_connection_retry_on_startup: bool,
    /// How many times a starting worker tries again before it gives up (Celery's
    /// `broker_connection_max_retries`); `0`: it never gives up. Default 100.
    pub broker_connection_max_retries: u32,
    /// Body serializer: `json` (default), `msgpack`, or `auth` (JSON bodies signed with an
    /// X.509 key, Celery's `auth` serializer: needs the `security` feature and the
    /// `security_*` settings; see docs/SECURITY.md); any other name fails the load.
    pub serializer: crate::protocol::ContentType,
    /// With `serializer = "auth"`: PEM file of this app's RSA private key (Celery's
    /// `security_key`).
    pub security_key: Option<String>,
    /// The passphrase of an encrypted `security_key` (Celery's `security_key_password`).
    /// Never printed.
    pub security_key_password: Option<Password>,
    /// With `serializer = "auth"`: PEM file of the certificate of `security_key` (Celery's
    /// `security_certificate`).
    pub security_certificate: Option<String>,
    /// With `serializer = "auth"`: the trusted certificates, a directory of PEM files or a
    /// pattern such as `/etc/celery/certs/*.pem` (Celery's `security_cert_store`).
    pub security_cert_store: Option<String>,
    /// With `serializer = "auth"`: the digest signatures use, `sha256` (default), `sha384`,
    /// `sha512` or `sha224` (Celery's `security_digest`).
    pub security_digest: String,
    /// Store STARTED when a task begins (per-task option wins when set). Default false.
    pub track_started: bool,
    /// Task-name glob → queue.
    pub routes: BTreeMap<String, String>,
    /// Queues that Python Celery workers also consume. Python workers know no broker-side
    /// delayed store, so countdown/eta tasks sent to these queues are published at once with
    /// the `eta` header (as Celery does) instead of being held by the broker until due.
    pub celery_worker_queues: Vec<String>,
    /// Queues (globs) that no Python worker serves, on a broker Python can share (Redis,
    /// RabbitMQ): a delayed task sent to them is parked in the broker's delayed store at once.
    /// Every other queue of such a broker gets delayed tasks published at once with their
    /// `eta` header, as Celery's client sends them (a celeriac worker parks such a message in
    /// the broker when it receives it, so the delay is still kept by the broker).
    pub celeriac_only_queues: Vec<String>,
    /// Send a `task-sent` event for every task this app sends (Celery's
    /// `task_send_sent_event`), for monitors. Default false.
    pub task_send_sent_event: bool,
    /// Per-task settings by task name or glob (Celery's `task_annotations`), over the tasks'
    /// own options: see [`TaskAnnotation`] and [`Config::annotate`].
    pub task_annotations: BTreeMap<String, TaskAnnotation>,
    /// Worker settings.
    pub worker: WorkerConfig,
    /// The `[beat]` table, read by the beat scheduler (`celeriac::beat`).
    pub beat: Option<toml::Table>,
}

/// A secret read from the configuration: its `Debug` form is `"***"`, so printing a
/// [`Config`] never shows it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Password(String);

impl Password {
    /// Wraps `secret`.
    pub fn new(secret: impl Into<String>) -> Self {
        Password(secret.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// Worker settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct WorkerConfig {
    /// Tasks run at once. Default: the number of CPUs.
    pub concurrency: usize,
    /// Where blocking task bodies run: `async` (default), `threads` or `processes` (also
    /// spelled `prefork`); any other name fails the load.
    pub pool: Pool,
    /// Queues to consume. Default: the default queue.
    pub queues: Vec<String>,
    /// Deliveries held beyond what can run at once. Default 4; `concurrency + prefetch_buffer`
    /// may not exceed [`MAX_PREFETCH`].
    pub prefetch_buffer: usize,
    /// Node name; default `celeriac@<host>`.
    pub hostname: Option<String>,
    /// Processes pool: a child is replaced after running this many tasks. Default: never.
    pub max_tasks_per_child: Option<u32>,
    /// Processes pool: a child whose resident memory exceeds this many KiB after a task is
    /// replaced. Default: no limit.
    pub max_memory_per_child: Option<u64>,
    /// A message delivered more than this many times before (crashes, lost leases) is moved to
    /// its queue's dead-letter queue instead of run. Default 10.
    pub max_redeliveries: u32,
    /// Seconds running tasks get to finish after a stop signal before the shutdown turns cold
    /// (acks-late tasks handed back). `0` or absent: wait for them (a warm shutdown).
    #[serde(deserialize_with = "opt_secs")]
    pub soft_shutdown_timeout: Option<Duration>,
    /// Async pool: blocking tasks whose recent runs were all brief (under 50 µs) run inline on
    /// the runtime instead of being handed to a thread. Default `true`.
    pub inline_brief: bool,
    /// Send task events (Celery's `worker_send_task_events`, the worker's `-E`). Default false.
    pub task_events: bool,
    /// Seconds between worker heartbeat events (Celery's `--heartbeat-interval`). Default 2.
    #[serde(deserialize_with = "secs")]
    pub heartbeat_interval: Duration,
    /// Seconds a task with `max_concurrency` holds its cluster-wide slot before the worker
    /// renews it (every third of this while the task runs): a killed worker's slots free
    /// themselves after at most this long. Default 30.
    #[serde(deserialize_with = "secs")]
    pub slot_lease: Duration,
    /// The remote-control commands the worker obeys: a list of command names and the groups
    /// `inspect` (read-only) and `control` (changes); others are refused with an error reply.
    /// Default: every command, as Celery.
    pub control_allow: crate::broadcast::control::ControlAllow,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            broker_url: None,
            broker_failover_strategy: FailoverStrategy::RoundRobin,
            broker_transport_options: TransportOptions::default(),
            result_backend: None,
            result_backend_transport_options: TransportOptions::default(),
            default_queue: "celery".to_owned(),
            result_expires: Some(Duration::from_secs(86_400)),
            visibility_timeout: Duration::from_secs(3600),
            max_message_size: Some(DEFAULT_MAX_MESSAGE_SIZE),
            broker_connection_retry_on_startup: true,
            broker_connection_max_retries: 100,
            serializer: crate::protocol::ContentType::Json,
            security_key: None,
            security_key_password: None,
            security_certificate: None,
            security_cert_store: None,
            security_digest: "sha256".to_owned(),
            track_started: false,
            routes: BTreeMap::new(),
            celery_worker_queues: Vec::new(),
            celeriac_only_queues: Vec::new(),
            task_send_sent_event: false,
            task_annotations: BTreeMap::new(),
            worker: WorkerConfig::default(),
            beat: None,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            concurrency: std::thread::available_parallelism().map_or(1, |n| n.get()),
            pool: Pool::Async,
            queues: Vec::new(),
            prefetch_buffer: 4,
            hostname: None,
            max_tasks_per_child: None,
            max_memory_per_child: None,
            max_redeliveries: 10,
            soft_shutdown_timeout: None,
            inline_brief: true,
            task_events: false,
            heartbeat_interval: Duration::from_secs(2),
            slot_lease: Duration::from_secs(30),
            control_allow: crate::broadcast::control::ControlAllow::All,
        }
    }
}

/// Settings of the tasks whose names match one key of `[task_annotations]` (a name, or a glob
/// such as `"tasks.mail_*"` or `"*"`), Celery's `task_annotations`: each one given replaces
/// the task's own option, in the client (e.g. `unique_for`) and in the worker. Patterns apply
/// first (in key order), then an exact name, so a name's own entry wins over a pattern.
///
/// ```toml
/// [task_annotations."*"]
/// rate_limit_scope = "cluster"
///
/// [task_annotations."tasks.partner"]
/// rate_limit = "20/s"
/// max_concurrency = 4
/// ```
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct TaskAnnotation {
    /// The rate limit, e.g. `"10/s"`, `"100/m"`; `""` removes the task's own.
    #[serde(deserialize_with = "opt_rate_limit")]
    pub rate_limit: Option<Option<RateLimit>>,
    /// Whose budget the rate limit is: `"worker"` (each worker's, Celery's) or `"cluster"`.
    pub rate_limit_scope: Option<RateLimitScope>,
    /// At most this many run at once across the cluster.
    pub max_concurrency: Option<u32>,
    /// Seconds a unique task's lock is held at most (see `TaskOptions::unique_for`).
    #[serde(deserialize_with = "some_secs")]
    pub unique_for: Option<Duration>,
    /// Retries allowed.
    pub max_retries: Option<u32>,
    /// Seconds before a retry when none is given.
    #[serde(deserialize_with = "some_secs")]
    pub default_retry_delay: Option<Duration>,
    /// Acknowledge after the task finishes.
    pub acks_late: Option<bool>,
    /// Seconds after which the task is stopped and fails.
    #[serde(deserialize_with = "some_secs")]
    pub time_limit: Option<Duration>,
    /// Seconds after which the task's cancellation fires.
    #[serde(deserialize_with = "some_secs")]
    pub soft_time_limit: Option<Duration>,
    /// Store no result.
    pub ignore_result: Option<bool>,
    /// Store STARTED when the task begins.
    pub track_started: Option<bool>,
    /// Seconds after which an unstarted message is revoked, not run.
    #[serde(deserialize_with = "some_secs")]
    pub expires: Option<Duration>,
    /// Default priority, 0 to 9.
    pub priority: Option<u8>,
}

impl TaskAnnotation {
    /// Sets each option this annotation gives on `o`.
    pub fn apply(&self, o: &mut TaskOptions) {
        fn set<T: Clone>(slot: &mut T, v: &Option<T>) {
            if let Some(v) = v {
                *slot = v.clone();
            }
        }
        set(&mut o.rate_limit, &self.rate_limit);
        set(&mut o.rate_limit_scope, &self.rate_limit_scope);
        set(&mut o.max_concurrency, &self.max_concurrency.map(Some));
        set(&mut o.unique_for, &self.unique_for.map(Some));
        set(&mut o.max_retries, &self.max_retries.map(Some));
        set(&mut o.default_retry_delay, &self.default_retry_delay);
        set(&mut o.acks_late, &self.acks_late);
        set(&mut o.time_limit, &self.time_limit.map(Some));
        set(&mut o.soft_time_limit, &self.soft_time_limit.map(Some));
        set(&mut o.ignore_result, &self.ignore_result);
        set(&mut o.track_started, &self.track_started);
        set(&mut o.expires, &self.expires.map(Some));
        set(&mut o.priority, &self.priority.map(Some));
    }
}

/// A transport's options (Celery's `broker_transport_options` and
/// `result_backend_transport_options`, with kombu's names): those of Redis Sentinel.
///
/// ```toml
/// broker_url = "sentinel://:pw@10.0.0.1:26379/0;sentinel://10.0.0.2:26379;sentinel://10.0.0.3:26379"
///
/// [broker_transport_options]
/// master_name = "mymaster"
/// sentinel_kwargs = { password = "sentinel-secret" }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct TransportOptions {
    /// The name the Sentinels monitor the master under (`sentinel monitor <name> …`); needed
    /// by a `sentinel://` URL, ignored by the others.
    pub master_name: Option<String>,
    /// How to talk to the Sentinels themselves. The credentials in the URL are the master's
    /// (and its replicas'), as in kombu; Sentinels protected by a password of their own
    /// (`requirepass` in the Sentinel's configuration) take it from here.
    pub sentinel_kwargs: SentinelKwargs,
    /// Redis only: queue globs kept in celeriac's native layout (Redis Streams with a
    /// consumer group) instead of kombu's lists, for queues that no Python process sends to,
    /// consumes or inspects. Faster, but invisible to Python Celery; see docs/redis.md.
    /// Default none; ignored by other brokers and by result backends.
    pub native_queues: Vec<String>,
}

/// The Sentinels' own credentials (kombu's `sentinel_kwargs`). `Debug` hides the password.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SentinelKwargs {
    /// The ACL user, for Sentinels with ACLs (Redis 6.2+); default none.
    pub username: Option<String>,
    /// The Sentinels' password; default none.
    pub password: Option<String>,
}

impl fmt::Debug for SentinelKwargs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentinelKwargs")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

/// Where a worker runs blocking task bodies.
///
/// Async handlers always run on the tokio runtime. Blocking handlers do not (short of the
/// brief ones under [`Pool::Async`]): the pool decides which threads, or which processes, take
/// them. Parsed from `async`, `threads`, `processes` or `prefork`; any other name is an error
/// that lists these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pool {
    /// Blocking handlers go to tokio's blocking thread pool (`spawn_blocking`), except those
    /// that proved brief, which run inline (the worker's `inline_brief` option).
    #[default]
    Async,
    /// Blocking handlers go to the worker's own pool of `concurrency` named threads, which a
    /// stuck task cannot keep the process from exiting (tokio waits for its blocking threads
    /// when the runtime shuts down; the worker's threads are not waited for).
    Threads,
    /// Blocking handlers run in child processes of the same binary (Celery's prefork), one task
    /// per child at a time. A hard time limit kills the child, a crashing child fails only its
    /// task, and children are recycled by `max_tasks_per_child` and `max_memory_per_child`.
    /// The binary must answer when started as a pool child: `celeriac::cli::run` does; others
    /// call `celeriac_worker::run_child` when `celeriac_worker::is_pool_child` says so. Async
    /// handlers still run on the parent's runtime.
    Processes,
}

impl std::str::FromStr for Pool {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "async" => Ok(Pool::Async),
            "threads" => Ok(Pool::Threads),
            "processes" | "prefork" => Ok(Pool::Processes),
            other => Err(Error::config(format!(
                "unknown pool {other:?} (known: async, threads, processes)"
            ))),
        }
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pool::Async => "async",
            Pool::Threads => "threads",
            Pool::Processes => "processes",
        })
    }
}

impl<'de> Deserialize<'de> for Pool {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The order in which a broker with several URLs tries them (Celery's
/// `broker_failover_strategy`). Parsed from `round-robin` or `shuffle`; any other name is an
/// error that lists these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FailoverStrategy {
    /// The listed order: after a failure, the URL after the one that failed, wrapping around.
    #[default]
    RoundRobin,
    /// A random order, drawn again each time the list has been gone through.
    Shuffle,
}

impl std::str::FromStr for FailoverStrategy {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "round-robin" => Ok(FailoverStrategy::RoundRobin),
            "shuffle" => Ok(FailoverStrategy::Shuffle),
            other => Err(Error::config(format!(
                "unknown failover strategy {other:?} (known: round-robin, shuffle)"
            ))),
        }
    }
}

impl<'de> Deserialize<'de> for RateLimitScope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for FailoverStrategy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

fn secs<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
    let s = f64::deserialize(d)?;
    Duration::try_from_secs_f64(s).map_err(serde::de::Error::custom)
}

/// Seconds, present: `Some` (for a field whose absence means "not given").
fn some_secs<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Duration>, D::Error> {
    secs(d).map(Some)
}

/// A rate limit string, present: `Some(None)` for `""` (no limit), else `Some(limit)`.
fn opt_rate_limit<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Option<RateLimit>>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Ok(Some(None));
    }
    s.parse()
        .map(|l| Some(Some(l)))
        .map_err(serde::de::Error::custom)
}

fn opt_secs<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Duration>, D::Error> {
    let s = f64::deserialize(d)?;
    if s == 0.0 {
        return Ok(None);
    }
    Duration::try_from_secs_f64(s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn opt_size<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<usize>, D::Error> {
    Ok(Some(usize::deserialize(d)?).filter(|&n| n > 0))
}

/// Fails when `concurrency + prefetch_buffer` exceeds [`MAX_PREFETCH`]; for the worker, whose
/// options can also come from flags.
pub fn check_prefetch(concurrency: usize, prefetch_buffer: usize) -> Result<()> {
    let prefetch = concurrency.max(1).saturating_add(prefetch_buffer);
    if prefetch > MAX_PREFETCH {
        return Err(Error::config(format!(
            "prefetch {prefetch} (concurrency {concurrency} + prefetch_buffer {prefetch_buffer}) \
             is more than {MAX_PREFETCH}, the most a worker may hold unacknowledged"
        )));
    }
    Ok(())
}

impl Config {
    /// Defaults, then `$CELERIAC_CONFIG` or `./celeriac.toml` if present, then the environment.
    pub fn load() -> Result<Self> {
        let path = std::env::var_os("CELERIAC_CONFIG").map(PathBuf::from);
        let explicit = path.is_some();
        let path = path.unwrap_or_else(|| PathBuf::from(DEFAULT_FILE));
        let file = match std::fs::read_to_string(&path) {
            Ok(text) => Some((path, text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => None,
            Err(e) => {
                return Err(
                    Error::config(format!("cannot read config file {}", path.display()))
                        .with_source(e),
                );
            }
        };
        let file = file.as_ref().map(|(p, t)| (p.as_path(), t.as_str()));
        Self::from_sources(file, |k| std::env::var(k).ok())
    }

    /// Builds a config from file text (with its path, for messages) and an environment lookup.
    pub fn from_sources(
        file: Option<(&Path, &str)>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        let mut cfg = match file {
            Some((path, text)) => toml::from_str::<Config>(text).map_err(|e| {
                Error::config(format!("invalid config file {}", path.display())).with_source(e)
            })?,
            None => Config::default(),
        };
        if let Some(v) = env("CELERIAC_BROKER_URL") {
            cfg.broker_url = Some(v);
        }
        if let Some(v) = env("CELERIAC_BROKER_FAILOVER_STRATEGY") {
            cfg.broker_failover_strategy = v.parse().map_err(|e: Error| {
                Error::config(format!("CELERIAC_BROKER_FAILOVER_STRATEGY: {e}"))
            })?;
        }
        if let Some(v) = env("CELERIAC_RESULT_BACKEND") {
            cfg.result_backend = Some(v);
        }
        if let Some(v) = env("CELERIAC_DEFAULT_QUEUE") {
            cfg.default_queue = v;
        }
        if let Some(v) = env("CELERIAC_SERIALIZER") {
            cfg.serializer = v
                .parse()
                .map_err(|e: Error| Error::config(format!("CELERIAC_SERIALIZER: {e}")))?;
        }
        let set = |slot: &mut Option<String>, name: &str| {
            if let Some(v) = env(name) {
                *slot = Some(v);
            }
        };
        set(&mut cfg.security_key, "CELERIAC_SECURITY_KEY");
        set(
            &mut cfg.security_certificate,
            "CELERIAC_SECURITY_CERTIFICATE",
        );
        set(&mut cfg.security_cert_store, "CELERIAC_SECURITY_CERT_STORE");
        if let Some(v) = env("CELERIAC_SECURITY_KEY_PASSWORD") {
            cfg.security_key_password = Some(Password(v));
        }
        if let Some(v) = env("CELERIAC_SECURITY_DIGEST") {
            cfg.security_digest = v;
        }
        if let Some(v) = env("CELERIAC_CONCURRENCY") {
            cfg.worker.concurrency = v.parse().map_err(|_| {
                Error::config(format!("CELERIAC_CONCURRENCY must be a number, got {v:?}"))
            })?;
        }
        if let Some(v) = env("CELERIAC_QUEUES") {
            cfg.worker.queues = v
                .split(',')
                .map(str::trim)
                .filter(|q| !q.is_empty())
                .map(str::to_owned)
                .collect();
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Applies `[task_annotations]` to the tasks of `registry`: patterns first (in key
    /// order), then each task's exact name.
    pub fn annotate(&self, registry: &mut Registry) {
        if self.task_annotations.is_empty() {
            return;
        }
        registry.update_options(|name, o| self.annotate_options(name, o));
    }

    /// Applies `[task_annotations]` to the options `o` of task `name`.
    pub fn annotate_options(&self, name: &str, o: &mut TaskOptions) {
        for (pattern, a) in &self.task_annotations {
            if pattern.contains('*') && glob_match(pattern, name) {
                a.apply(o);
            }
        }
        if let Some(a) = self.task_annotations.get(name) {
            a.apply(o);
        }
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<()> {
        if self.worker.concurrency == 0 {
            return Err(Error::config("worker.concurrency must be at least 1"));
        }
        if self.default_queue.is_empty() {
            return Err(Error::config("default_queue must not be empty"));
        }
        check_prefetch(self.worker.concurrency, self.worker.prefetch_buffer)
    }

    /// The broker URL in effect.
    pub fn broker_url(&self) -> &str {
        self.broker_url.as_deref().unwrap_or(DEFAULT_URL)
    }

    /// The result backend URL in effect.
    pub fn result_backend_url(&self) -> &str {
        match self.result_backend.as_deref() {
            Some(url) => url,
            // RabbitMQ keeps no results: its results travel back as replies (`rpc://`), as
            // Celery users configure it; any other broker stores them itself.
            None if is_amqp_url(self.broker_url()) => "rpc://",
            None => self.broker_url(),
        }
    }

    /// The transport options of the result backend: `result_backend_transport_options`, or,
    /// when that sets no `master_name` and the result backend is the broker's URL (no
    /// `result_backend`, or the same text), `broker_transport_options`, so that one Sentinel
    /// setup need not be written twice.
    pub fn backend_transport_options(&self) -> &TransportOptions {
        let same_url = self.result_backend_url() == self.broker_url();
        if self.result_backend_transport_options.master_name.is_none() && same_url {
            &self.broker_transport_options
        } else {
            &self.result_backend_transport_options
        }
    }

    /// The queue a task goes to by the routes, if one matches (first match in glob order).
    pub fn route(&self, task: &str) -> Option<&str> {
        self.routes
            .iter()
            .find(|(pattern, _)| glob_match(pattern, task))
            .map(|(_, q)| q.as_str())
    }
}

/// Whether a broker URL (or the first of a `;` list) names RabbitMQ.
fn is_amqp_url(url: &str) -> bool {
    let scheme = url.trim_start().split("://").next().unwrap_or("");
    matches!(scheme, "amqp" | "amqps" | "pyamqp")
}

/// This machine's host name (from the kernel, else `$HOSTNAME`, else `localhost`).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Matches `name` against a pattern where `*` stands for any run of characters.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_are_celerys() {
        let c = Config::from_sources(None, no_env).unwrap();
        assert_eq!(c.default_queue, "celery");
        assert_eq!(c.broker_url(), DEFAULT_URL);
        assert_eq!(c.result_backend_url(), DEFAULT_URL);
        assert_eq!(c.result_expires, Some(Duration::from_secs(86_400)));
    }

    #[test]
    fn control_allow_loads_from_the_file_and_refuses_unknown_names() {
        let load = |text: &str| Config::from_sources(Some((Path::new("c.toml"), text)), no_env);
        let c = load("[worker]\ncontrol_allow = [\"inspect\", \"revoke\"]\n").unwrap();
        assert!(c.worker.control_allow.allows("stats"));
        assert!(!c.worker.control_allow.allows("shutdown"));
        let e = load("[worker]\ncontrol_allow = [\"shutdwon\"]\n").unwrap_err();
        assert!(
            format!("{e:#}").contains("unknown remote-control command"),
            "{e:#}"
        );
    }

    #[test]
    fn a_rabbitmq_broker_answers_by_rpc_unless_told_otherwise() {
        for (broker, backend) in [
            ("amqp://guest:guest@127.0.0.1//", "rpc://"),
            ("pyamqp://h1;amqp://h2", "rpc://"),
            ("amqps://h", "rpc://"),
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ] {
            let env = |k: &str| (k == "CELERIAC_BROKER_URL").then(|| broker.to_owned());
            let c = Config::from_sources(None, env).unwrap();
            assert_eq!(c.result_backend_url(), backend, "{broker}");
        }
        let env = |k: &str| match k {
            "CELERIAC_BROKER_URL" => Some("amqp://h".to_owned()),
            "CELERIAC_RESULT_BACKEND" => Some("redis://h".to_owned()),
            _ => None,
        };
        let c = Config::from_sources(None, env).unwrap();
        assert_eq!(c.result_backend_url(), "redis://h");
    }

    #[test]
    fn file_then_environment() {
        let text = r#"
            broker_url = "sqlite://file.db"
            result_expires = 0
            [routes]
            "tasks.send_*" = "email"
            "tasks.*" = "default"
            [worker]
            concurrency = 3
            queues = ["a"]
        "#;
        let env = |k: &str| (k == "CELERIAC_BROKER_URL").then(|| "memory://".to_owned());
        let c = Config::from_sources(Some((Path::new("celeriac.toml"), text)), env).unwrap();
        assert_eq!(c.broker_url(), "memory://");
        assert_eq!(c.result_expires, None);
        assert_eq!(c.worker.concurrency, 3);
        assert_eq!(c.route("tasks.send_mail"), Some("default"));
        assert_eq!(c.route("other.x"), None);
        assert!(c.beat.is_none());
        let with_beat = "[beat]\ntimezone = \"UTC\"\n[beat.schedule.tick]\ntask = \"tasks.add\"\n";
        let c = Config::from_sources(Some((Path::new("c.toml"), with_beat)), no_env).unwrap();
        assert_eq!(c.beat.unwrap()["timezone"].as_str(), Some("UTC"));
    }

    /// Celery's security settings under their own names, from the file or the environment;
    /// the key password never shows in debug output. See: issue 26
    #[test]
    fn security_settings_read_from_file_and_environment() {
        let text = r#"
            serializer = "auth"
            security_key = "/k/app.key"
            security_key_password = "hunter2"
            security_certificate = "/k/app.pem"
            security_cert_store = "/k/certs/*.pem"
        "#;
        let c = Config::from_sources(Some((Path::new("c.toml"), text)), no_env).unwrap();
        assert_eq!(c.serializer, crate::ContentType::Auth);
        assert_eq!(c.security_key.as_deref(), Some("/k/app.key"));
        assert_eq!(c.security_certificate.as_deref(), Some("/k/app.pem"));
        assert_eq!(c.security_cert_store.as_deref(), Some("/k/certs/*.pem"));
        assert_eq!(c.security_digest, "sha256");
        assert_eq!(
            c.security_key_password.as_ref().map(Password::expose),
            Some("hunter2")
        );
        assert!(!format!("{c:?}").contains("hunter2"));
        let env = |k: &str| match k {
            "CELERIAC_SERIALIZER" => Some("auth".to_owned()),
            "CELERIAC_SECURITY_KEY" => Some("/e/k".to_owned()),
            "CELERIAC_SECURITY_KEY_PASSWORD" => Some("s3cret".to_owned()),
            "CELERIAC_SECURITY_CERTIFICATE" => Some("/e/c".to_owned()),
            "CELERIAC_SECURITY_CERT_STORE" => Some("/e/store".to_owned()),
            "CELERIAC_SECURITY_DIGEST" => Some("sha512".to_owned()),
            _ => None,
        };
        let c = Config::from_sources(None, env).unwrap();
        assert_eq!(c.serializer, crate::ContentType::Auth);
        assert_eq!(c.security_key.as_deref(), Some("/e/k"));
        assert_eq!(c.security_certificate.as_deref(), Some("/e/c"));
        assert_eq!(c.security_cert_store.as_deref(), Some("/e/store"));
        assert_eq!(c.security_digest, "sha512");
        assert_eq!(c.security_key_password, Some(Password::new("s3cret")));
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn limits_have_protective_defaults_and_can_be_lifted() {
        let c = Config::from_sources(None, no_env).unwrap();
        assert_eq!(c.max_message_size, Some(16 * 1024 * 1024));
        let text = "max_message_size = 0\n[worker]\nconcurrency = 2\nprefetch_buffer = 65533";
        let c = Config::from_sources(Some((Path::new("c.toml"), text)), no_env).unwrap();
        assert_eq!(c.max_message_size, None);
        let text = "[worker]\nconcurrency = 2\nprefetch_buffer = 1000000";
        let e = Config::from_sources(Some((Path::new("c.toml"), text)), no_env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("prefetch 1000002") && e.contains("65535"), "{e}");
    }

    #[test]
    fn bad_config_names_the_file_and_the_problem() {
        let e = Config::from_sources(
            Some((Path::new("x/celeriac.toml"), "brokr_url = 1")),
            no_env,
        )
        .unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Config);
        assert!(e.to_string().contains("x/celeriac.toml"), "{e}");
        let src = std::error::Error::source(&e).unwrap().to_string();
        assert!(src.contains("brokr_url"), "{src}");
        let env = |k: &str| (k == "CELERIAC_CONCURRENCY").then(|| "lots".to_owned());
        assert!(
            Config::from_sources(None, env)
                .unwrap_err()
                .to_string()
                .contains("CELERIAC_CONCURRENCY")
        );
        // Names of enums fail the load, naming what is known.
        for (text, want) in [
            (
                "[worker]\npool = \"forks\"",
                "unknown pool \"forks\" (known: async, threads, processes)",
            ),
            (
                "serializer = \"pickle\"",
                "unknown serializer \"pickle\" (known: json, msgpack, auth)",
            ),
        ] {
            let e = Config::from_sources(Some((Path::new("c.toml"), text)), no_env).unwrap_err();
            let src = std::error::Error::source(&e).unwrap().to_string();
            assert!(src.contains(want), "{text}: {e}: {src}");
        }
        let env = |k: &str| (k == "CELERIAC_SERIALIZER").then(|| "yaml".to_owned());
        let e = Config::from_sources(None, env).unwrap_err().to_string();
        assert!(
            e.contains("CELERIAC_SERIALIZER") && e.contains("yaml"),
            "{e}"
        );
        let c = Config::from_sources(
            Some((
                Path::new("c.toml"),
                "serializer = \"msgpack\"\n[worker]\npool = \"prefork\"",
            )),
            no_env,
        )
        .unwrap();
        assert_eq!(c.serializer, crate::ContentType::MsgPack);
        assert_eq!(c.worker.pool, Pool::Processes);
    }

    #[test]
    fn transport_options_use_celerys_names() {
        let text = r#"
            broker_url = "sentinel://:pw@h1:26379/0;sentinel://h2:26379"
            [broker_transport_options]
            master_name = "mymaster"
            sentinel_kwargs = { password = "s3cret" }
        "#;
        let c = Config::from_sources(Some((Path::new("c.toml"), text)), no_env).unwrap();
        let t = &c.broker_transport_options;
        assert_eq!(t.master_name.as_deref(), Some("mymaster"));
        assert_eq!(t.sentinel_kwargs.password.as_deref(), Some("s3cret"));
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "Debug shows the password"
        );
        // The backend on the broker's URL shares the broker's options...
        assert_eq!(c.backend_transport_options(), t);
        // ...not when it has a URL of its own or options of its own.
        let text2 = format!("{text}\n[result_backend_transport_options]\nmaster_name = \"other\"");
        let c = Config::from_sources(Some((Path::new("c.toml"), &text2)), no_env).unwrap();
        assert_eq!(
            c.backend_transport_options().master_name.as_deref(),
            Some("other")
        );
        let text3 = format!("result_backend = \"redis://h/1\"\n{text}");
        let c = Config::from_sources(Some((Path::new("c.toml"), &text3)), no_env).unwrap();
        assert_eq!(c.backend_transport_options().master_name, None);
        // A misspelt option fails the load, naming it.
        let bad = "[broker_transport_options]\nmaster = \"m\"";
        let e = Config::from_sources(Some((Path::new("c.toml"), bad)), no_env).unwrap_err();
        let src = std::error::Error::source(&e).unwrap().to_string();
        assert!(src.contains("master"), "{src}");
    }

    #[test]
    fn globs() {
        assert!(glob_match("tasks.*", "tasks.add"));
        assert!(glob_match("*", "x"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXcYYb"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(!glob_match("ab*ba", "aba"));
    }

    /// The names of a struct's fields as serde sees them: its `Deserialize` hands them to
    /// `deserialize_struct`, which this deserializer records and then refuses.
    fn field_names<'de, T: Deserialize<'de>>() -> Vec<&'static str> {
        struct Names(std::cell::RefCell<Vec<&'static str>>);
        impl<'de> Deserializer<'de> for &Names {
            type Error = serde::de::value::Error;
            fn deserialize_any<V: serde::de::Visitor<'de>>(
                self,
                _: V,
            ) -> std::result::Result<V::Value, Self::Error> {
                Err(serde::de::Error::custom("names only"))
            }
            fn deserialize_struct<V: serde::de::Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> std::result::Result<V::Value, Self::Error> {
                self.0.borrow_mut().extend_from_slice(fields);
                Err(serde::de::Error::custom("names only"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
                identifier ignored_any
            }
        }
        let names = Names(std::cell::RefCell::new(Vec::new()));
        let _ = T::deserialize(&names);
        names.0.into_inner()
    }

    /// `(key, default)` rows of the table under `heading` in docs/configuration.md.
    fn documented(doc: &str, heading: &str) -> Vec<(String, String)> {
        let section = doc
            .split("\n## ")
            .find(|s| s.starts_with(heading))
            .unwrap_or_else(|| panic!("no section {heading}"));
        section
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                let cells: Vec<&str> = l.split(" | ").collect();
                (
                    cells[0]
                        .trim_start_matches("| ")
                        .trim_matches('`')
                        .to_owned(),
                    cells[1].to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn task_annotations_apply_patterns_then_names_and_refuse_unknown_settings() {
        use crate::task::{Handler, TaskDef};
        let text = r#"
[task_annotations."*"]
rate_limit_scope = "cluster"
max_retries = 1

[task_annotations."tasks.mail_*"]
rate_limit = "5/s"
time_limit = 2.5

[task_annotations."tasks.mail_send"]
rate_limit = ""
unique_for = 60
"#;
        let c = Config::from_sources(Some((Path::new("c.toml"), text)), no_env).unwrap();
        let mut r = Registry::new();
        for name in ["tasks.mail_send", "tasks.mail_digest", "tasks.add"] {
            r.insert(TaskDef {
                name: name.to_owned(),
                params: &[],
                options: TaskOptions {
                    rate_limit: Some("1/s".parse().unwrap()),
                    ..TaskOptions::default()
                },
                handler: Handler::Async(std::sync::Arc::new(|_, _| {
                    Box::pin(async { Ok(serde_json::Value::Null) })
                })),
            });
        }
        c.annotate(&mut r);
        let o = |n: &str| r.get(n).unwrap().options.clone();
        for n in ["tasks.mail_send", "tasks.mail_digest", "tasks.add"] {
            assert_eq!(o(n).rate_limit_scope, RateLimitScope::Cluster, "{n}");
            assert_eq!(o(n).max_retries, Some(1), "{n}");
        }
        // The name's own entry wins over the pattern's.
        assert_eq!(o("tasks.mail_send").rate_limit, None);
        assert_eq!(
            o("tasks.mail_send").unique_for,
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            o("tasks.mail_send").time_limit,
            Some(Duration::from_millis(2500))
        );
        assert_eq!(
            o("tasks.mail_digest").rate_limit,
            Some("5/s".parse().unwrap())
        );
        assert_eq!(o("tasks.mail_digest").unique_for, None);
        // Untouched settings keep the task's own.
        assert_eq!(o("tasks.add").rate_limit, Some("1/s".parse().unwrap()));
        for (bad, says) in [
            ("[task_annotations.x]\nrate_limt = \"1/s\"\n", "rate_limt"),
            ("[task_annotations.x]\nrate_limit = \"fast\"\n", "fast"),
            (
                "[task_annotations.x]\nrate_limit_scope = \"global\"\n",
                "global",
            ),
        ] {
            let e = Config::from_sources(Some((Path::new("c.toml"), bad)), no_env).unwrap_err();
            assert!(format!("{e:#}").contains(says), "{bad}: {e:#}");
        }
    }

    #[test]
    fn the_reference_lists_every_key() {
        let doc = include_str!("../../../docs/configuration.md");
        for (heading, fields, table) in [
            ("Top level", field_names::<Config>(), None),
            ("`[worker]`", field_names::<WorkerConfig>(), Some("worker")),
            (
                "`[task_annotations]`",
                field_names::<TaskAnnotation>(),
                Some("task_annotations.\"*\""),
            ),
        ] {
            let rows = documented(doc, heading);
            let mut keys: Vec<&str> = rows.iter().map(|(k, _)| k.as_str()).collect();
            let mut want = fields.clone();
            keys.sort_unstable();
            want.sort_unstable();
            assert_eq!(
                keys, want,
                "docs/configuration.md, {heading}, against the config type"
            );
            // Every default written as a value loads, in its table.
            for (key, default) in &rows {
                let Some(value) = default.strip_prefix('`').and_then(|d| d.strip_suffix('`'))
                else {
                    continue;
                };
                let text = match table {
                    Some(t) => format!("[{t}]\n{key} = {value}\n"),
                    None if value.starts_with('{') => format!("[{key}]\n"),
                    None => format!("{key} = {value}\n"),
                };
                Config::from_sources(Some((Path::new("doc.toml"), &text)), no_env)
                    .unwrap_or_else(|e| panic!("documented default {key} = {value}: {e:#}"));
            }
        }
        let env_doc = documented(doc, "Environment variables");
        let source = include_str!("config.rs");
        for var in source
            .split("env(\"")
            .skip(1)
            .filter_map(|s| s.split('"').next())
        {
            if var.starts_with("CELERIAC_") {
                assert!(
                    env_doc
                        .iter()
                        .any(|(k, _)| k.split("`, `").any(|k| k == var)),
                    "{var} is read but not in docs/configuration.md"
                );
            }
        }
    }
}
