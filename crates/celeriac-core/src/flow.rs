//! Dataflow graphs on the wire: a graph of task nodes whose outputs are routed to
//! subscribed nodes by the workers, as far as messages and backend counters are concerned.
//!
//! For the facade's `celeriac::flow` (which builds and starts runs and reads their totals) and
//! the worker (which routes each finished message of a run). The whole graph travels in every
//! message of a run (header [`FLOW_HEADER`]), so any worker routes any node's output; the
//! run's counters live in the result backend under the keys named here.

use serde_json::{Map, Value};

use crate::canvas::{repr, with_parent_value};
use crate::error::{Error, Result};
use crate::protocol::Signature;

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
            _ => {
                return Err(Error::protocol("signature option headers must be a map"));
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
