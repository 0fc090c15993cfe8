//! How a worker is configured: [`WorkerOptions`] and the [`Pool`] that runs blocking tasks.
//!
//! For the facade and the CLI, which build options from [`Config`] with
//! [`WorkerOptions::from_config`] and then adjust single fields. The struct is
//! `#[non_exhaustive]` so options can be added without breaking callers: start from
//! [`WorkerOptions::default`] or `from_config` and assign fields.

use std::time::Duration;

pub use celeriac_core::config::Pool;
use celeriac_core::{Config, ContentType};

/// Settings of one [`Worker`](crate::Worker).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkerOptions {
    /// Node name, e.g. `celeriac@host`; stored with results as `worker`.
    pub hostname: String,
    /// Queues to consume.
    pub queues: Vec<String>,
    /// Tasks run at once (at least 1).
    pub concurrency: usize,
    /// Where blocking task bodies run.
    pub pool: Pool,
    /// Deliveries held beyond those running: prefetch = `concurrency + prefetch_buffer`.
    pub prefetch_buffer: usize,
    /// Lease of each delivery; acks-late tasks running longer than a third of it get their
    /// lease extended when the broker supports it.
    pub visibility_timeout: Duration,
    /// Store STARTED when a task begins (a task's own `track_started` also turns it on).
    pub track_started: bool,
    /// Serializer for messages the worker creates itself (retries re-send the original body).
    /// [`ContentType::Auth`] (from `serializer = "auth"`) makes the worker run signed messages
    /// only, and needs [`signer`](Self::signer): without one the worker does not start.
    pub content_type: ContentType,
    /// Verifies incoming task messages and signs those the worker sends (canvas steps):
    /// Celery's `auth` serializer. With one, unsigned messages, bad signatures and unknown
    /// signers are refused (FAILURE with `celery.exceptions.SecurityError`, the message moved
    /// intact to the dead letters). The app sets it from its configuration
    /// (`celeriac::App::worker_options`). Default `None`.
    pub signer: Option<std::sync::Arc<dyn celeriac_core::security::BodySigner>>,
    /// At a cold shutdown, how long running tasks get to react to their cancellation before
    /// acks-late ones are handed back. Default 2 s.
    pub cold_shutdown_grace: Duration,
    /// Soft shutdown (Celery 5.5's `worker_soft_shutdown_timeout`): how long a warm shutdown
    /// waits for running tasks before it turns cold by itself (cancel them, hand back the
    /// acks-late ones, exit). `None` (the default): a warm shutdown waits for as long as
    /// running tasks take.
    pub soft_shutdown_timeout: Option<Duration>,
    /// While tasks run, how often the worker reads their stored states to find revokes with
    /// `terminate` (one read of all running ids per interval). Default 300 ms.
    ///
    /// Also how old a task state that the broker read with the fetch may be when the task
    /// starts and still be trusted for the duplicate and revoke check
    /// ([`celeriac_core::Delivery::stored`]); an older one is read again.
    pub revoke_poll_interval: Duration,
    /// [`Pool::Processes`]: a child is replaced after this many tasks (`None`: never).
    pub max_tasks_per_child: Option<u32>,
    /// [`Pool::Processes`]: a child whose resident memory is above this many KiB after a task
    /// is replaced (`None`: no limit; read from `/proc`, so Linux only).
    pub max_memory_per_child: Option<u64>,
    /// [`Pool::Processes`]: how to start a child. `None`: this executable with no arguments
    /// (and `CELERIAC_POOL_CHILD=1`, as always).
    pub child_command: Option<ChildCommand>,
    /// A delivery redelivered more times than this (its worker crashed, or its lease ran out,
    /// over and over) is moved to the dead-letter queue `<queue>.dead` instead of run.
    /// Default 10.
    pub max_redeliveries: u32,
    /// [`Pool::Async`]: a blocking task whose last 32 runs each took under 50 µs runs inline
    /// on the runtime thread that took its delivery, saving the two thread handoffs that
    /// otherwise cost more than the body. An inline run over 1 ms in which the task blocked or
    /// computed sends it back to the blocking pool to prove itself again (for good after the
    /// third within 10,000 inline runs); on Linux the thread's accounting tells such a run from
    /// a busy machine pausing the thread, which sends nobody back. One that blocks on the
    /// runtime (`Handle::block_on`, which panics there) sends it back for good. Default `true`;
    /// `false` never runs a blocking body on the runtime.
    pub inline_brief: bool,
    /// Send task events (`-E`, Celery's `worker_send_task_events`): `task-received`,
    /// `task-started`, `task-succeeded`, ... Worker events (online, heartbeats, offline) are
    /// sent whatever this says, when the broker carries events. Remote control's
    /// `enable_events` / `disable_events` change it while the worker runs. Default `false`.
    pub task_events: bool,
    /// Time between `worker-heartbeat` events; monitors think a worker is gone after two
    /// silent intervals. Default 2 s, as Celery's.
    pub heartbeat_interval: Duration,
    /// How long a task with `max_concurrency` leases its cluster-wide slot; renewed every
    /// third of it while the task runs, so a killed worker's slots free themselves after at
    /// most this long. Default 30 s.
    pub slot_lease: Duration,
    /// Autoscale the pool between `(max, min)` slots (`--autoscale max,min`): grow while tasks
    /// wait for a slot, shrink when slots stay idle. `None` (the default): a fixed size.
    pub autoscale: Option<(usize, usize)>,
    /// Hard time limit of every task that sets none itself (neither its message's `timelimit`
    /// header nor its options): Celery's `task_time_limit`, the worker's `--time-limit`.
    /// Default none.
    pub time_limit: Option<Duration>,
    /// Soft time limit of every task that sets none itself (Celery's
    /// `task_soft_time_limit`, `--soft-time-limit`). Default none.
    pub soft_time_limit: Option<Duration>,
    /// A message whose body is larger than this many bytes is not decoded: its task fails
    /// with `LimitExceeded` and the message goes to the dead-letter queue. `None`: no limit.
    /// Default [`DEFAULT_MAX_MESSAGE_SIZE`](celeriac_core::config::DEFAULT_MAX_MESSAGE_SIZE)
    /// (16 MiB); from config, [`Config::max_message_size`].
    pub max_message_size: Option<usize>,
    /// Listen for remote-control requests (`inspect`, `control`) when the broker carries
    /// them. Default `true`. With a [`signer`](Self::signer) (serializer `auth`) only requests
    /// signed by a trusted key are obeyed and replies are signed, as Celery's workers do.
    pub remote_control: bool,
    /// The remote-control commands this worker obeys (`[worker] control_allow`,
    /// `--control-allow`); a refused one gets an error reply and changes nothing. Default:
    /// every command.
    pub control_allow: celeriac_core::broadcast::control::ControlAllow,
    /// The broker's URL, for `stats` and `conf` replies (shown without its password).
    pub broker_url: Option<String>,
}

/// How the [`Pool::Processes`] pool starts a child: a program and its arguments. The child also
/// gets the environment variable `CELERIAC_POOL_CHILD=1` and a socket as its standard input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildCommand {
    /// The program; normally the worker's own executable.
    pub program: std::path::PathBuf,
    /// Its arguments.
    pub args: Vec<std::ffi::OsString>,
}

impl ChildCommand {
    /// Runs `program` with no arguments.
    pub fn new(program: impl Into<std::path::PathBuf>) -> Self {
        ChildCommand {
            program: program.into(),
            args: Vec::new(),
        }
    }

    /// Adds an argument.
    #[must_use]
    pub fn arg(mut self, arg: impl Into<std::ffi::OsString>) -> Self {
        self.args.push(arg.into());
        self
    }
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            hostname: format!("celeriac@{}", celeriac_core::hostname()),
            queues: vec!["celery".to_owned()],
            concurrency: std::thread::available_parallelism().map_or(1, |n| n.get()),
            pool: Pool::Async,
            prefetch_buffer: 4,
            visibility_timeout: Duration::from_secs(3600),
            track_started: false,
            content_type: ContentType::Json,
            signer: None,
            cold_shutdown_grace: Duration::from_secs(2),
            soft_shutdown_timeout: None,
            revoke_poll_interval: Duration::from_millis(300),
            max_tasks_per_child: None,
            max_memory_per_child: None,
            child_command: None,
            max_redeliveries: 10,
            inline_brief: true,
            task_events: false,
            heartbeat_interval: Duration::from_secs(2),
            slot_lease: Duration::from_secs(30),
            autoscale: None,
            remote_control: true,
            control_allow: celeriac_core::broadcast::control::ControlAllow::All,
            max_message_size: Some(celeriac_core::config::DEFAULT_MAX_MESSAGE_SIZE),
            time_limit: None,
            soft_time_limit: None,
            broker_url: None,
        }
    }
}

impl WorkerOptions {
    /// Options from a loaded configuration (whose pool and serializer are checked when it
    /// loads: an unknown name fails the load, never the worker later).
    pub fn from_config(config: &Config) -> Self {
        let w = &config.worker;
        let pool = w.pool;
        let content_type = config.serializer;
        let queues = if w.queues.is_empty() {
            vec![config.default_queue.clone()]
        } else {
            w.queues.clone()
        };
        WorkerOptions {
            hostname: w
                .hostname
                .clone()
                .unwrap_or_else(|| format!("celeriac@{}", celeriac_core::hostname())),
            queues,
            concurrency: w.concurrency.max(1),
            pool,
            prefetch_buffer: w.prefetch_buffer,
            visibility_timeout: config.visibility_timeout,
            track_started: config.track_started,
            content_type,
            max_tasks_per_child: w.max_tasks_per_child,
            max_memory_per_child: w.max_memory_per_child,
            max_redeliveries: w.max_redeliveries,
            soft_shutdown_timeout: w.soft_shutdown_timeout,
            inline_brief: w.inline_brief,
            task_events: w.task_events,
            heartbeat_interval: w.heartbeat_interval,
            slot_lease: w.slot_lease,
            control_allow: w.control_allow.clone(),
            broker_url: Some(config.broker_url().to_owned()),
            max_message_size: config.max_message_size,
            ..WorkerOptions::default()
        }
    }

    /// Deliveries held unacknowledged at once: `concurrency + prefetch_buffer`.
    pub fn prefetch(&self) -> usize {
        self.concurrency.max(1) + self.prefetch_buffer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_parses_and_prints() {
        assert_eq!("async".parse::<Pool>().unwrap(), Pool::Async);
        assert_eq!("threads".parse::<Pool>().unwrap(), Pool::Threads);
        let e = "forks".parse::<Pool>().unwrap_err().to_string();
        assert!(e.contains("known: async, threads, processes"), "{e}");
        assert_eq!("processes".parse::<Pool>().unwrap(), Pool::Processes);
        assert_eq!("prefork".parse::<Pool>().unwrap(), Pool::Processes);
        assert_eq!(Pool::Threads.to_string(), "threads");
    }

    #[test]
    fn from_config_takes_worker_settings_and_defaults_the_queue() {
        let text = "visibility_timeout = 60\ntrack_started = true\n[worker]\nconcurrency = 3\npool = \"threads\"\nprefetch_buffer = 2\nhostname = \"w1@h\"\nmax_tasks_per_child = 7\nmax_redeliveries = 3\nsoft_shutdown_timeout = 2.5\ninline_brief = false\n";
        let c =
            Config::from_sources(Some((std::path::Path::new("c.toml"), text)), |_| None).unwrap();
        let o = WorkerOptions::from_config(&c);
        assert_eq!(o.queues, ["celery"]);
        assert_eq!(o.concurrency, 3);
        assert_eq!(o.pool, Pool::Threads);
        assert_eq!(o.prefetch(), 5);
        assert_eq!(o.hostname, "w1@h");
        assert_eq!(o.visibility_timeout, Duration::from_secs(60));
        assert!(o.track_started);
        assert_eq!(o.max_tasks_per_child, Some(7));
        assert_eq!(o.max_memory_per_child, None);
        assert_eq!(o.max_redeliveries, 3);
        assert_eq!(o.soft_shutdown_timeout, Some(Duration::from_millis(2500)));
        assert!(!o.inline_brief);
        let c = Config::from_sources(None, |_| None).unwrap();
        assert_eq!(WorkerOptions::from_config(&c).soft_shutdown_timeout, None);
        assert!(WorkerOptions::from_config(&c).inline_brief);
    }
}
