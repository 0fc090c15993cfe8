//! Dataflow graphs: tasks wired by subscriptions, each message a node emits sent on to every
//! node subscribed to it (the Emit use case).
//!
//! For pipelines that are not a fixed shape: a document split into words, each word counted;
//! events fanned out to several consumers. A [`Graph`] has named [`Node`]s, each a task
//! [`Signature`]; [`GraphBuilder::subscribe`] makes one node receive another's output. A
//! [stream](Node::stream) node returns a list and every element is its own message to each
//! subscriber; a [tally](Node::tally) node's output is added to running totals kept in the
//! result backend, readable while the run goes on ([`FlowRun::totals`]).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> celeriac::Result<()> {
//! use std::time::Duration;
//! use celeriac::flow::{Graph, Node};
//! use celeriac::Signature;
//!
//! #[celeriac::task(name = "docs.words")]
//! fn words(text: String) -> Vec<String> {
//!     text.split_whitespace().map(str::to_lowercase).collect()
//! }
//!
//! #[celeriac::task(name = "docs.same")]
//! fn same(word: String) -> String { word }
//!
//! let app = celeriac::App::builder().broker_url("memory://")
//!     .task::<words>().task::<same>().build().await?;
//! # let worker = app.worker(app.worker_options());
//! # let stop = worker.shutdown_handle();
//! # let running = tokio::spawn(worker.run());
//! let graph = Graph::builder()
//!     .node("split", Node::new(Signature::<Vec<String>>::new("docs.words")).stream())
//!     .node("count", Node::new(Signature::<String>::new("docs.same")).tally())
//!     .subscribe("count", "split")
//!     .build()?;
//! let run = graph.start(&app, "split", "the cat saw the dog").await?;
//! run.wait(Duration::from_secs(10)).await?;
//! let totals = run.totals("count").await?;
//! assert_eq!(totals["the"], 2);
//! assert_eq!(totals["dog"], 1);
//! # stop.warm(); running.await.expect("join").expect("worker");
//! # Ok(()) }
//! ```
//!
//! # How a run travels
//!
//! The whole graph goes in every message of a run (the `celeriac_flow` header, see
//! [`celeriac_core::flow::FlowGraph`]), so the worker that finishes a node's message routes
//! its output, whichever process it is and whatever the broker: nothing lives in one
//! process's memory. Each routed message is a plain task message with the input prepended to
//! the node's arguments, sent with the node's options (queue, priority, ...).
//!
//! # Bad graphs
//!
//! [`GraphBuilder::build`] refuses a cycle (the error names it, `a -> b -> a`), a subscription
//! to a node the graph does not have, and two nodes of one name. [`Graph::start`] refuses a
//! node whose task the app does not know, unless the node is [external](Node::external) (a
//! task only the workers, or Python, define).
//!
//! # Counting, and what it does not promise
//!
//! A run keeps three kinds of counters in the result backend: messages pending (up when a
//! node's output is routed, down when a message finishes), messages failed, and the totals of
//! each tally node. Delivery is at least once: a worker killed after a tally node's message
//! was counted but before it was acknowledged runs it again and counts it twice, and a
//! message whose task no worker knows never finishes (its run never reaches zero pending).
//!
//! A node's [rate limit](Node::rate_limit) holds for the whole run across every worker (the
//! routed messages get spaced etas); its task's own `rate_limit` still applies per worker.
//!
//! Not yet: an emitter a task could call mid-run (a stream node emits when it returns).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::{App, Error, ErrorKind, Result, Signature};
use celeriac_core::flow::{
    FlowGraph, FlowNode, flow_failed_key, flow_key_slot_id, flow_keys_key, flow_pending_key,
    flow_total_key,
};
use celeriac_core::protocol::new_id;

/// One node of a [`Graph`]: a task, and how its output is read.
#[derive(Debug, Clone)]
pub struct Node {
    sig: Signature<Value>,
    stream: bool,
    tally: bool,
    external: bool,
    rate: Option<f64>,
}

impl Node {
    /// A node running `sig`; each input is prepended to its arguments (unless the signature is
    /// [immutable](Signature::immutable)). Send options (queue, priority, ...) come along.
    pub fn new<O>(sig: Signature<O>) -> Self {
        Node {
            sig: sig.untyped(),
            stream: false,
            tally: false,
            external: false,
            rate: None,
        }
    }

    /// The task returns a list, and each element is one message to every subscriber.
    #[must_use]
    pub fn stream(mut self) -> Self {
        self.stream = true;
        self
    }

    /// The worker adds the output to the run's running totals (see [`FlowRun::totals`]): a
    /// string adds one to that key, a list of strings one to each, a map `{key: n}` adds `n`.
    #[must_use]
    pub fn tally(mut self) -> Self {
        self.tally = true;
        self
    }

    /// Sends the node's messages to `queue`.
    #[must_use]
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.sig = self.sig.queue(queue);
        self
    }

    /// Sends the node's messages with `priority` (0 to 9).
    #[must_use]
    pub fn priority(mut self, priority: u8) -> Self {
        self.sig = self.sig.priority(priority);
        self
    }

    /// Routes at most `per_second` messages a second to this node, over the whole run and
    /// every worker process: the `n`-th message routed to it is due `(n - 1) / per_second`
    /// seconds after the run began (an eta, held by the broker or the worker). A worker's own
    /// limit on the node's task (`rate_limit`) still applies on top.
    #[must_use]
    pub fn rate_limit(mut self, per_second: f64) -> Self {
        self.rate = Some(per_second);
        self
    }

    /// The task is defined elsewhere (other workers, Python): [`Graph::start`] does not ask
    /// the app's registry for it.
    #[must_use]
    pub fn external(mut self) -> Self {
        self.external = true;
        self
    }
}

/// Collects nodes and subscriptions; [`GraphBuilder::build`] checks them.
#[derive(Debug, Default)]
pub struct GraphBuilder {
    nodes: Vec<(String, Node)>,
    subs: Vec<(String, String)>,
}

impl GraphBuilder {
    /// Adds node `name`.
    #[must_use]
    pub fn node(mut self, name: impl Into<String>, node: Node) -> Self {
        self.nodes.push((name.into(), node));
        self
    }

    /// Makes `subscriber` receive every message `publisher` emits.
    #[must_use]
    pub fn subscribe(
        mut self,
        subscriber: impl Into<String>,
        publisher: impl Into<String>,
    ) -> Self {
        self.subs.push((publisher.into(), subscriber.into()));
        self
    }

    /// The graph, or an error ([`ErrorKind::Config`]) naming a cycle, an unknown node, a
    /// repeated node name or an argument that could not be encoded.
    pub fn build(self) -> Result<Graph> {
        let mut wire = FlowGraph::default();
        let mut external = BTreeSet::new();
        let mut registered = BTreeSet::new();
        for (name, node) in self.nodes {
            if let Some(e) = &node.sig.encode_error {
                return Err(Error::config(format!("dataflow node {name:?}: {e}")));
            }
            if node.external {
                external.insert(name.clone());
            }
            if node.sig.registered_options().is_some() {
                registered.insert(name.clone());
            }
            let mut sig = node.sig.to_wire();
            sig.options.remove("task_id");
            let mut n = FlowNode::new(sig);
            n.stream = node.stream;
            n.tally = node.tally;
            if let Some(r) = node.rate {
                if !(r.is_finite() && r > 0.0) {
                    return Err(Error::config(format!(
                        "dataflow node {name:?}: a rate limit must be a positive number per second, not {r}"
                    )));
                }
                n.rate = Some(r);
            }
            if wire.nodes.insert(name.clone(), n).is_some() {
                return Err(Error::config(format!(
                    "dataflow graph has two nodes named {name:?}"
                )));
            }
        }
        for (from, to) in self.subs {
            let subs = wire.subs.entry(from).or_default();
            if !subs.contains(&to) {
                subs.push(to);
            }
        }
        wire.validate()?;
        Ok(Graph {
            wire,
            external,
            registered,
        })
    }
}

/// A checked dataflow graph: no cycle, every subscription between known nodes.
#[derive(Debug, Clone)]
pub struct Graph {
    wire: FlowGraph,
    external: BTreeSet<String>,
    registered: BTreeSet<String>,
}

impl Graph {
    /// An empty builder.
    pub fn builder() -> GraphBuilder {
        GraphBuilder::default()
    }

    /// The graph in its wire form (what every message of a run carries).
    pub fn wire(&self) -> &FlowGraph {
        &self.wire
    }

    /// Checks that `app` knows every node's task (except [external](Node::external) ones);
    /// the error ([`ErrorKind::UnknownTask`]) names the node and the task.
    pub fn check(&self, app: &App) -> Result<()> {
        for (name, node) in &self.wire.nodes {
            let known = self.external.contains(name)
                || self.registered.contains(name)
                || app.registry().get(&node.sig.task).is_some();
            if !known {
                return Err(Error::new(
                    ErrorKind::UnknownTask,
                    format!(
                        "dataflow node {name:?} runs task {:?}, which this app does not know \
                         (register it, or mark the node external)",
                        node.sig.task
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Starts a run: checks the graph against `app` ([`Graph::check`]) and sends `input` to
    /// node `entry`. Nothing is sent when a check fails.
    pub async fn start(&self, app: &App, entry: &str, input: impl Serialize) -> Result<FlowRun> {
        self.check(app)?;
        let input = serde_json::to_value(input)
            .map_err(|e| Error::protocol(format!("cannot encode the dataflow input: {e}")))?;
        let run = FlowRun::from_id(app, new_id());
        let mut wire = self.wire.clone();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        wire.started = Some(now);
        let sig = wire.message_for(&run.id, entry, input)?;
        let backend = app.backend();
        backend.incr(&flow_pending_key(&run.id), 1).await?;
        if let Err(e) = app.send_wire(&sig, None, None).await {
            backend.incr(&flow_pending_key(&run.id), -1).await?;
            return Err(e);
        }
        Ok(run)
    }
}

/// A handle on one run of a [`Graph`]: its counters and running totals.
#[derive(Debug, Clone)]
pub struct FlowRun {
    app: App,
    id: String,
}

impl FlowRun {
    /// A handle on run `id` (e.g. one started by another process).
    pub fn from_id(app: &App, id: impl Into<String>) -> Self {
        FlowRun {
            app: app.clone(),
            id: id.into(),
        }
    }

    /// The run id.
    pub fn id(&self) -> &str {
        &self.id
    }

    async fn read(&self, key: &str) -> Result<i64> {
        self.app.backend().incr(key, 0).await
    }

    /// Messages of the run sent and not finished yet.
    pub async fn pending(&self) -> Result<i64> {
        self.read(&flow_pending_key(&self.id)).await
    }

    /// Messages of the run that failed (their output went nowhere).
    pub async fn failed(&self) -> Result<i64> {
        self.read(&flow_failed_key(&self.id)).await
    }

    /// Tally node `node`'s running totals so far, by key.
    pub async fn totals(&self, node: &str) -> Result<BTreeMap<String, i64>> {
        let backend = self.app.backend();
        let n = self.read(&flow_keys_key(&self.id, node)).await?;
        let mut out = BTreeMap::new();
        for slot in 1..=n {
            // A key whose slot is taken but not yet written shows up on a later read.
            let Some(meta) = backend.get(&flow_key_slot_id(&self.id, node, slot)).await? else {
                continue;
            };
            let Value::String(key) = meta.result else {
                continue;
            };
            let total = self.read(&flow_total_key(&self.id, node, &key)).await?;
            out.insert(key, total);
        }
        Ok(out)
    }

    /// Waits until no message of the run is pending; fails with [`ErrorKind::Timeout`] after
    /// `timeout`.
    pub async fn wait(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut interval = Duration::from_millis(5);
        loop {
            if self.pending().await? <= 0 {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!("dataflow run {} not finished after {timeout:?}", self.id),
                ));
            }
            tokio::time::sleep(interval.min(deadline - now)).await;
            interval = (interval * 2).min(Duration::from_millis(200));
        }
    }
}
