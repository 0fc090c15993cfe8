//! The web side of celeriac: Celery's task-status view, a JSON API, a live dashboard, and
//! Prometheus metrics, on any broker (the embedded SQLite one included).
//!
//! [`Web`] is built from a broker, a result backend and the configuration (the facade's
//! `app.web()` does it from an app, and `my-app dashboard` serves it). It is a consumer of the broker's broadcast channel (remote control and events) and of
//! the result backend, never of worker internals, so it shows and steers a cluster of Python
//! Celery workers as well as celeriac ones.
//!
//! ```no_run
//! # async fn demo(app: &celeriac::App) -> std::io::Result<()> {
//! use celeriac::web::WebOptions;
//! let web = app.web().options(WebOptions::default());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:5555").await?;
//! web.serve(listener).await
//! # }
//! ```
//!
//! # Endpoints
//!
//! | method and path | what |
//! |---|---|
//! | `GET /celery/<id>/status/` | Celery's old status view: `{"task": {"id", "status", "result"}}`, with `exc` and `traceback` on failure, and `date_done`, `children`, `retries` |
//! | `GET /api/tasks?state=&name=&worker=&search=&before=&limit=` | recent tasks seen in events, newest first |
//! | `GET /api/tasks/<id>` | one task: the stored result merged with what events said |
//! | `POST /api/tasks/<name>` | send a task by name: `{"args": [...], "kwargs": {...}, "options": {"countdown", "eta", "expires", "queue", "priority", "task_id"}}` |
//! | `POST /api/tasks/<id>/revoke` | `{"terminate": bool, "signal": "SIGTERM"}` |
//! | `GET /api/groups/<id>` | a group's progress: `total`, `completed`, `failed`, `progress` |
//! | `GET /api/workers` | workers from events; `?refresh=1` also asks them (`stats`, `active_queues`, `registered`) |
//! | `POST /api/control/<method>` | `{"destination": [...], "arguments": {...}}` for `rate_limit`, `time_limit`, `pool_grow`, `pool_shrink`, `autoscale`, `add_consumer`, `cancel_consumer`, `enable_events`, `disable_events`, `ping`, `shutdown` |
//! | `GET /api/queues`, `POST /api/queues/<name>/purge` | queues with their message counts |
//! | `GET /api/dead`, `GET /api/dead/<queue>` | dead letters by queue, and one queue's letters |
//! | `POST /api/dead/<queue>/requeue`, `POST /api/dead/<queue>/purge` | `{"ids": [...]}` (none: all) |
//! | `GET /api/beat`, `POST /api/beat/<name>/{pause,resume,trigger}` | periodic-task entries |
//! | `GET /api/stats` | totals and the chart series (5 s buckets, one hour) |
//! | `GET /api/info` | what the dashboard needs: `version`, `read_only`, `broker`, `events`, `beat`, `preview` |
//! | `GET /api/stream` | server-sent events: a `tick` each second with totals, workers and the ids of changed tasks |
//! | `GET /metrics` | Prometheus text format (see [`metrics`]) |
//! | `GET /healthz` | `{"ok": true, "broker": ..., "backend": ...}` (no authentication) |
//! | `GET /` | the dashboard |
//!
//! Errors are JSON, `{"error": "..."}`, with a 4xx or 5xx status. Bad input is a 400, never a
//! panic.
//!
//! # Safety
//!
//! The CLI binds `127.0.0.1` unless told otherwise. [`WebOptions::auth`] asks every request
//! (but `/healthz`) for HTTP basic credentials or a bearer token; [`WebOptions::read_only`]
//! refuses every change. A request that changes something must not come from another site:
//! its `Origin` (when sent) must name this server, and it must carry `Content-Type:
//! application/json` or an `X-Requested-With` header, which a cross-site form cannot send.
//! Argument and result previews are cut at [`WebOptions::preview`] characters.

pub mod cluster;
pub mod metrics;

mod api;
mod assets;
mod guard;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celeriac_core::broadcast::Clock;
use celeriac_core::security::BodySigner;
use celeriac_core::{Config, DynBackend, DynBeatStore, DynBroker};
use tokio::sync::broadcast;

pub use cluster::{Cluster, TaskFilter, TaskView, WorkerView};
pub use guard::Auth;

/// How the server behaves.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WebOptions {
    /// Refuse every request that changes something (send, revoke, control, purge, requeue,
    /// beat). Default false.
    pub read_only: bool,
    /// Credentials every request but `/healthz` must carry. Default none.
    pub auth: Option<Auth>,
    /// Tasks kept in memory for the task list (the least recently updated go first).
    /// Default 100,000, as Flower's.
    pub max_tasks: usize,
    /// Ask the workers to send task events (`enable_events`) at start and every minute, as
    /// Flower does. Default true.
    pub enable_events: bool,
    /// How often queue depths are sampled. Default 5 s.
    pub sample_interval: Duration,
    /// Longest argument, result or traceback preview returned, in characters. Default 2,000.
    pub preview: usize,
}

impl Default for WebOptions {
    fn default() -> Self {
        WebOptions {
            read_only: false,
            auth: None,
            max_tasks: 100_000,
            enable_events: true,
            sample_interval: Duration::from_secs(5),
            preview: 2_000,
        }
    }
}

/// The web server's state: the broker, the backend, what events said; see the
/// [crate docs](crate).
#[derive(Debug, Clone)]
pub struct Web {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    broker: DynBroker,
    backend: DynBackend,
    config: Config,
    beat: Option<celeriac_beat::Control>,
    options: WebOptions,
    /// Signs sent tasks and control requests under `auth` ([`Web::signer`]).
    signer: Option<Arc<dyn BodySigner>>,
    cluster: Mutex<Cluster>,
    clock: Clock,
    /// The name this server sends under (`task-sent` events, control requests).
    origin: String,
    /// Ids of tasks changed since the last tick, for the stream.
    changed: Mutex<Vec<String>>,
    /// One message per tick, to the stream's subscribers.
    ticks: broadcast::Sender<String>,
    /// Queue names learnt beside the broker's own list: the configured ones and those the
    /// workers say they consume (`active_queues`). A broker that cannot list its queues
    /// (RabbitMQ without the management API) still shows these.
    queue_names: Mutex<std::collections::BTreeSet<String>>,
}

impl Shared {
    /// The broker's broadcast channels, control signed under `auth` (see
    /// [`WebOptions::signer`]).
    fn channels(&self) -> Option<celeriac_core::broadcast::Signed<'_>> {
        let b = self.broker.broadcast()?;
        Some(celeriac_core::broadcast::Signed::new(
            b,
            self.signer.clone(),
        ))
    }
}

impl Web {
    /// A server over `broker` and `backend`, configured by `config` (default queue, routes,
    /// serializer, size limit).
    pub fn new(broker: DynBroker, backend: DynBackend, config: Config) -> Self {
        Self::build(broker, backend, config, None, WebOptions::default(), None)
    }

    fn build(
        broker: DynBroker,
        backend: DynBackend,
        config: Config,
        beat: Option<celeriac_beat::Control>,
        options: WebOptions,
        signer: Option<Arc<dyn BodySigner>>,
    ) -> Self {
        let (ticks, _) = broadcast::channel(16);
        let mut queue_names = std::collections::BTreeSet::new();
        queue_names.insert(config.default_queue.clone());
        queue_names.extend(config.worker.queues.iter().cloned());
        queue_names.extend(config.routes.values().cloned());
        queue_names.extend(config.celery_worker_queues.iter().cloned());
        Web {
            shared: Arc::new(Shared {
                broker,
                backend,
                config,
                beat,
                signer,
                cluster: Mutex::new(Cluster::new(options.max_tasks)),
                options,
                clock: Clock::new(),
                origin: format!("web{}@{}", std::process::id(), celeriac_core::hostname()),
                changed: Mutex::new(Vec::new()),
                ticks,
                queue_names: Mutex::new(queue_names),
            }),
        }
    }

    fn rebuild(self, f: impl FnOnce(&mut Option<celeriac_beat::Control>, &mut WebOptions)) -> Self {
        let s = &self.shared;
        let mut beat = s.beat.clone();
        let mut options = s.options.clone();
        f(&mut beat, &mut options);
        Self::build(
            s.broker.clone(),
            s.backend.clone(),
            s.config.clone(),
            beat,
            options,
            s.signer.clone(),
        )
    }

    /// Under serializer `auth`: signs the tasks this server sends and its control requests
    /// with `signer`, and reads only replies signed by a trusted key (workers under `auth`
    /// obey nothing else). `App::web` sets the app's.
    #[must_use]
    pub fn signer(self, signer: Arc<dyn BodySigner>) -> Self {
        let s = &self.shared;
        Self::build(
            s.broker.clone(),
            s.backend.clone(),
            s.config.clone(),
            s.beat.clone(),
            s.options.clone(),
            Some(signer),
        )
    }

    /// Shows and changes the periodic-task entries of `store` (`/api/beat`): those added at
    /// run time; [`Web::beat`] also shows the entries declared in code and config.
    #[must_use]
    pub fn beat_store(self, store: DynBeatStore) -> Self {
        self.beat(celeriac_beat::Control::new(store, Vec::new()))
    }

    /// Shows and changes the periodic-task entries `control` knows (`/api/beat`).
    #[must_use]
    pub fn beat(self, control: celeriac_beat::Control) -> Self {
        self.rebuild(|beat, _| *beat = Some(control))
    }

    /// Uses `options`.
    #[must_use]
    pub fn options(self, options: WebOptions) -> Self {
        self.rebuild(|_, o| *o = options)
    }

    /// The options in use.
    pub fn web_options(&self) -> &WebOptions {
        &self.shared.options
    }

    /// The cluster state the events built (for tests and embedding).
    pub fn with_cluster<R>(&self, f: impl FnOnce(&Cluster) -> R) -> R {
        f(&self.shared.cluster.lock().expect("cluster lock"))
    }

    /// The routes (API, status view, metrics, dashboard) with the authentication, read-only
    /// and cross-site guards, to serve or to nest in an app's own router. Nothing feeds the
    /// cluster state until [`Web::start`] (which [`Web::serve`] calls).
    pub fn router(&self) -> axum::Router {
        guard::wrap(
            api::routes(self.clone()).merge(assets::routes()),
            self.clone(),
        )
    }

    /// The routes of [`Web::router`] but the dashboard page and its assets (so the status
    /// view, the API, `/metrics` and `/healthz`), behind the same guards: for an app that
    /// serves its own pages at `/` and merges these into its router. Like [`Web::router`],
    /// nothing feeds the cluster state until [`Web::start`].
    pub fn api_router(&self) -> axum::Router {
        guard::wrap(api::routes(self.clone()), self.clone())
    }

    /// Starts reading events, sampling queues and (by default) enabling task events on the
    /// workers; these stop when the returned handle is dropped.
    pub fn start(&self) -> Running {
        let mut tasks = Vec::new();
        if self.shared.broker.broadcast().is_some() {
            tasks.push(tokio::spawn(api::read_events(self.clone())));
            if self.shared.options.enable_events {
                tasks.push(tokio::spawn(api::keep_events_enabled(self.clone())));
            }
        } else {
            tracing::warn!(
                broker = self.shared.broker.driver(),
                "this broker carries no events: the dashboard shows queues and results only"
            );
        }
        tasks.push(tokio::spawn(api::sample(self.clone())));
        tasks.push(tokio::spawn(api::tick(self.clone())));
        Running(tasks)
    }

    /// Serves on `listener` until the process ends (or the future is dropped).
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let _running = self.start();
        axum::serve(listener, self.router()).await
    }

    /// Queue → dead-letter count, for the metrics and the API.
    async fn dead_counts(&self) -> Vec<(String, u64)> {
        let broker = &*self.shared.broker;
        let mut out = Vec::new();
        if let Ok(queues) = celeriac_worker::dead::dead_queues(broker).await {
            for dq in queues {
                if let Ok(s) = broker.stats(&dq).await {
                    let q = dq
                        .strip_suffix(celeriac_worker::dead::SUFFIX)
                        .unwrap_or(&dq)
                        .to_owned();
                    out.push((q, s.total()));
                }
            }
        }
        out
    }

    fn cluster(&self) -> std::sync::MutexGuard<'_, Cluster> {
        self.shared.cluster.lock().expect("cluster lock")
    }
}

/// The background work of a started [`Web`]; dropping it stops it.
#[derive(Debug)]
pub struct Running(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Cuts `s` to `max` characters, marking the cut.
fn preview(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

impl Web {
    /// Remembers the queues named in an `active_queues` answer (a list of kombu queue
    /// declarations, each with a `name`).
    pub(crate) fn learn_queues(&self, answer: &serde_json::Value) {
        let names = answer
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|q| q.get("name").and_then(serde_json::Value::as_str))
            .filter(|n| !n.is_empty() && !celeriac_core::broadcast::is_internal_queue(n));
        let mut known = self.shared.queue_names.lock().expect("queue names lock");
        for n in names {
            if known.len() >= MAX_LEARNT_QUEUES {
                break;
            }
            known.insert(n.to_owned());
        }
    }
}

/// Queue names learnt from the workers are capped (a worker's answer is remote input).
const MAX_LEARNT_QUEUES: usize = 1000;

/// Queue → stats for the queues worth showing: the broker's and those configured or learnt
/// from the workers, without dead-letter queues and kombu's remote-control and event queues.
async fn queue_stats(web: &Web) -> BTreeMap<String, celeriac_core::QueueStats> {
    let broker = &web.shared.broker;
    let mut out = BTreeMap::new();
    let mut queues: std::collections::BTreeSet<String> = web
        .shared
        .queue_names
        .lock()
        .expect("queue names lock")
        .clone();
    if let Ok(listed) = broker.queues().await {
        queues.extend(listed);
    }
    for q in queues {
        if q.ends_with(celeriac_worker::dead::SUFFIX)
            || celeriac_core::broadcast::is_internal_queue(&q)
        {
            continue;
        }
        if let Ok(s) = broker.stats(&q).await {
            out.insert(q, s);
        }
    }
    out
}
