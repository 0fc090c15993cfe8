//! The routes and the background work behind them; see the [crate docs](crate) for the list.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use celeriac_core::broadcast::Broadcast as _;
use celeriac_core::broadcast::control::{Request as ControlRequest, collect};
use celeriac_core::canvas::{Call, SendOptions, Sender, build_call};
use celeriac_core::meta::RemoteError;
use celeriac_core::{Error, ErrorKind, PublishOptions, TaskMeta, TaskOptions, TaskState};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::cluster::{BUCKET_SECS, TaskFilter};
use crate::{Web, preview, queue_stats};

/// A JSON error response.
pub(crate) fn error(status: StatusCode, message: &str) -> (StatusCode, Json<Value>) {
    (status, Json(json!({"error": message})))
}

/// A celeriac error as an HTTP error: bad input is the client's fault, the rest the server's.
struct ApiError(StatusCode, String);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match e.kind() {
            ErrorKind::Config | ErrorKind::Protocol => StatusCode::BAD_REQUEST,
            ErrorKind::UnknownTask => StatusCode::NOT_FOUND,
            ErrorKind::Unsupported => StatusCode::NOT_IMPLEMENTED,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(status, format!("{e:#}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.0, &self.1).into_response()
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

type ApiResult = Result<Response, ApiError>;

fn ok(v: Value) -> ApiResult {
    Ok(Json(v).into_response())
}

/// Reads a JSON object body; an empty body is an empty object.
fn body_object(body: &Bytes) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(bad("the body must be a JSON object")),
        Err(e) => Err(bad(format!("the body is not valid JSON: {e}"))),
    }
}

pub(crate) fn routes(web: Web) -> Router {
    Router::new()
        .route("/celery/{id}/status/", get(status_view))
        .route("/celery/{id}/status", get(status_view))
        .route("/api/tasks", get(list_tasks))
        .route("/api/tasks/{key}", get(get_task).post(send_task))
        .route("/api/tasks/{id}/revoke", post(revoke))
        .route("/api/groups/{id}", get(group))
        .route("/api/workers", get(workers))
        .route("/api/control/{method}", post(control))
        .route("/api/queues", get(queues))
        .route("/api/queues/{name}/purge", post(purge_queue))
        .route("/api/dead", get(dead_overview))
        .route("/api/dead/{queue}", get(dead_list))
        .route("/api/dead/{queue}/requeue", post(dead_requeue))
        .route("/api/dead/{queue}/purge", post(dead_purge))
        .route("/api/beat", get(beat_list))
        .route("/api/beat/{name}/{action}", post(beat_action))
        .route("/api/stats", get(stats))
        .route("/api/info", get(info))
        .route("/api/stream", get(stream))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .with_state(web)
}

async fn not_found() -> impl IntoResponse {
    error(StatusCode::NOT_FOUND, "no such endpoint")
}

fn exception_fields(meta: &TaskMeta) -> (String, String) {
    let e = RemoteError::from_exception_map(&meta.result);
    let args: Vec<String> = e.exc_args.iter().map(py_repr).collect();
    let repr = format!("{}({})", e.exc_type, args.join(", "));
    (repr, format!("{}.{}", e.exc_module, e.exc_type))
}

/// A short Python-like repr of a JSON value (strings quoted as Python quotes them).
fn py_repr(v: &Value) -> String {
    celeriac_core::broadcast::event::py_repr(v, 1024)
}

/// Celery's status view (`celery/<task_id>/status/`), as the old Django view answered it.
async fn status_view(State(web): State<Web>, Path(id): Path<String>) -> ApiResult {
    let meta = web
        .shared
        .backend
        .get(&id)
        .await?
        .unwrap_or_else(|| TaskMeta::pending(id.clone()));
    let mut task = Map::new();
    task.insert("id".into(), json!(id));
    task.insert("status".into(), json!(meta.status.as_str()));
    if matches!(
        meta.status,
        TaskState::Failure | TaskState::Retry | TaskState::Revoked
    ) && meta.result.is_object()
    {
        let (repr, exc) = exception_fields(&meta);
        task.insert("result".into(), json!(repr));
        task.insert("exc".into(), json!(exc));
        task.insert(
            "traceback".into(),
            json!(
                meta.traceback
                    .as_deref()
                    .map(|t| preview(t, web.shared.options.preview))
            ),
        );
    } else {
        task.insert("result".into(), meta.result.clone());
    }
    task.insert(
        "date_done".into(),
        json!(meta.date_done.map(celeriac_core::time::format)),
    );
    task.insert("children".into(), json!(meta.children));
    task.insert("retries".into(), json!(meta.retries.unwrap_or(0)));
    ok(json!({ "task": task }))
}

#[derive(Deserialize)]
struct TasksQuery {
    state: Option<String>,
    name: Option<String>,
    worker: Option<String>,
    search: Option<String>,
    before: Option<u64>,
    limit: Option<usize>,
}

async fn list_tasks(
    State(web): State<Web>,
    q: Result<Query<TasksQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| bad(e.body_text()))?;
    let filter = TaskFilter {
        state: q.state.filter(|s| !s.is_empty()),
        name: q.name.filter(|s| !s.is_empty()),
        worker: q.worker.filter(|s| !s.is_empty()),
        search: q.search.filter(|s| !s.is_empty()),
        before: q.before,
        limit: q.limit.unwrap_or(100).clamp(1, 1000),
    };
    let max = web.shared.options.preview;
    let (tasks, kept) = {
        let c = web.cluster();
        (c.tasks(&filter), c.task_count())
    };
    let tasks: Vec<Value> = tasks
        .into_iter()
        .map(|mut t| {
            for v in [&mut t.args, &mut t.kwargs, &mut t.result, &mut t.exception]
                .into_iter()
                .flatten()
            {
                *v = preview(v, max.min(200));
            }
            t.traceback = None;
            serde_json::to_value(t).unwrap_or(Value::Null)
        })
        .collect();
    ok(json!({"tasks": tasks, "kept": kept}))
}

/// One task: the stored record (authoritative for state and result) and what events said.
async fn get_task(State(web): State<Web>, Path(id): Path<String>) -> ApiResult {
    let max = web.shared.options.preview;
    let stored = web.shared.backend.get(&id).await?;
    let seen = web.cluster().task(&id).cloned();
    if stored.is_none() && seen.is_none() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no task {id} is stored or was seen (an unknown id is PENDING to Celery)"),
        ));
    }
    let mut out = Map::new();
    out.insert("id".into(), json!(id));
    let state = stored
        .as_ref()
        .filter(|m| m.status != TaskState::Pending)
        .map(|m| m.status.as_str().to_owned())
        .or_else(|| seen.as_ref().map(|t| t.state.clone()))
        .unwrap_or_else(|| "PENDING".to_owned());
    out.insert("state".into(), json!(state));
    if let Some(m) = &stored {
        if matches!(
            m.status,
            TaskState::Failure | TaskState::Retry | TaskState::Revoked
        ) && m.result.is_object()
        {
            let (repr, exc) = exception_fields(m);
            out.insert("exception".into(), json!(preview(&repr, max)));
            out.insert("exc".into(), json!(exc));
        } else {
            let text = m.result.to_string();
            out.insert("result".into(), json!(preview(&text, max)));
        }
        out.insert(
            "traceback".into(),
            json!(m.traceback.as_deref().map(|t| preview(t, max))),
        );
        out.insert(
            "date_done".into(),
            json!(m.date_done.map(celeriac_core::time::format)),
        );
        for (k, v) in [
            ("name", json!(m.name)),
            ("worker", json!(m.worker)),
            ("queue", json!(m.queue)),
            ("retries", json!(m.retries)),
            ("parent_id", json!(m.parent_id)),
            ("group_id", json!(m.group_id)),
        ] {
            if !v.is_null() {
                out.insert(k.into(), v);
            }
        }
        if let Some(a) = &m.args {
            out.insert("args".into(), json!(preview(&py_repr(&json!(a)), max)));
        }
        if let Some(k) = &m.kwargs {
            out.insert("kwargs".into(), json!(preview(&py_repr(&json!(k)), max)));
        }
        let children: Vec<Value> = m
            .children
            .iter()
            .filter_map(|c| child_id(c).map(Value::from))
            .collect();
        out.insert("children".into(), Value::Array(children));
    }
    if let Some(t) = seen {
        let mut seen = serde_json::to_value(&t).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut seen {
            for v in m.values_mut() {
                if let Value::String(s) = v {
                    *s = preview(s, max);
                }
            }
        }
        for key in [
            "name",
            "worker",
            "queue",
            "retries",
            "parent_id",
            "root_id",
            "args",
            "kwargs",
            "exception",
            "traceback",
            "result",
            "runtime",
            "sent",
            "received",
            "started",
            "finished",
            "eta",
            "expires",
        ] {
            if !out.contains_key(key)
                && let Some(v) = seen.get(key).filter(|v| !v.is_null())
            {
                out.insert(key.into(), v.clone());
            }
        }
        let children = out.entry("children").or_insert_with(|| json!([]));
        if let Value::Array(list) = children {
            for c in t.children {
                if !list.iter().any(|x| x == &json!(c)) {
                    list.push(json!(c));
                }
            }
        }
        out.insert("events".into(), seen);
    }
    ok(Value::Object(out))
}

/// A child's id in a stored `children` list: `[[id, parent], null]` (Celery's tuple form) or
/// a bare id.
fn child_id(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Array(a) => a.first().and_then(|x| match x {
            Value::String(s) => Some(s.as_str()),
            Value::Array(inner) => inner.first().and_then(Value::as_str),
            _ => None,
        }),
        _ => None,
    }
}

/// Sends a task by name, with Celery's option names; returns its id (202).
async fn send_task(State(web): State<Web>, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let body = body_object(&body)?;
    let args = match body.get("args") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err(bad("args must be a JSON array")),
    };
    let kwargs = match body.get("kwargs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(bad("kwargs must be a JSON object")),
    };
    let options = match body.get("options") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(bad("options must be a JSON object")),
    };
    if let Some(unknown) = body
        .keys()
        .find(|k| !matches!(k.as_str(), "args" | "kwargs" | "options"))
    {
        return Err(bad(format!(
            "unknown field {unknown:?} (known: args, kwargs, options)"
        )));
    }
    if name.is_empty() || name.len() > 512 {
        return Err(bad("the task name must be 1 to 512 bytes"));
    }
    let s = &web.shared;
    let options = SendOptions::from_wire(&options)?;
    let sender = Sender::new(s.config.serializer, Some(&s.origin)).signed_by(s.signer.as_deref());
    let call = Call::new(&name, &args, &kwargs, &options);
    let out = build_call(call, &TaskOptions::default(), None, &sender)?;
    out.message.check_size(s.config.max_message_size)?;
    let queue = out
        .queue
        .clone()
        .or_else(|| s.config.route(&name).map(str::to_owned))
        .unwrap_or_else(|| s.config.default_queue.clone());
    // Sent as Celery's client sends it: a delay travels in the `eta` header, which Python and
    // celeriac workers both honour.
    let publish = PublishOptions::default().priority(out.priority);
    s.broker.declare(&queue).await?;
    s.broker.publish(&queue, &out.message, publish).await?;
    let id = out.message.id().to_owned();
    tracing::info!(task_id = %id, task_name = %name, queue = %queue, "task sent from the web");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"task_id": id, "queue": queue})),
    )
        .into_response())
}

/// Revokes a task: REVOKED stored (unless it finished), and the workers told.
async fn revoke(State(web): State<Web>, Path(id): Path<String>, body: Bytes) -> ApiResult {
    let body = body_object(&body)?;
    let terminate = match body.get("terminate") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("terminate must be true or false")),
    };
    let signal = match body.get("signal") {
        None | Some(Value::Null) => celeriac_core::backend::revoke::Signal::default(),
        Some(Value::String(s)) => s.parse().map_err(ApiError::from)?,
        Some(_) => return Err(bad("signal must be a signal name, e.g. SIGTERM")),
    };
    let s = &web.shared;
    let existing = s.backend.get(&id).await?;
    let stored = if existing.as_ref().is_some_and(|m| m.status.is_ready()) {
        false
    } else {
        let meta =
            celeriac_core::backend::revoke::revoked_meta(id.clone(), terminate.then_some(signal));
        s.backend.store(&meta).await?;
        true
    };
    let mut told = false;
    if let Some(channels) = s.channels() {
        let mut args = Map::new();
        args.insert("task_id".into(), json!([id]));
        args.insert("terminate".into(), json!(terminate));
        args.insert("signal".into(), json!(signal.name()));
        let m = ControlRequest::new("revoke", args).to_message(s.clock.forward(), None);
        channels.send_control(&m).await?;
        told = true;
    }
    ok(json!({"id": id, "stored": stored, "broadcast": told, "terminate": terminate}))
}

async fn group(State(web): State<Web>, Path(id): Path<String>) -> ApiResult {
    let backend = &web.shared.backend;
    let Some(ids) = backend.restore_group(&id).await? else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no group {id} is stored"),
        ));
    };
    let metas = backend.get_many(&ids).await?;
    let mut completed = 0;
    let mut failed = 0;
    let mut tasks = Vec::with_capacity(ids.len());
    for (tid, meta) in ids.iter().zip(&metas) {
        let state = meta
            .as_ref()
            .map_or(TaskState::Pending, |m| m.status.clone());
        if state.is_ready() {
            completed += 1;
        }
        if matches!(state, TaskState::Failure | TaskState::Revoked) {
            failed += 1;
        }
        tasks.push(json!({"id": tid, "state": state.as_str()}));
    }
    let total = ids.len();
    let progress = if total == 0 {
        1.0
    } else {
        completed as f64 / total as f64
    };
    ok(json!({
        "id": id, "total": total, "completed": completed, "failed": failed,
        "ready": completed == total, "progress": progress, "tasks": tasks,
    }))
}

#[derive(Deserialize)]
struct WorkersQuery {
    refresh: Option<String>,
}

/// The timeout of the requests the API sends to workers.
const ASK: Duration = Duration::from_secs(1);

async fn ask(
    web: &Web,
    method: &str,
    arguments: Map<String, Value>,
    destination: Option<Vec<String>>,
) -> Result<BTreeMap<String, Value>, ApiError> {
    let s = &web.shared;
    let Some(channels) = s.channels() else {
        return Err(ApiError(
            StatusCode::NOT_IMPLEMENTED,
            format!("the {} broker carries no remote control", s.broker.driver()),
        ));
    };
    let expected = destination.as_ref().map(Vec::len);
    let mut request = ControlRequest::new(method, arguments);
    request.destination = destination;
    let replies = collect(&channels, &s.clock, request, ASK, expected).await?;
    Ok(replies.into_iter().map(|r| (r.node, r.answer)).collect())
}

async fn workers(
    State(web): State<Web>,
    q: Result<Query<WorkersQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| bad(e.body_text()))?;
    let mut list: BTreeMap<String, Value> = web
        .cluster()
        .workers()
        .into_iter()
        .map(|w| {
            (
                w.hostname.clone(),
                serde_json::to_value(w).unwrap_or(Value::Null),
            )
        })
        .collect();
    let refresh = q
        .refresh
        .as_deref()
        .is_some_and(|r| !matches!(r, "" | "0" | "false"));
    if refresh {
        // The three questions at once: each waits out the reply window.
        let (stats, queues, registered) = tokio::join!(
            ask(&web, "stats", Map::new(), None),
            ask(&web, "active_queues", Map::new(), None),
            ask(&web, "registered", Map::new(), None),
        );
        let answers = [
            ("stats", stats?),
            ("active_queues", queues?),
            ("registered", registered?),
        ];
        for (method, replies) in answers {
            for (node, answer) in replies {
                if method == "active_queues" {
                    web.learn_queues(&answer);
                }
                let w = list
                    .entry(node.clone())
                    .or_insert_with(|| json!({"hostname": node, "online": true}));
                if let Value::Object(m) = w {
                    m.insert(method.to_owned(), answer);
                }
            }
        }
    }
    ok(json!({"workers": list.into_values().collect::<Vec<_>>()}))
}

/// The control commands the API relays (`inspect`-like reads included).
const CONTROL: [&str; 11] = [
    "rate_limit",
    "time_limit",
    "pool_grow",
    "pool_shrink",
    "autoscale",
    "add_consumer",
    "cancel_consumer",
    "enable_events",
    "disable_events",
    "ping",
    "shutdown",
];

async fn control(State(web): State<Web>, Path(method): Path<String>, body: Bytes) -> ApiResult {
    if !CONTROL.contains(&method.as_str()) {
        return Err(bad(format!(
            "unknown control command {method:?} (known: {})",
            CONTROL.join(", ")
        )));
    }
    let body = body_object(&body)?;
    let arguments = match body.get("arguments") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(bad("arguments must be a JSON object")),
    };
    let destination = match body.get("destination") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|d| d.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("destination must be a list of node names"))?,
        )
        .filter(|d| !d.is_empty()),
        Some(_) => return Err(bad("destination must be a list of node names")),
    };
    if method == "shutdown" {
        // Workers do not answer a shutdown: send it and say so.
        let s = &web.shared;
        let Some(channels) = s.channels() else {
            return Err(ApiError(
                StatusCode::NOT_IMPLEMENTED,
                "no remote control on this broker".into(),
            ));
        };
        let mut r = ControlRequest::new("shutdown", arguments);
        r.destination = destination;
        channels
            .send_control(&r.to_message(s.clock.forward(), None))
            .await?;
        return ok(json!({"sent": true, "replies": {}}));
    }
    let replies = ask(&web, &method, arguments, destination).await?;
    ok(json!({"replies": replies}))
}

async fn queues(State(web): State<Web>) -> ApiResult {
    let stats = queue_stats(&web).await;
    let dead: BTreeMap<String, u64> = web.dead_counts().await.into_iter().collect();
    let list: Vec<Value> = stats
        .iter()
        .map(|(q, s)| {
            json!({"name": q, "ready": s.ready, "delayed": s.delayed, "unacked": s.unacked,
                   "dead": dead.get(q).copied().unwrap_or(0)})
        })
        .collect();
    ok(json!({"queues": list}))
}

async fn purge_queue(State(web): State<Web>, Path(name): Path<String>) -> ApiResult {
    let n = web.shared.broker.purge(&name).await?;
    ok(json!({"queue": name, "purged": n}))
}

async fn dead_overview(State(web): State<Web>) -> ApiResult {
    let counts = web.dead_counts().await;
    let list: Vec<Value> = counts
        .into_iter()
        .map(|(q, n)| json!({"queue": q, "dead_queue": celeriac_worker::dead::dead_queue(&q), "count": n}))
        .collect();
    ok(json!({"queues": list}))
}

#[derive(Deserialize)]
struct DeadQuery {
    limit: Option<usize>,
}

async fn dead_list(
    State(web): State<Web>,
    Path(queue): Path<String>,
    q: Result<Query<DeadQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| bad(e.body_text()))?;
    let queue = queue
        .strip_suffix(celeriac_worker::dead::SUFFIX)
        .unwrap_or(&queue)
        .to_owned();
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let letters = celeriac_worker::dead::list(&*web.shared.broker, &queue, limit).await?;
    let max = web.shared.options.preview.min(500);
    let list: Vec<Value> = letters
        .iter()
        .map(|d| {
            let body = d
                .message
                .decode_body()
                .map(|b| preview(&py_repr(&json!(b.args)), max))
                .unwrap_or_else(|e| format!("(undecodable: {e})"));
            json!({
                "id": d.id(), "task": d.task(), "queue": d.queue, "reason": d.reason,
                "dead_at": d.dead_at, "worker": d.worker, "deliveries": d.deliveries,
                "args": body,
            })
        })
        .collect();
    ok(json!({"queue": queue, "letters": list}))
}

async fn dead_requeue(State(web): State<Web>, Path(queue): Path<String>, body: Bytes) -> ApiResult {
    let body = body_object(&body)?;
    let ids = match body.get("ids") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|d| d.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("ids must be a list of task ids"))?,
        ),
        Some(_) => return Err(bad("ids must be a list of task ids")),
    };
    let queue = queue
        .strip_suffix(celeriac_worker::dead::SUFFIX)
        .unwrap_or(&queue)
        .to_owned();
    let s = &web.shared;
    let n = celeriac_worker::dead::requeue(&*s.broker, Some(&*s.backend), &queue, ids.as_deref())
        .await?;
    ok(json!({"queue": queue, "requeued": n}))
}

async fn dead_purge(State(web): State<Web>, Path(queue): Path<String>) -> ApiResult {
    let queue = queue
        .strip_suffix(celeriac_worker::dead::SUFFIX)
        .unwrap_or(&queue)
        .to_owned();
    let n = celeriac_worker::dead::purge(&*web.shared.broker, &queue).await?;
    ok(json!({"queue": queue, "purged": n}))
}

fn beat(web: &Web) -> Result<&celeriac_beat::Control, ApiError> {
    web.shared.beat.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_IMPLEMENTED,
            "no beat store is configured for this server".into(),
        )
    })
}

async fn beat_list(State(web): State<Web>) -> ApiResult {
    let entries = beat(&web)?.list().await?;
    let list: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "name": e.name, "task": e.task, "schedule": e.schedule, "declared": e.declared,
                "paused": e.paused, "total_run_count": e.total_run_count,
                "last_run_at": e.last_run_at.map(celeriac_core::time::format),
                "next_run_at": e.next_run_at.map(celeriac_core::time::format),
                "invalid": e.invalid,
            })
        })
        .collect();
    ok(json!({"entries": list}))
}

async fn beat_action(
    State(web): State<Web>,
    Path((name, action)): Path<(String, String)>,
) -> ApiResult {
    let control = beat(&web)?;
    let known = control.list().await?.iter().any(|e| e.name == name);
    if !known {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no beat entry {name:?}"),
        ));
    }
    match action.as_str() {
        "pause" => control.pause(&name).await?,
        "resume" => control.resume(&name).await?,
        "trigger" => control.trigger(&name).await?,
        other => {
            return Err(bad(format!(
                "unknown beat action {other:?} (known: pause, resume, trigger)"
            )));
        }
    }
    ok(json!({"name": name, "done": action}))
}

async fn stats(State(web): State<Web>) -> ApiResult {
    let c = web.cluster();
    let series: Vec<Value> = c
        .buckets()
        .map(|b| serde_json::to_value(b).unwrap_or(Value::Null))
        .collect();
    let workers = c.workers();
    ok(json!({
        "totals": c.totals(),
        "tasks_kept": c.task_count(),
        "workers_online": workers.iter().filter(|w| w.online).count(),
        "workers": workers.len(),
        "bucket_secs": BUCKET_SECS,
        "series": series,
        "queues": c.queues.iter().map(|(q, s)| (q.clone(), json!({"ready": s.ready, "delayed": s.delayed, "unacked": s.unacked}))).collect::<Map<String, Value>>(),
    }))
}

/// What the dashboard needs to know about this server: whether it may change anything, which
/// broker it reads, whether that broker carries events and remote control, whether beat
/// entries are served.
async fn info(State(web): State<Web>) -> ApiResult {
    let s = &web.shared;
    ok(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "read_only": s.options.read_only,
        "broker": s.broker.driver(),
        "events": s.broker.broadcast().is_some(),
        "beat": s.beat.is_some(),
        "preview": s.options.preview,
        "default_queue": s.config.default_queue,
        "bucket_secs": BUCKET_SECS,
    }))
}

/// Server-sent events: one `tick` a second (see [`tick`]); a subscriber too slow for the
/// channel skips ticks.
async fn stream(
    State(web): State<Web>,
) -> Sse<impl futures_core::Stream<Item = Result<SseEvent, Infallible>>> {
    let rx = web.shared.ticks.subscribe();
    let ticks = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(t) => return Some((Ok(SseEvent::default().event("tick").data(t)), rx)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(ticks).keep_alive(KeepAlive::default())
}

async fn metrics(State(web): State<Web>) -> Response {
    let dead = web.dead_counts().await;
    let text = crate::metrics::render(&web.cluster(), &dead);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn healthz(State(web): State<Web>) -> Response {
    let s = &web.shared;
    let broker = s.broker.stats(&s.config.default_queue).await;
    let backend = s.backend.get("celeriac-healthz-probe").await;
    let ok = broker.is_ok() && backend.is_ok();
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let say = |r: Result<(), Error>| match r {
        Ok(()) => json!("ok"),
        Err(e) => json!(format!("{e:#}")),
    };
    (
        status,
        Json(json!({
            "ok": ok,
            "broker": say(broker.map(drop)),
            "backend": say(backend.map(drop)),
        })),
    )
        .into_response()
}

/// Reads the event stream into the cluster state, reconnecting after errors.
pub(crate) async fn read_events(web: Web) {
    let Some(channels) = web.shared.broker.broadcast() else {
        return;
    };
    loop {
        let mut inbox = match channels.event_inbox("#").await {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot read events; trying again in 2 s");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        loop {
            match inbox.next().await {
                Ok(Some(m)) => {
                    let events = celeriac_core::broadcast::event::Event::from_message(&m);
                    let mut changed = Vec::new();
                    {
                        let mut c = web.cluster();
                        for e in events.into_iter().flatten() {
                            if let Some(id) = c.apply(&e) {
                                changed.push(id);
                            }
                        }
                    }
                    if !changed.is_empty() {
                        let mut ch = web.shared.changed.lock().expect("changed lock");
                        ch.extend(changed);
                        let len = ch.len();
                        if len > 1000 {
                            ch.drain(..len - 1000);
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %format!("{e:#}"), "skipped a message that is not an event");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Asks the workers to send task events, at start and every minute (as Flower does), so a
/// worker started later is seen too.
pub(crate) async fn keep_events_enabled(web: Web) {
    loop {
        if let Some(channels) = web.shared.channels() {
            let m = ControlRequest::new("enable_events", Map::new())
                .to_message(web.shared.clock.forward(), None);
            if let Err(e) = channels.send_control(&m).await {
                tracing::debug!(error = %format!("{e:#}"), "cannot send enable_events");
            }
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}

/// Samples queue depths into the cluster state; every sixth sample also asks the workers
/// which queues they consume, so that queues the broker cannot list are shown.
pub(crate) async fn sample(web: Web) {
    for round in 0u64.. {
        if round % 6 == 0 && web.shared.broker.broadcast().is_some() {
            if let Ok(answers) = ask(&web, "active_queues", Map::new(), None).await {
                for answer in answers.values() {
                    web.learn_queues(answer);
                }
            }
        }
        let stats = queue_stats(&web).await;
        let now = celeriac_core::broadcast::event::now_unix();
        {
            let mut c = web.cluster();
            c.sample_queues(now, stats);
            c.expire_workers(now);
        }
        tokio::time::sleep(web.shared.options.sample_interval).await;
    }
}

/// Once a second, sends the stream's subscribers the totals, the workers and the ids of the
/// tasks that changed.
pub(crate) async fn tick(web: Web) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        every.tick().await;
        if web.shared.ticks.receiver_count() == 0 {
            web.shared.changed.lock().expect("changed lock").clear();
            continue;
        }
        let changed: Vec<String> =
            std::mem::take(&mut *web.shared.changed.lock().expect("changed lock"));
        let mut changed_unique = Vec::with_capacity(changed.len().min(200));
        for id in changed.into_iter().rev() {
            if changed_unique.len() >= 200 {
                break;
            }
            if !changed_unique.contains(&id) {
                changed_unique.push(id);
            }
        }
        let msg = {
            let c = web.cluster();
            let last = c.buckets().last().cloned();
            json!({
                "at": celeriac_core::broadcast::event::now_unix(),
                "totals": c.totals(),
                "workers": c.workers(),
                "tasks_kept": c.task_count(),
                "bucket": last,
                "changed": changed_unique,
            })
        };
        let _ = web.shared.ticks.send(msg.to_string());
    }
}
