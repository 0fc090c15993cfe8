//! The remote-control commands: one function per method, answering in Celery's shapes.

use std::collections::BTreeMap;
use std::time::Duration;

use celeriac_core::RateLimit;
use celeriac_core::backend::revoke::{Signal, revoked_meta};
use celeriac_core::broadcast::control::Request;
use celeriac_core::broadcast::event::EventKind;
use serde_json::{Map, Value, json};

use super::{Node, QueueChange, revoked_ids};
use crate::events::with_software;
use crate::tracker::{Standing, info};

fn ok(v: impl Into<Value>) -> Value {
    json!({ "ok": v.into() })
}

fn nok(v: impl Into<Value>) -> Value {
    json!({ "error": v.into() })
}

/// A Python exception's repr, as Celery answers a handler that raised.
fn raised(exc: &str, msg: &str) -> Value {
    nok(format!("{exc}({})", py_str(msg)))
}

fn py_str(s: &str) -> String {
    celeriac_core::broadcast::event::py_repr(&Value::String(s.to_owned()), usize::MAX)
}

/// Runs `req` on `node`; `None` when the command sends no reply (`shutdown`, `election`, a
/// node's own `hello`).
pub(super) async fn dispatch(node: &Node, req: &Request) -> Option<Value> {
    let a = &req.arguments;
    if !node.options.control_allow.allows(&req.method) {
        // Refused out loud, `shutdown` included (which otherwise sends no reply), so the
        // operator learns why nothing happened.
        tracing::warn!(
            method = %req.method,
            "remote-control command refused: not in this worker's control_allow"
        );
        return Some(nok(format!(
            "{} is not allowed on this worker (control_allow)",
            req.method
        )));
    }
    let answer = match req.method.as_str() {
        "ping" => ok("pong"),
        "stats" => stats(node),
        "active" | "dump_active" => held(node, Standing::Active, flag(a, "safe")),
        "reserved" | "dump_reserved" => held(node, Standing::Reserved, false),
        "scheduled" | "dump_schedule" => scheduled(node),
        "revoked" | "dump_revoked" => json!(node.revoked.ids()),
        "registered" | "dump_tasks" => registered(node, a),
        "query_task" => query_task(node, a),
        "active_queues" => active_queues(node),
        "conf" | "dump_conf" => Value::Object(conf(node)),
        "report" => ok(report(node)),
        "clock" => json!({ "clock": node.clock.value() }),
        "hello" => return hello(node, a),
        "revoke" => revoke(node, a, flag(a, "terminate")).await,
        "terminate" => revoke(node, a, true).await,
        "revoke_by_stamped_headers" => revoke_by_stamped_headers(node, a),
        "rate_limit" => rate_limit(node, a),
        "time_limit" => time_limit(node, a),
        "shutdown" => {
            let msg = a
                .get("msg")
                .and_then(Value::as_str)
                .unwrap_or("Got shutdown from remote");
            tracing::warn!("{msg}");
            node.shutdown.warm();
            return None;
        }
        "pool_grow" => pool_resize(node, a, true),
        "pool_shrink" => pool_resize(node, a, false),
        "autoscale" => autoscale(node, a),
        "pool_restart" => raised("ValueError", "Pool restarts not enabled"),
        "add_consumer" => match a.get("queue").and_then(Value::as_str) {
            Some(q) if !q.is_empty() => {
                let _ = node.queue_changes.send(QueueChange::Add(q.to_owned()));
                ok(format!("add consumer {q}"))
            }
            _ => raised(
                "TypeError",
                "add_consumer() missing required argument: 'queue'",
            ),
        },
        "cancel_consumer" => match a.get("queue").and_then(Value::as_str) {
            Some(q) => {
                let _ = node.queue_changes.send(QueueChange::Cancel(q.to_owned()));
                ok(format!("no longer consuming from {q}"))
            }
            None => raised(
                "TypeError",
                "cancel_consumer() missing required argument: 'queue'",
            ),
        },
        "enable_events" => events(node, true),
        "disable_events" => events(node, false),
        "heartbeat" => {
            let e = with_software(node.events.event(EventKind::WorkerHeartbeat)).with("freq", 5);
            node.events.send_now(e).await;
            Value::Null
        }
        "election" => return None,
        other => nok(format!("KeyError({})", py_str(other))),
    };
    Some(answer)
}

/// A boolean argument as Celery's CLI and clients send it (`true`, `"true"`, `1`, `"1"`).
fn flag(a: &Map<String, Value>, key: &str) -> bool {
    match a.get(key) {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|n| n != 0.0),
        Some(Value::String(s)) => matches!(
            s.to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "y" | "on"
        ),
        _ => false,
    }
}

/// A list argument that may come as one string.
fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

fn seconds(v: Option<&Value>) -> Result<Option<Duration>, Value> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            let s = v
                .as_f64()
                .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                .ok_or_else(|| raised("ValueError", &format!("could not convert to float: {v}")))?;
            Ok((s > 0.0)
                .then(|| Duration::try_from_secs_f64(s).ok())
                .flatten())
        }
    }
}

fn stats(node: &Node) -> Value {
    let o = &node.options;
    let mut processes = node.pool.idle_pids();
    processes.extend(
        node.tracker
            .snapshot()
            .iter()
            .filter_map(|(_, r)| r.child.get()),
    );
    processes.sort_unstable();
    let mut s = Map::new();
    s.insert("total".into(), Value::Object(node.tracker.totals()));
    s.insert("pid".into(), std::process::id().into());
    s.insert("clock".into(), node.clock.value().to_string().into());
    s.insert("uptime".into(), node.started.elapsed().as_secs().into());
    s.insert(
        "pool".into(),
        json!({
            "implementation": format!("celeriac:{}", o.pool),
            "max-concurrency": node.pool.size(),
            "processes": processes,
            "max-tasks-per-child": o.max_tasks_per_child.map_or(json!("N/A"), Value::from),
            "put-guarded-by-semaphore": false,
            "timeouts": [0, 0],
            "writes": "N/A",
        }),
    );
    s.insert("broker".into(), broker_info(node));
    s.insert(
        "prefetch_count".into(),
        (node.pool.size() + o.prefetch_buffer).into(),
    );
    s.insert("rusage".into(), rusage());
    if let Some(b) = *node.autoscale.lock().unwrap_or_else(|e| e.into_inner()) {
        s.insert(
            "autoscaler".into(),
            json!({"max": b.max, "min": b.min, "qty": node.pool.size()}),
        );
    }
    Value::Object(s)
}

/// The broker's connection as Celery's `stats` shows it, never with the password.
fn broker_info(node: &Node) -> Value {
    let transport = node.broker.driver();
    let url = node.options.broker_url.as_deref().unwrap_or_default();
    let (host, port, user, vhost) = url_parts(url);
    json!({
        "hostname": host, "userid": user, "virtual_host": vhost, "port": port,
        "insist": false, "ssl": url.starts_with("rediss://") || url.starts_with("amqps://"),
        "transport": transport, "connect_timeout": 4, "transport_options": {},
        "login_method": null, "uri_prefix": null, "heartbeat": 120.0,
        "failover_strategy": "round-robin", "alternates": [],
    })
}

/// Host, port, user and path of a URL (`sqlite://path` has a path and no host).
fn url_parts(url: &str) -> (Value, Value, Value, Value) {
    let Some((_, rest)) = url.split_once("://") else {
        return (Value::Null, Value::Null, Value::Null, Value::Null);
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u.split(':').next().unwrap_or_default()), h),
        None => (None, authority),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => (h, p.parse::<u16>().ok()),
        _ => (hostport, None),
    };
    let path = path.split(['?', '#']).next().unwrap_or_default();
    (
        (!host.is_empty()).then(|| host.to_owned()).into(),
        port.into(),
        user.filter(|u| !u.is_empty()).map(str::to_owned).into(),
        path.to_owned().into(),
    )
}

fn rusage() -> Value {
    #[cfg(target_os = "linux")]
    {
        use nix::sys::resource::{UsageWho, getrusage};
        if let Ok(u) = getrusage(UsageWho::RUSAGE_SELF) {
            let secs = |t: nix::sys::time::TimeVal| {
                t.tv_sec() as f64 + f64::from(i32::try_from(t.tv_usec()).unwrap_or(0)) / 1e6
            };
            return json!({
                "utime": secs(u.user_time()), "stime": secs(u.system_time()),
                "maxrss": u.max_rss(), "minflt": u.minor_page_faults(),
                "majflt": u.major_page_faults(), "nvcsw": u.voluntary_context_switches(),
                "nivcsw": u.involuntary_context_switches(),
            });
        }
    }
    json!("N/A")
}

fn held(node: &Node, want: Standing, safe: bool) -> Value {
    Value::Array(
        node.tracker
            .snapshot()
            .into_iter()
            .filter(|(s, _)| *s == want)
            .map(|(_, r)| info(&r, &node.hostname, safe))
            .collect(),
    )
}

fn scheduled(node: &Node) -> Value {
    Value::Array(
        node.tracker
            .snapshot()
            .into_iter()
            .filter(|(s, _)| *s == Standing::Scheduled)
            .map(|(_, r)| {
                json!({
                    "eta": r.headers().eta.map(celeriac_core::time::format),
                    "priority": r.message().properties.priority.unwrap_or(0),
                    "request": info(&r, &node.hostname, false),
                })
            })
            .collect(),
    )
}

fn registered(node: &Node, a: &Map<String, Value>) -> Value {
    let items = strings(a.get("taskinfoitems"));
    let builtins = flag(a, "builtins");
    let mut names: Vec<&str> = node
        .registry
        .names()
        .into_iter()
        .filter(|n| builtins || !n.starts_with("celery."))
        .collect();
    names.sort_unstable();
    let want = |item: &str| items.is_empty() || items.iter().any(|i| i == item);
    Value::Array(
        names
            .into_iter()
            .map(|name| {
                let def = node.registry.get(name);
                let mut fields = Vec::new();
                if want("routing_key") {
                    if let Some(q) = def.and_then(|d| d.options.queue.as_deref()) {
                        fields.push(format!("routing_key={q}"));
                    }
                }
                if want("rate_limit") {
                    let own = def.and_then(|d| d.options.rate_limit);
                    if let Some(l) = node.limiter.limit_for(name, own) {
                        fields.push(format!("rate_limit={l}"));
                    }
                }
                if fields.is_empty() {
                    Value::String(name.to_owned())
                } else {
                    Value::String(format!("{name} [{}]", fields.join(" ")))
                }
            })
            .collect(),
    )
}

fn query_task(node: &Node, a: &Map<String, Value>) -> Value {
    let ids = strings(a.get("ids"));
    let mut out = Map::new();
    for (standing, r) in node.tracker.snapshot() {
        if ids.iter().any(|i| i == r.id()) {
            let state = match standing {
                Standing::Active => "active",
                Standing::Reserved | Standing::Scheduled => "reserved",
            };
            out.insert(
                r.id().to_owned(),
                json!([state, info(&r, &node.hostname, false)]),
            );
        }
    }
    Value::Object(out)
}

fn active_queues(node: &Node) -> Value {
    let queues = node
        .queues
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Value::Array(
        queues
            .into_iter()
            .map(|q| {
                json!({
                    "name": q,
                    "exchange": {"name": q, "type": "direct", "arguments": null, "durable": true,
                                 "passive": false, "auto_delete": false, "delivery_mode": null,
                                 "no_declare": false},
                    "routing_key": q, "queue_arguments": null, "binding_arguments": null,
                    "consumer_arguments": null, "durable": true, "exclusive": false,
                    "auto_delete": false, "no_ack": false, "alias": null, "bindings": [],
                    "no_declare": null, "expires": null, "message_ttl": null, "max_length": null,
                    "max_length_bytes": null, "max_priority": null,
                })
            })
            .collect(),
    )
}

/// The settings in force, under Celery's names where Celery has one; URLs without secrets.
fn conf(node: &Node) -> Map<String, Value> {
    let o = &node.options;
    let mut c = BTreeMap::new();
    let mut put = |k: &str, v: Value| {
        c.insert(k.to_owned(), v);
    };
    if let Some(u) = &o.broker_url {
        put("broker_url", celeriac_core::url::redact(u).into());
    }
    put("worker_concurrency", node.pool.size().into());
    put("worker_pool", o.pool.to_string().into());
    put("worker_prefetch_buffer", o.prefetch_buffer.into());
    put("task_queues", json!(o.queues));
    put("task_track_started", o.track_started.into());
    put("task_serializer", o.content_type.to_string().into());
    put("worker_send_task_events", node.events.task_events().into());
    put(
        "worker_heartbeat_interval",
        o.heartbeat_interval.as_secs_f64().into(),
    );
    put(
        "broker_transport_options",
        json!({"visibility_timeout": o.visibility_timeout.as_secs_f64()}),
    );
    put(
        "worker_max_tasks_per_child",
        o.max_tasks_per_child.map_or(Value::Null, Value::from),
    );
    put(
        "worker_max_memory_per_child",
        o.max_memory_per_child.map_or(Value::Null, Value::from),
    );
    put(
        "worker_soft_shutdown_timeout",
        o.soft_shutdown_timeout
            .map_or(Value::Null, |d| d.as_secs_f64().into()),
    );
    put("worker_max_redeliveries", o.max_redeliveries.into());
    c.into_iter().collect()
}

fn report(node: &Node) -> String {
    let mut r = format!(
        "software -> celeriac:{} (rust) transport:{}\nplatform -> system:{} arch:{}\nnode -> {} pid:{}\n\n",
        env!("CARGO_PKG_VERSION"),
        node.broker.driver(),
        std::env::consts::OS,
        std::env::consts::ARCH,
        node.hostname,
        std::process::id(),
    );
    for (k, v) in conf(node) {
        r.push_str(&format!("{k}: {v}\n"));
    }
    r
}

fn hello(node: &Node, a: &Map<String, Value>) -> Option<Value> {
    let from = a.get("from_node").and_then(Value::as_str)?;
    if from == node.hostname {
        return None;
    }
    tracing::info!(from_node = from, "sync with another node");
    for id in revoked_ids(a.get("revoked")) {
        node.revoked.add(&id);
    }
    Some(json!({"revoked": node.revoked.ids(), "clock": node.clock.forward()}))
}

async fn revoke(node: &Node, a: &Map<String, Value>, terminate: bool) -> Value {
    let mut ids = strings(a.get("task_id"));
    ids.sort_unstable();
    ids.dedup();
    let signal = match a.get("signal").and_then(Value::as_str) {
        None | Some("") => Signal::default(),
        Some(s) => match s.parse::<Signal>() {
            Ok(s) => s,
            Err(e) => return raised("ValueError", &e.to_string()),
        },
    };
    for id in &ids {
        node.revoked.add(id);
    }
    // Running copies stop first and store REVOKED (`terminated`) themselves.
    let stopped = if terminate {
        node.running.terminate(&ids, signal)
    } else {
        Vec::new()
    };
    if let Some(backend) = &node.backend {
        for id in ids.iter().filter(|id| !stopped.contains(id)) {
            let ready = matches!(backend.get(id).await, Ok(Some(m)) if m.status.is_ready());
            if !ready {
                if let Err(e) = backend.store(&revoked_meta(id.clone(), None)).await {
                    tracing::warn!(task_id = %id, error = %e, "cannot store the revoke in the result backend");
                }
            }
        }
    }
    if terminate {
        if stopped.is_empty() {
            return ok("terminate: tasks unknown");
        }
        return ok(format!("terminate: {}", stopped.join(", ")));
    }
    tracing::info!(ids = %ids.join(", "), "tasks flagged as revoked");
    let set: Vec<String> = ids.iter().map(|i| py_str(i)).collect();
    ok(format!("tasks {{{}}} flagged as revoked", set.join(", ")))
}

fn revoke_by_stamped_headers(node: &Node, a: &Map<String, Value>) -> Value {
    let headers: Map<String, Value> = match a.get("headers") {
        Some(Value::Object(m)) => m.clone(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), Value::String(v.to_owned())))
            .collect(),
        _ => return raised("TypeError", "headers must be a map or a list of key=value"),
    };
    let pairs: Vec<(String, Vec<Value>)> = headers
        .iter()
        .map(|(k, v)| {
            let vals = match v {
                Value::Array(a) => a.clone(),
                other => vec![other.clone()],
            };
            (k.clone(), vals)
        })
        .collect();
    node.revoked.add_stamps(&pairs);
    let shown = celeriac_core::broadcast::event::py_repr(&Value::Object(headers), usize::MAX);
    if !flag(a, "terminate") {
        return ok(format!(
            "headers {shown} flagged as revoked, but not terminated"
        ));
    }
    let signal = a
        .get("signal")
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<Signal>().ok())
        .unwrap_or_default();
    let matching: Vec<String> = node
        .tracker
        .snapshot()
        .into_iter()
        .filter(|(s, r)| *s == Standing::Active && node.revoked.stamped(r.headers()))
        .map(|(_, r)| r.id().to_owned())
        .collect();
    let stopped = node.running.terminate(&matching, signal);
    if stopped.is_empty() {
        return ok(format!("headers {shown} were not terminated"));
    }
    ok(format!("headers {shown} revoked"))
}

fn rate_limit(node: &Node, a: &Map<String, Value>) -> Value {
    let Some(name) = a.get("task_name").and_then(Value::as_str) else {
        return raised(
            "TypeError",
            "rate_limit() missing required argument: 'task_name'",
        );
    };
    let text = match a.get("rate_limit") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.trim().to_owned(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => other.to_string(),
    };
    // Celery's rate of 0 is no limit, but only an empty value reads "disabled".
    let off = text.is_empty() || text.parse::<f64>().is_ok_and(|n| n == 0.0);
    let limit = if off {
        None
    } else {
        match text.parse::<RateLimit>() {
            Ok(l) => Some(l),
            Err(e) => {
                return nok(format!(
                    "Invalid rate limit string: ValueError({})",
                    py_str(&e.to_string())
                ));
            }
        }
    };
    if node.registry.get(name).is_none() {
        tracing::error!(task = name, "rate limit attempt for an unknown task");
        return nok("unknown task");
    }
    node.limiter.set(name, limit);
    if text.is_empty() {
        tracing::info!(task = name, "rate limits disabled for the task");
        return ok("rate limit disabled successfully");
    }
    tracing::info!(task = name, rate_limit = %text, "new rate limit for the task");
    ok("new rate limit set successfully")
}

fn time_limit(node: &Node, a: &Map<String, Value>) -> Value {
    let name = a
        .get("task_name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if node.registry.get(name).is_none() {
        tracing::error!(task = name, "time limit change for an unknown task");
        return nok("unknown task");
    }
    let (hard, soft) = match (seconds(a.get("hard")), seconds(a.get("soft"))) {
        (Ok(h), Ok(s)) => (h, s),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    node.time_limits.set(name, hard, soft);
    tracing::info!(
        task = name,
        soft = soft.map(|d| d.as_secs_f64()),
        hard = hard.map(|d| d.as_secs_f64()),
        "new time limits for the task"
    );
    ok("time limits set successfully")
}

fn count(a: &Map<String, Value>) -> usize {
    a.get("n")
        .and_then(|v| {
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        })
        .map_or(1, |n| usize::try_from(n).unwrap_or(usize::MAX))
}

fn pool_resize(node: &Node, a: &Map<String, Value>, grow: bool) -> Value {
    let (verb, n) = (if grow { "grow" } else { "shrink" }, count(a));
    if node
        .autoscale
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_some()
    {
        return nok(format!(
            "pool_{verb} is not supported with autoscale. Adjust autoscale range instead."
        ));
    }
    if grow {
        node.pool.grow(n);
    } else {
        node.pool.shrink(n);
    }
    ok(format!("pool will {verb}"))
}

fn autoscale(node: &Node, a: &Map<String, Value>) -> Value {
    let mut bounds = node.autoscale.lock().unwrap_or_else(|e| e.into_inner());
    let Some(b) = bounds.as_mut() else {
        return raised("ValueError", "Autoscale not enabled");
    };
    let num = |k: &str| {
        a.get(k)
            .and_then(|v| {
                v.as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            })
            .and_then(|n| usize::try_from(n).ok())
    };
    if let Some(max) = num("max") {
        b.max = max.max(1);
    }
    if let Some(min) = num("min") {
        b.min = min.max(1);
    }
    if b.min > b.max {
        b.min = b.max;
    }
    ok(format!("autoscale now max={} min={}", b.max, b.min))
}

fn events(node: &Node, on: bool) -> Value {
    if !node.events.available() {
        return nok("event dispatcher unavailable");
    }
    let changed = node.events.set_task_events(on);
    match (on, changed) {
        (true, true) => {
            tracing::info!("task events enabled by remote");
            ok("task events enabled")
        }
        (true, false) => ok("task events already enabled"),
        (false, true) => {
            tracing::info!("task events disabled by remote");
            ok("task events disabled")
        }
        (false, false) => ok("task events already disabled"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parts_never_include_the_password() {
        let (h, p, u, v) = url_parts("redis://user:secret@127.0.0.1:6379/2");
        assert_eq!(
            (h, p, u, v),
            (json!("127.0.0.1"), json!(6379), json!("user"), json!("2"))
        );
        let (h, p, u, v) = url_parts("sqlite://celeriac.db");
        assert_eq!(
            (h, p, u, v),
            (json!("celeriac.db"), Value::Null, Value::Null, json!(""))
        );
        let (h, _, u, v) = url_parts("amqp://guest:guest@localhost:5672//");
        assert_eq!((h, u, v), (json!("localhost"), json!("guest"), json!("/")));
    }

    #[test]
    fn arguments_read_as_celerys_cli_sends_them() {
        let a: Map<String, Value> =
            serde_json::from_value(json!({"safe": "true", "n": "3", "x": 1})).unwrap();
        assert!(flag(&a, "safe") && flag(&a, "x") && !flag(&a, "missing"));
        assert_eq!(count(&a), 3);
        assert_eq!(strings(Some(&json!("a"))), ["a"]);
        assert_eq!(strings(Some(&json!(["a", 1, "b"]))), ["a", "b"]);
        assert_eq!(
            seconds(Some(&json!("2.5"))).unwrap(),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(seconds(Some(&json!(0))).unwrap(), None);
        assert!(seconds(Some(&json!([1]))).is_err());
        assert_eq!(
            raised("ValueError", "Autoscale not enabled"),
            json!({"error": "ValueError('Autoscale not enabled')"})
        );
    }
}
