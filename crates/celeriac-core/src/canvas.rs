//! Canvas on the wire: turning a [`Signature`] map into the [`Message`] that runs it, and the
//! names of the chord keys a result backend keeps.
//!
//! For the `celeriac` facade (which sends signatures, chains, groups and chords) and for the
//! worker (which sends callbacks, the next chain step and chord bodies): both build messages
//! here, so a signature means the same thing whoever sends it. The caller resolves the queue
//! when the signature names none (routes live in the app, not here) and publishes.
//!
//! Options are read from `Signature::options` with Celery's `apply_async` names (§3.1 of the
//! wire notes): `task_id`, `queue`, `priority`, `countdown`, `eta`, `expires`, `time_limit`,
//! `soft_time_limit`, `ignore_result`, `headers`, `shadow`, `parent_id`, `root_id`,
//! `group_id`, `group_index`, `link`, `link_error` and `chord`. Anything else is ignored, as a
//! Python worker ignores options it does not know.
//!
//! # Chord counting
//!
//! A chord's header members are saved as a group (`save_group(gid, ids)`) before any is
//! published. Every execution of a header member, after its result is stored, adds one to the
//! counter [`chord_counter_key`] with [`ResultBackend::incr`](crate::ResultBackend::incr). The
//! counter is only a hint: once it reaches the header size, the worker reads every member's
//! stored result, and only when all are ready does it take the claim [`chord_claim_key`]
//! (`incr` returning 1) and publish the body. A redelivered member adds one more (a count that
//! is too high costs an extra read, never an early body), and a member whose result was
//! already stored when it was redelivered still counts (so a crash between storing and counting
//! loses nothing). The claim makes the body fire once.
//!
//! A backend with a chord protocol of its own (Celery's Redis backend: the `celery-taskset-meta-<gid>`
//! `.j`/`.t`/`.s` keys) is asked first ([`ChordProtocol::chord_part_return`](crate::backend::ChordProtocol::chord_part_return)
//! with a [`ChordPart`]); the counter is used only when it answers [`ChordStatus::NotNative`].
//! Chord senders announce the header size with
//! [`ChordProtocol::set_chord_size`](crate::backend::ChordProtocol::set_chord_size), so a Python worker
//! completes our chords and ours complete Python's.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::protocol::{Body, ContentType, Embed, Headers, Message, Signature, TimeLimit};
use crate::task::TaskOptions;

/// Longest `argsrepr`/`kwargsrepr` written into headers, as Celery does.
const REPR_MAX: usize = 1024;

/// A message built from a signature, ready to publish.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Outgoing {
    /// The message.
    pub message: Message,
    /// The queue the signature or its task names; `None` means "route it yourself".
    pub queue: Option<String>,
    /// When it may run, if later than now.
    pub eta: Option<DateTime<Utc>>,
    /// The priority asked for, if any.
    pub priority: Option<u8>,
}

/// Who sends, and how: the parts of a message that do not come from the signature.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Sender<'a> {
    /// The body codec.
    pub content_type: ContentType,
    /// The `origin` header (the sender's node name).
    pub origin: Option<&'a str>,
    /// The time countdowns and relative expiries count from.
    pub now: DateTime<Utc>,
}

impl<'a> Sender<'a> {
    /// A sender encoding with `content_type`, now.
    pub fn new(content_type: ContentType, origin: Option<&'a str>) -> Self {
        Sender {
            content_type,
            origin,
            now: Utc::now(),
        }
    }
}

/// Builds the message for `sig`, with `task_options` (the task's registration, or defaults)
/// filling what the signature leaves out, and `chain` as the rest of its chain (reversed:
/// the next step last).
///
/// Fails for options of the wrong type (a `countdown` that is not a number, ...) and for
/// composite signatures (`subtask_type` `chain`, `group`, `chord`), which are not messages.
pub fn build_message(
    sig: &Signature,
    task_options: &TaskOptions,
    chain: Option<Vec<Signature>>,
    sender: &Sender<'_>,
) -> Result<Outgoing> {
    if let Some(kind) = sig.subtask_type.as_deref() {
        return Err(Error::protocol(format!(
            "a {kind} signature ({}) cannot be sent as one message",
            sig.task
        )));
    }
    let o = Options(&sig.options);
    let id = o.str("task_id")?.unwrap_or_else(crate::protocol::new_id);
    let now = sender.now;
    let eta = match o.time("eta")? {
        Some(t) => Some(t),
        None => o.secs("countdown")?.map(|c| now + secs(c)),
    };
    let expires = match o.0.get("expires") {
        None | Some(Value::Null) => task_options.expires.map(|e| now + secs(e.as_secs_f64())),
        Some(Value::Number(n)) => n.as_f64().map(|s| now + secs(s)),
        Some(_) => o.time("expires")?,
    };
    let priority = match o.0.get("priority") {
        None | Some(Value::Null) => task_options.priority,
        Some(v) => Some(
            v.as_u64()
                .map(|p| p.min(9) as u8)
                .ok_or_else(|| bad("priority", "an integer 0-9"))?,
        ),
    };

    let mut headers = Headers::new(sig.task.clone(), id.clone());
    headers.eta = eta;
    headers.expires = expires;
    headers.timelimit = TimeLimit {
        hard: o
            .secs("time_limit")?
            .or(task_options.time_limit.map(|d| d.as_secs_f64())),
        soft: o
            .secs("soft_time_limit")?
            .or(task_options.soft_time_limit.map(|d| d.as_secs_f64())),
    };
    headers.argsrepr = Some(repr(&Value::Array(sig.args.clone())));
    headers.kwargsrepr = Some(repr(&Value::Object(sig.kwargs.clone())));
    headers.origin = sender.origin.map(str::to_owned);
    headers.ignore_result = match o.0.get("ignore_result") {
        Some(Value::Bool(b)) => *b,
        _ => task_options.ignore_result,
    };
    headers.shadow = o.str("shadow")?;
    if let Some(root) = o.str("root_id")? {
        headers.root_id = Some(root);
    }
    headers.parent_id = o.str("parent_id")?;
    headers.group = o.str("group_id")?;
    headers.group_index = match o.0.get("group_index") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| bad("group_index", "a non-negative integer"))?,
        ),
    };
    match o.0.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => headers.extra = m.clone(),
        Some(_) => return Err(bad("headers", "a map")),
    }

    let embed = Embed {
        callbacks: o.sigs("link")?,
        errbacks: o.sigs("link_error")?,
        chain,
        chord: match o.0.get("chord") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                serde_json::from_value(v.clone()).map_err(|_| bad("chord", "a signature map"))?,
            ),
        },
    };
    let body = Body {
        args: sig.args.clone(),
        kwargs: sig.kwargs.clone(),
        embed,
    };
    let mut message = Message::new(headers, &body, sender.content_type)?;
    message.properties.priority = priority.unwrap_or(0);
    // Celery's freeze stamps the sender's reply queue on every step; results go there.
    message.properties.reply_to = o.str("reply_to")?;
    Ok(Outgoing {
        message,
        queue: o.str("queue")?.or_else(|| task_options.queue.clone()),
        eta: eta.filter(|t| *t > now),
        priority,
    })
}

/// `sig` as a callback of a task that returned `value`: the value prepended to its args
/// unless the signature is immutable.
pub fn with_parent_value(sig: &Signature, value: Value) -> Signature {
    let mut s = sig.clone();
    if !s.immutable {
        s.args.insert(0, value);
    }
    s
}

/// One plain task message to send: a signature and the rest of its chain (reversed).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Step {
    /// A plain (non-composite) signature.
    pub sig: Signature,
    /// The rest of its chain, next step last.
    pub chain: Option<Vec<Signature>>,
}

/// What starting a signature takes: the plain messages to send, and the groups to save
/// before any of them is sent (the headers of chords, which their members count against).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Plan {
    /// The messages, in sending order.
    pub steps: Vec<Step>,
    /// `(group_id, member task ids)` to save with `save_group` first.
    pub groups: Vec<(String, Vec<String>)>,
}

/// Flattens a signature that may be a composite map (§3.6 of the wire notes), followed by
/// `chain` (reversed: next step last), into the plain messages that start it.
///
/// - A plain signature is one step carrying the chain.
/// - A `chain` is its first task carrying its other tasks and then `chain`; a first task that
///   is itself a composite is planned the same way.
/// - A `group` is one step per member (members get the group's `task_id`, or a new id, as
///   `group_id`, and their `group_index`). A group followed by more steps becomes a chord
///   whose body is the next step carrying the rest (Celery does the same).
/// - A `chord` (`kwargs.header`: a list or a group map; `kwargs.body`) saves its header as a
///   group and sends each member (a frozen id, `group_id`, `group_index`, the body under
///   `chord`); steps after it run after its body. Header members must be plain signatures.
///
/// A composite's own args are partial args of its members (the first, for a chain; every
/// header member, for a chord). Other composites (`chunks`, `xmap`, ...) are refused.
pub fn plan(sig: &Signature, chain: Option<Vec<Signature>>) -> Result<Plan> {
    let mut p = Plan::default();
    plan_into(sig.clone(), chain.unwrap_or_default(), &mut p)?;
    Ok(p)
}

/// [`plan`] for signatures that need no saved group (no chord inside): the steps, with
/// `parent_value` prepended where a callback's would be.
pub fn expand(sig: &Signature, parent_value: Option<&Value>) -> Result<Vec<Step>> {
    let sig = match parent_value {
        Some(v) => with_parent_value(sig, v.clone()),
        None => sig.clone(),
    };
    let p = plan(&sig, None)?;
    if !p.groups.is_empty() {
        return Err(Error::protocol(format!(
            "{} holds a chord; plan it with canvas::plan, which saves its header",
            sig.task
        )));
    }
    Ok(p.steps)
}

/// A composite's own args prepended to `member`'s (unless immutable).
fn partial(composite: &Signature, member: &mut Signature) {
    if !member.immutable && !composite.args.is_empty() {
        let mut args = composite.args.clone();
        args.append(&mut member.args);
        member.args = args;
    }
}

fn sig_list(owner: &Signature, v: Option<&Value>, what: &str) -> Result<Vec<Signature>> {
    serde_json::from_value(v.cloned().unwrap_or(Value::Null)).map_err(|_| {
        Error::protocol(format!(
            "a {} signature needs {what}, a list of signature maps",
            owner.task
        ))
    })
}

/// `first` followed by `rest` (reversed) as one signature: `first` itself, or a chain map.
pub fn chain_of(first: Signature, rest: Vec<Signature>) -> Signature {
    if rest.is_empty() {
        return first;
    }
    let mut tasks = vec![first];
    tasks.extend(rest.into_iter().rev());
    let mut c = Signature::new("celery.chain", vec![]);
    c.subtask_type = Some("chain".into());
    c.kwargs.insert(
        "tasks".into(),
        serde_json::to_value(tasks).unwrap_or(Value::Null),
    );
    c
}

fn plan_into(sig: Signature, mut rest: Vec<Signature>, p: &mut Plan) -> Result<()> {
    match sig.subtask_type.as_deref() {
        None => {
            let chain = (!rest.is_empty()).then_some(rest);
            p.steps.push(Step { sig, chain });
            Ok(())
        }
        Some("chain") => {
            let mut tasks = sig_list(&sig, sig.kwargs.get("tasks"), "kwargs.tasks")?;
            if tasks.is_empty() {
                return match rest.pop() {
                    None => Ok(()),
                    Some(next) => plan_into(next, rest, p),
                };
            }
            let mut first = tasks.remove(0);
            partial(&sig, &mut first);
            rest.extend(tasks.into_iter().rev());
            plan_into(first, rest, p)
        }
        Some("group") => {
            let mut tasks = sig_list(&sig, sig.kwargs.get("tasks"), "kwargs.tasks")?;
            for m in &mut tasks {
                partial(&sig, m);
            }
            let gid = match sig.options.get("task_id") {
                Some(Value::String(id)) => id.clone(),
                _ => crate::protocol::new_id(),
            };
            if let Some(next) = rest.pop() {
                return plan_chord(gid, tasks, chain_of(next, rest), p);
            }
            for (i, mut member) in tasks.into_iter().enumerate() {
                default_option(&mut member, "group_id", gid.as_str());
                default_option(&mut member, "group_index", i);
                plan_into(member, Vec::new(), p)?;
            }
            Ok(())
        }
        Some("chord") => {
            let header = sig.kwargs.get("header");
            let (mut tasks, gid) = match header {
                Some(Value::Object(g)) if g.get("subtask_type") == Some(&json_str("group")) => {
                    let group: Signature = serde_json::from_value(Value::Object(g.clone()))
                        .map_err(|_| bad("chord header", "a group signature map"))?;
                    let mut tasks = sig_list(&group, group.kwargs.get("tasks"), "kwargs.tasks")?;
                    for m in &mut tasks {
                        partial(&group, m);
                    }
                    let gid = group.options.get("task_id").and_then(Value::as_str);
                    (tasks, gid.map(str::to_owned))
                }
                other => (sig_list(&sig, other, "kwargs.header")?, None),
            };
            for m in &mut tasks {
                partial(&sig, m);
            }
            let body: Signature = sig
                .kwargs
                .get("body")
                .and_then(|b| serde_json::from_value(b.clone()).ok())
                .ok_or_else(|| bad("chord body", "a signature map"))?;
            let gid = gid.unwrap_or_else(crate::protocol::new_id);
            plan_chord(gid, tasks, chain_of(body, rest), p)
        }
        Some(kind) => Err(Error::protocol(format!(
            "a {kind} signature ({}) as a callback or chain step is not supported yet",
            sig.task
        ))),
    }
}

fn json_str(s: &str) -> Value {
    Value::String(s.to_owned())
}

fn plan_chord(
    gid: String,
    header: Vec<Signature>,
    mut body: Signature,
    p: &mut Plan,
) -> Result<()> {
    if header.is_empty() {
        // Nothing to wait for: the body runs at once with no results.
        return plan_into(
            with_parent_value(&body, Value::Array(vec![])),
            Vec::new(),
            p,
        );
    }
    if body.subtask_type.is_none() {
        default_option(&mut body, "group_id", gid.as_str());
    }
    let body_map = serde_json::to_value(&body)
        .map_err(|e| Error::protocol(format!("cannot encode the chord body: {e}")))?;
    let mut ids = Vec::with_capacity(header.len());
    let mut steps = Vec::with_capacity(header.len());
    for (i, mut member) in header.into_iter().enumerate() {
        if let Some(kind) = &member.subtask_type {
            return Err(Error::protocol(format!(
                "a {kind} inside a chord header is not supported yet"
            )));
        }
        let id = match member.options.get("task_id") {
            Some(Value::String(id)) => id.clone(),
            _ => crate::protocol::new_id(),
        };
        member
            .options
            .insert("task_id".into(), Value::String(id.clone()));
        member
            .options
            .insert("group_id".into(), Value::String(gid.clone()));
        member.options.insert("group_index".into(), i.into());
        member.options.insert("chord".into(), body_map.clone());
        ids.push(id);
        steps.push(Step {
            sig: member,
            chain: None,
        });
    }
    p.groups.push((gid, ids));
    p.steps.extend(steps);
    Ok(())
}

/// Sets `options[key] = value` unless the signature already has one.
pub fn default_option(sig: &mut Signature, key: &str, value: impl Into<Value>) {
    let entry = sig.options.entry(key.to_owned()).or_insert(Value::Null);
    if entry.is_null() {
        *entry = value.into();
    }
}

/// One chord header member that returned, handed to a backend's own chord protocol
/// ([`ChordProtocol::chord_part_return`](crate::backend::ChordProtocol::chord_part_return)).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ChordPart<'a> {
    /// The chord's header group id.
    pub group_id: &'a str,
    /// The member's stored outcome (id, state, result or Celery exception map).
    pub meta: &'a crate::TaskMeta,
    /// The member's place in the header, if the message said.
    pub group_index: Option<u32>,
}

impl<'a> ChordPart<'a> {
    /// Member `meta` of chord `group_id`, at `group_index`.
    pub fn new(group_id: &'a str, meta: &'a crate::TaskMeta, group_index: Option<u32>) -> Self {
        ChordPart {
            group_id,
            meta,
            group_index,
        }
    }
}

/// What a backend's own chord protocol says after a header member returned.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ChordStatus {
    /// The backend has no chord protocol of its own for this chord: count it with the
    /// [`chord_counter_key`] instead.
    NotNative,
    /// More members are to come (or another caller completed the chord).
    Waiting,
    /// Every member returned; their outcomes in header order. Returned to one caller only.
    Complete(Vec<crate::TaskMeta>),
}

/// Announces a chord of `size` header members under `group_id` to a backend with a chord
/// protocol of its own ([`ChordProtocol`](crate::backend::ChordProtocol)), before any member
/// is sent; does nothing on other backends.
pub async fn announce_chord(
    backend: &dyn crate::ResultBackend,
    group_id: &str,
    size: usize,
) -> Result<()> {
    match backend.capabilities().chords {
        Some(chords) => chords.set_chord_size(group_id, size).await,
        None => Ok(()),
    }
}

/// The backend counter of chord `group_id`: one added per execution of a header member.
pub fn chord_counter_key(group_id: &str) -> String {
    format!("celeriac-chord-{group_id}.count")
}

/// The backend counter whose first increment claims the right to fire chord `group_id`'s body.
pub fn chord_claim_key(group_id: &str) -> String {
    format!("celeriac-chord-{group_id}.claim")
}

// ===== dataflow =====

/// The message header that carries a dataflow graph: `{"run", "node", "graph"}`.
pub const FLOW_HEADER: &str = "celeriac_flow";

/// One node of a dataflow graph on the wire: the task it runs and how its output is read.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct FlowNode {
    /// The task, its partial arguments and send options (`queue`, `priority`, ...); each
    /// message routed to the node has its input prepended to the arguments.
    pub sig: Signature,
    /// The node's output is a list whose every element is one message to each subscriber.
    #[serde(default)]
    pub stream: bool,
    /// The worker adds the node's output to the run's running totals (see [`flow_tally`]).
    #[serde(default)]
    pub tally: bool,
    /// At most this many messages per second routed to the node, over the whole run and
    /// every worker: the `n`-th gets an eta of the run's start plus `(n - 1) / rate` seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
}

impl FlowNode {
    /// A plain node running `sig`.
    pub fn new(sig: Signature) -> Self {
        FlowNode {
            sig,
            stream: false,
            tally: false,
            rate: None,
        }
    }
}

/// A dataflow graph on the wire: nodes by name, and for each node the nodes subscribed to its
/// output. It travels whole in every message of a run (header [`FLOW_HEADER`]), so any worker
/// process routes any node's output.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct FlowGraph {
    /// The nodes, by name.
    pub nodes: std::collections::BTreeMap<String, FlowNode>,
    /// For each node, the names of the nodes that receive its output.
    #[serde(default)]
    pub subs: std::collections::BTreeMap<String, Vec<String>>,
    /// When the run began (Unix seconds), set on the copy each run's messages carry; the
    /// origin of node rates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<f64>,
}

impl FlowGraph {
    /// Checks that every subscription names known nodes and that the graph has no cycle; the
    /// error names the unknown node or the cycle (`a -> b -> a`).
    pub fn validate(&self) -> Result<()> {
        for (from, tos) in &self.subs {
            for name in std::iter::once(from).chain(tos) {
                if !self.nodes.contains_key(name) {
                    return Err(Error::config(format!(
                        "dataflow graph: a subscription names node {name:?}, which the graph does not have"
                    )));
                }
            }
        }
        // Depth-first search; `path` is the current branch, so a node met on it closes a cycle.
        fn visit<'a>(
            g: &'a FlowGraph,
            node: &'a str,
            path: &mut Vec<&'a str>,
            done: &mut std::collections::BTreeSet<&'a str>,
        ) -> Result<()> {
            if let Some(at) = path.iter().position(|n| *n == node) {
                let mut cycle: Vec<&str> = path[at..].to_vec();
                cycle.push(node);
                return Err(Error::config(format!(
                    "dataflow graph has a cycle: {}",
                    cycle.join(" -> ")
                )));
            }
            if done.contains(node) {
                return Ok(());
            }
            path.push(node);
            for next in g.subs.get(node).into_iter().flatten() {
                visit(g, next, path, done)?;
            }
            path.pop();
            done.insert(node);
            Ok(())
        }
        let mut done = std::collections::BTreeSet::new();
        for node in self.nodes.keys() {
            visit(self, node, &mut Vec::new(), &mut done)?;
        }
        Ok(())
    }

    /// The message that takes `input` to `node` in run `run`: the node's signature with the
    /// input prepended (unless immutable) and the graph in header [`FLOW_HEADER`].
    pub fn message_for(&self, run: &str, node: &str, input: Value) -> Result<Signature> {
        let n = self
            .nodes
            .get(node)
            .ok_or_else(|| Error::config(format!("dataflow graph has no node {node:?}")))?;
        let mut sig = with_parent_value(&n.sig, input);
        sig.options.remove("task_id");
        let header = serde_json::json!({
            "run": run,
            "node": node,
            "graph": serde_json::to_value(self)
                .map_err(|e| Error::protocol(format!("cannot encode the dataflow graph: {e}")))?,
        });
        let headers = sig
            .options
            .entry("headers".to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        match headers {
            Value::Object(m) => {
                m.insert(FLOW_HEADER.to_owned(), header);
            }
            _ => return Err(bad("headers", "a map")),
        }
        Ok(sig)
    }

    /// Where node `node`'s `output` goes: `(subscriber, input)` pairs, one per subscriber for
    /// a plain node, one per subscriber and element for a [stream](FlowNode::stream) node.
    ///
    /// Fails when a stream node's output is not a list.
    pub fn targets(&self, node: &str, output: &Value) -> Result<Vec<(String, Value)>> {
        let Some(subs) = self.subs.get(node).filter(|s| !s.is_empty()) else {
            return Ok(Vec::new());
        };
        let stream = self.nodes.get(node).is_some_and(|n| n.stream);
        let items: Vec<Value> = match (stream, output) {
            (true, Value::Array(a)) => a.clone(),
            (true, other) => {
                return Err(Error::protocol(format!(
                    "dataflow node {node:?} is a stream and must return a list, not {}",
                    repr(other)
                )));
            }
            (false, v) => vec![v.clone()],
        };
        let mut out = Vec::with_capacity(items.len() * subs.len());
        for item in &items {
            for sub in subs {
                out.push((sub.clone(), item.clone()));
            }
        }
        Ok(out)
    }

    /// The messages that carry node `node`'s `output` to its subscribers (see
    /// [`FlowGraph::targets`]), without node rates applied.
    pub fn route(&self, run: &str, node: &str, output: &Value) -> Result<Vec<Signature>> {
        self.targets(node, output)?
            .into_iter()
            .map(|(sub, item)| self.message_for(run, &sub, item))
            .collect()
    }
}

/// The dataflow header of a message: run id, node name and graph.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct FlowHeader {
    /// The run id.
    pub run: String,
    /// The node this message runs.
    pub node: String,
    /// The whole graph.
    pub graph: FlowGraph,
}

impl FlowHeader {
    /// Reads the [`FLOW_HEADER`] value of a message; `None` for a message of no dataflow run.
    pub fn from_headers(extra: &Map<String, Value>) -> Option<Result<FlowHeader>> {
        let v = extra.get(FLOW_HEADER)?;
        let run = v.get("run").and_then(Value::as_str);
        let node = v.get("node").and_then(Value::as_str);
        let graph = v
            .get("graph")
            .and_then(|g| serde_json::from_value::<FlowGraph>(g.clone()).ok());
        Some(match (run, node, graph) {
            (Some(run), Some(node), Some(graph)) => Ok(FlowHeader {
                run: run.to_owned(),
                node: node.to_owned(),
                graph,
            }),
            _ => Err(Error::protocol(format!(
                "the {FLOW_HEADER} header must be a map with run, node and graph"
            ))),
        })
    }
}

/// The increments a [tally](FlowNode::tally) node's output asks for: a string adds one to
/// that key, a list of strings one to each, a map `{key: n}` adds `n` (a positive integer).
pub fn flow_tally(node: &str, output: &Value) -> Result<Vec<(String, i64)>> {
    let bad = || {
        Error::protocol(format!(
            "tally node {node:?} must return a key, a list of keys or a map of positive counts, not {}",
            repr(output)
        ))
    };
    match output {
        Value::String(k) => Ok(vec![(k.clone(), 1)]),
        Value::Array(a) => a
            .iter()
            .map(|k| k.as_str().map(|k| (k.to_owned(), 1)).ok_or_else(bad))
            .collect(),
        Value::Object(m) => m
            .iter()
            .map(|(k, n)| match n.as_i64() {
                Some(n) if n > 0 => Ok((k.clone(), n)),
                _ => Err(bad()),
            })
            .collect(),
        _ => Err(bad()),
    }
}

/// The backend counter of messages of run `run` sent and not yet finished.
pub fn flow_pending_key(run: &str) -> String {
    format!("celeriac-flow-{run}.pending")
}

/// The backend counter of messages of run `run` that failed.
pub fn flow_failed_key(run: &str) -> String {
    format!("celeriac-flow-{run}.failed")
}

/// The backend counter holding tally node `node`'s running total for `key` in run `run`.
pub fn flow_total_key(run: &str, node: &str, key: &str) -> String {
    format!("celeriac-flow-{run}.{node}.total.{key}")
}

/// The backend counter of messages routed to rate-limited node `node` in run `run`.
pub fn flow_slot_key(run: &str, node: &str) -> String {
    format!("celeriac-flow-{run}.{node}.slot")
}

/// The backend counter of distinct keys tally node `node` has seen in run `run`.
pub fn flow_keys_key(run: &str, node: &str) -> String {
    format!("celeriac-flow-{run}.{node}.keys")
}

/// The result id under which the `slot`-th (from 1) key of tally node `node` is stored (a
/// SUCCESS record whose result is the key), so readers can list the keys.
pub fn flow_key_slot_id(run: &str, node: &str, slot: i64) -> String {
    format!("celeriac-flow-{run}.{node}.key.{slot}")
}

fn secs(s: f64) -> chrono::Duration {
    std::time::Duration::try_from_secs_f64(s.max(0.0))
        .ok()
        .and_then(|d| chrono::Duration::from_std(d).ok())
        .unwrap_or(chrono::Duration::MAX)
}

fn bad(key: &str, want: &str) -> Error {
    Error::protocol(format!("signature option {key} must be {want}"))
}

struct Options<'a>(&'a Map<String, Value>);

impl Options<'_> {
    fn str(&self, key: &str) -> Result<Option<String>> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(bad(key, "a string")),
        }
    }

    fn secs(&self, key: &str) -> Result<Option<f64>> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| bad(key, "seconds")),
        }
    }

    fn time(&self, key: &str) -> Result<Option<DateTime<Utc>>> {
        match self.str(key)? {
            None => Ok(None),
            Some(s) => crate::time::parse(&s)
                .map(Some)
                .map_err(|_| bad(key, "an ISO 8601 time")),
        }
    }

    fn sigs(&self, key: &str) -> Result<Option<Vec<Signature>>> {
        let v = match self.0.get(key) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Array(a)) if a.is_empty() => return Ok(None),
            Some(v @ Value::Array(_)) => v.clone(),
            Some(v @ Value::Object(_)) => Value::Array(vec![v.clone()]),
            Some(_) => return Err(bad(key, "a signature map or a list of them")),
        };
        serde_json::from_value(v)
            .map(Some)
            .map_err(|_| bad(key, "a signature map or a list of them"))
    }
}

/// A short printable form of arguments, for logs and monitors.
pub fn repr(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > REPR_MAX {
        let mut cut = REPR_MAX - 3;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn composite_maps_expand_to_plain_messages() {
        let group: Signature = serde_json::from_value(json!({
            "task": "celery.group", "subtask_type": "group", "options": {"task_id": "g"},
            "kwargs": {"tasks": [{"task": "a", "args": [1]}, {"task": "b", "args": [2]}]}
        }))
        .unwrap();
        let steps = expand(&group, Some(&json!(0))).unwrap();
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[1].sig.args, vec![json!(0), json!(2)]);
        assert_eq!(steps[1].sig.options["group_id"], json!("g"));
        assert_eq!(steps[1].sig.options["group_index"], json!(1));

        let chain: Signature = serde_json::from_value(json!({
            "task": "celery.chain", "subtask_type": "chain",
            "kwargs": {"tasks": [{"task": "a"}, {"task": "b"}, {"task": "c"}]}
        }))
        .unwrap();
        let steps = expand(&chain, Some(&json!(5))).unwrap();
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].sig.task, "a");
        assert_eq!(steps[0].sig.args, vec![json!(5)]);
        let rest: Vec<&str> = steps[0]
            .chain
            .as_ref()
            .unwrap()
            .iter()
            .map(|s| s.task.as_str())
            .collect();
        assert_eq!(rest, ["c", "b"]);

        let mut chunks = Signature::new("celery.chunks", vec![]);
        chunks.subtask_type = Some("chunks".into());
        assert!(
            expand(&chunks, None)
                .unwrap_err()
                .to_string()
                .contains("not supported")
        );
    }

    fn sender() -> Sender<'static> {
        Sender::new(ContentType::Json, Some("gen1@host"))
    }

    #[test]
    fn options_become_headers_and_embed() {
        let mut sig = Signature::new("tasks.add", vec![json!(1)]);
        sig.options = json!({
            "task_id": "t-1", "queue": "math", "priority": 12, "countdown": 5,
            "parent_id": "p", "root_id": "r", "group_id": "g", "group_index": 2,
            "link": {"task": "tasks.echo"}, "link_error": [{"task": "tasks.log"}],
            "headers": {"tenant": "acme"}, "time_limit": 3, "reply_to": "client-oid"
        })
        .as_object()
        .cloned()
        .unwrap();
        let rest = vec![Signature::new("tasks.mul", vec![json!(2)])];
        let out =
            build_message(&sig, &TaskOptions::default(), Some(rest.clone()), &sender()).unwrap();
        let h = &out.message.headers;
        assert_eq!(h.id, "t-1");
        assert_eq!(h.parent_id.as_deref(), Some("p"));
        assert_eq!(h.root_id.as_deref(), Some("r"));
        assert_eq!(h.group.as_deref(), Some("g"));
        assert_eq!(h.group_index, Some(2));
        assert_eq!(h.timelimit.hard, Some(3.0));
        assert_eq!(h.extra["tenant"], json!("acme"));
        assert!(h.eta.is_some() && out.eta.is_some());
        assert_eq!(out.queue.as_deref(), Some("math"));
        assert_eq!(out.priority, Some(9));
        assert_eq!(
            out.message.properties.reply_to.as_deref(),
            Some("client-oid")
        );
        let body = out.message.decode_body().unwrap();
        assert_eq!(body.args, vec![json!(1)]);
        assert_eq!(body.embed.callbacks.unwrap()[0].task, "tasks.echo");
        assert_eq!(body.embed.errbacks.unwrap()[0].task, "tasks.log");
        assert_eq!(body.embed.chain, Some(rest));
    }

    #[test]
    fn task_options_fill_the_gaps_and_bad_options_are_refused() {
        let sig = Signature::new("tasks.add", vec![]);
        let t = TaskOptions {
            queue: Some("q".into()),
            priority: Some(3),
            ..TaskOptions::default()
        };
        let out = build_message(&sig, &t, None, &sender()).unwrap();
        assert_eq!(out.queue.as_deref(), Some("q"));
        assert_eq!(out.message.properties.priority, 3);
        assert_eq!(
            out.message.headers.root_id.as_deref(),
            Some(out.message.id())
        );

        let mut bad = sig.clone();
        bad.options.insert("countdown".into(), json!("soon"));
        let e = build_message(&bad, &t, None, &sender()).unwrap_err();
        assert!(e.to_string().contains("countdown"), "{e}");
        let mut group = sig;
        group.subtask_type = Some("group".into());
        assert!(build_message(&group, &t, None, &sender()).is_err());
    }

    #[test]
    fn parent_values_are_prepended_unless_immutable() {
        let sig = Signature::new("t", vec![json!(1)]);
        assert_eq!(
            with_parent_value(&sig, json!(0)).args,
            vec![json!(0), json!(1)]
        );
        let mut si = sig;
        si.immutable = true;
        assert_eq!(with_parent_value(&si, json!(0)).args, vec![json!(1)]);
    }

    fn flow(edges: &[(&str, &str)]) -> FlowGraph {
        let mut g = FlowGraph::default();
        for (from, to) in edges {
            for n in [from, to] {
                g.nodes.insert(
                    (*n).to_owned(),
                    FlowNode::new(Signature::new(format!("tasks.{n}"), vec![])),
                );
            }
            g.subs
                .entry((*from).to_owned())
                .or_default()
                .push((*to).to_owned());
        }
        g
    }

    fn map(v: Value) -> Signature {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn nested_composites_plan_into_chords_and_chains() {
        // chain(group(a, b), c, d) is chord(group(a, b), chain(c, d)).
        let c = map(
            json!({"task": "celery.chain", "subtask_type": "chain", "kwargs": {"tasks": [
            {"task": "celery.group", "subtask_type": "group", "options": {"task_id": "g"},
             "kwargs": {"tasks": [{"task": "a"}, {"task": "b"}]}},
            {"task": "c"}, {"task": "d"}]}}),
        );
        let p = plan(&c, None).unwrap();
        assert_eq!(p.groups.len(), 1);
        assert_eq!(p.groups[0].0, "g");
        assert_eq!(p.steps.len(), 2);
        let ids: Vec<&str> = p
            .steps
            .iter()
            .map(|s| s.sig.options["task_id"].as_str().unwrap())
            .collect();
        assert_eq!(p.groups[0].1, ids);
        let body: Signature =
            serde_json::from_value(p.steps[1].sig.options["chord"].clone()).unwrap();
        assert_eq!(body.subtask_type.as_deref(), Some("chain"));
        assert_eq!(p.steps[1].sig.options["group_index"], json!(1));

        // chain(x, chord([a], b), y): x carries the chord, which runs y after its body.
        let c = map(
            json!({"task": "celery.chain", "subtask_type": "chain", "kwargs": {"tasks": [
            {"task": "x"},
            {"task": "celery.chord", "subtask_type": "chord",
             "kwargs": {"header": [{"task": "a"}], "body": {"task": "b"}}},
            {"task": "y"}]}}),
        );
        let p = plan(&c, None).unwrap();
        assert_eq!(p.steps.len(), 1);
        assert_eq!(p.steps[0].sig.task, "x");
        let rest = p.steps[0].chain.clone().unwrap();
        assert_eq!(rest.len(), 2);
        assert_eq!(rest[0].task, "y");
        let p = plan(
            &with_parent_value(&rest[1], json!(7)),
            Some(vec![rest[0].clone()]),
        )
        .unwrap();
        assert_eq!(p.steps[0].sig.task, "a");
        assert_eq!(p.steps[0].sig.args, vec![json!(7)]);
        let body: Signature =
            serde_json::from_value(p.steps[0].sig.options["chord"].clone()).unwrap();
        assert_eq!(body.subtask_type.as_deref(), Some("chain"));

        // group(chain(a, b), c): a carries b; c alone.
        let g = map(
            json!({"task": "celery.group", "subtask_type": "group", "kwargs": {"tasks": [
            {"task": "celery.chain", "subtask_type": "chain", "kwargs": {"tasks": [{"task": "a"}, {"task": "b"}]}},
            {"task": "c"}]}}),
        );
        let p = plan(&g, None).unwrap();
        assert!(p.groups.is_empty());
        assert_eq!(p.steps.len(), 2);
        assert_eq!(p.steps[0].sig.task, "a");
        assert_eq!(p.steps[0].chain.as_ref().unwrap()[0].task, "b");
        assert_eq!(p.steps[1].sig.task, "c");
        // A chain inside a chord header is refused with a clear error.
        let bad = map(
            json!({"task": "celery.chord", "subtask_type": "chord", "kwargs": {
            "header": [{"task": "celery.chain", "subtask_type": "chain", "kwargs": {"tasks": []}}],
            "body": {"task": "b"}}}),
        );
        assert!(
            plan(&bad, None)
                .unwrap_err()
                .to_string()
                .contains("inside a chord header")
        );
    }

    #[test]
    fn a_flow_cycle_is_named() {
        assert!(
            flow(&[("a", "b"), ("b", "c"), ("a", "c")])
                .validate()
                .is_ok()
        );
        let e = flow(&[("a", "b"), ("b", "c"), ("c", "b")])
            .validate()
            .unwrap_err();
        assert_eq!(e.to_string(), "dataflow graph has a cycle: b -> c -> b");
        let e = flow(&[("a", "a")]).validate().unwrap_err();
        assert_eq!(e.to_string(), "dataflow graph has a cycle: a -> a");
        let mut g = flow(&[("a", "b")]);
        g.subs.insert("b".into(), vec!["nope".into()]);
        assert!(g.validate().unwrap_err().to_string().contains("\"nope\""));
    }

    #[test]
    fn a_stream_node_routes_each_item_to_each_subscriber() {
        let mut g = flow(&[("split", "count"), ("split", "len")]);
        g.nodes.get_mut("split").unwrap().stream = true;
        let out = g.route("r1", "split", &json!(["a", "b"])).unwrap();
        let got: Vec<(String, Value)> = out
            .iter()
            .map(|s| (s.task.clone(), s.args[0].clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("tasks.count".into(), json!("a")),
                ("tasks.len".into(), json!("a")),
                ("tasks.count".into(), json!("b")),
                ("tasks.len".into(), json!("b")),
            ]
        );
        let h = FlowHeader::from_headers(out[1].options["headers"].as_object().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!((h.run.as_str(), h.node.as_str()), ("r1", "len"));
        assert_eq!(h.graph, g);
        assert!(g.route("r1", "split", &json!("not a list")).is_err());
        assert!(g.route("r1", "count", &json!(1)).unwrap().is_empty());
    }

    #[test]
    fn tally_outputs_become_increments() {
        assert_eq!(flow_tally("n", &json!("a")).unwrap(), [("a".to_owned(), 1)]);
        assert_eq!(
            flow_tally("n", &json!({"a": 2, "b": 3})).unwrap(),
            [("a".to_owned(), 2), ("b".to_owned(), 3)]
        );
        assert!(flow_tally("n", &json!({"a": 0})).is_err());
        assert!(flow_tally("n", &json!(5)).is_err());
    }
}
