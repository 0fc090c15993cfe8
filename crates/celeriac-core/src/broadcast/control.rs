//! Remote-control requests and replies (Celery's pidbox, §10 of the wire notes).
//!
//! A [`Request`] names a method, its arguments, and who should act on it (a list of node
//! names, or a glob or regex pattern, or everybody). When it wants replies it carries a
//! `ticket` and the reply queue's routing key; each node that acts answers with a [`Reply`],
//! `{"<node>": <answer>}` under the same ticket.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Broadcasted, REPLY_EXCHANGE};
use crate::error::{Error, Result};

/// The read-only commands (`celery inspect`), by their names.
pub const INSPECT_COMMANDS: &[&str] = &[
    "ping",
    "stats",
    "active",
    "reserved",
    "scheduled",
    "revoked",
    "registered",
    "query_task",
    "active_queues",
    "conf",
    "report",
    "clock",
    "hello",
];

/// The commands that change a worker (`celery control`), by their names.
pub const CONTROL_COMMANDS: &[&str] = &[
    "revoke",
    "terminate",
    "revoke_by_stamped_headers",
    "rate_limit",
    "time_limit",
    "shutdown",
    "pool_grow",
    "pool_shrink",
    "autoscale",
    "pool_restart",
    "add_consumer",
    "cancel_consumer",
    "enable_events",
    "disable_events",
    "heartbeat",
];

/// A command's name without Celery's older aliases (`dump_active` is `active`).
pub fn canonical_command(method: &str) -> &str {
    match method {
        "dump_active" => "active",
        "dump_reserved" => "reserved",
        "dump_schedule" => "scheduled",
        "dump_revoked" => "revoked",
        "dump_tasks" => "registered",
        "dump_conf" => "conf",
        other => other,
    }
}

/// Which remote-control commands a worker obeys (`[worker] control_allow`): every one (the
/// default, as Celery), or only those listed. A list holds command names and the groups
/// `inspect` (every read-only command) and `control` (every command that changes the worker).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ControlAllow {
    /// Every command.
    #[default]
    All,
    /// Only these commands (canonical names).
    Only(std::collections::BTreeSet<String>),
}

impl ControlAllow {
    /// Reads a list of names and groups; an unknown name is an error that lists the known.
    pub fn from_names<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> Result<Self> {
        let mut only = std::collections::BTreeSet::new();
        for name in names {
            let name = name.as_ref().trim();
            match name {
                "all" => return Ok(ControlAllow::All),
                "inspect" => only.extend(INSPECT_COMMANDS.iter().map(|c| (*c).to_owned())),
                "control" => only.extend(CONTROL_COMMANDS.iter().map(|c| (*c).to_owned())),
                _ => {
                    let c = canonical_command(name);
                    if !INSPECT_COMMANDS.contains(&c) && !CONTROL_COMMANDS.contains(&c) {
                        return Err(Error::config(format!(
                            "unknown remote-control command {name:?} in control_allow (known: \
                             the groups all, inspect and control, and {}, {})",
                            INSPECT_COMMANDS.join(", "),
                            CONTROL_COMMANDS.join(", ")
                        )));
                    }
                    only.insert(c.to_owned());
                }
            }
        }
        Ok(ControlAllow::Only(only))
    }

    /// Whether a request of `method` is obeyed. A method that is no command at all is let
    /// through, to be answered as unknown.
    pub fn allows(&self, method: &str) -> bool {
        let c = canonical_command(method);
        match self {
            ControlAllow::All => true,
            ControlAllow::Only(only) => {
                only.contains(c)
                    || (!INSPECT_COMMANDS.contains(&c) && !CONTROL_COMMANDS.contains(&c))
            }
        }
    }
}

impl<'de> Deserialize<'de> for ControlAllow {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        ControlAllow::from_names(names).map_err(serde::de::Error::custom)
    }
}

/// Where a request wants its replies: Celery's `reply_to` map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyTo {
    /// The reply exchange (`reply.celery.pidbox`).
    pub exchange: String,
    /// The reply queue's routing key (the client's id).
    pub routing_key: String,
}

impl ReplyTo {
    /// Replies to the queue bound under `routing_key` on the reply exchange.
    pub fn new(routing_key: impl Into<String>) -> Self {
        ReplyTo {
            exchange: REPLY_EXCHANGE.to_owned(),
            routing_key: routing_key.into(),
        }
    }
}

/// A remote-control request, as Celery's `Mailbox` sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// The command: `ping`, `stats`, `rate_limit`, `revoke`, ...
    pub method: String,
    /// Its arguments, by name; handlers ignore names they do not know.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub arguments: Map<String, Value>,
    /// Only these nodes act; `None` or empty: see `pattern`, else every node.
    #[serde(default)]
    pub destination: Option<Vec<String>>,
    /// With `matcher`: nodes whose name matches act.
    #[serde(default)]
    pub pattern: Option<String>,
    /// How `pattern` matches: `glob` (fnmatch) or `pcre` (a regex matching at the start).
    #[serde(default)]
    pub matcher: Option<String>,
    /// Present when replies are wanted: replies carry it back.
    #[serde(default)]
    pub ticket: Option<String>,
    /// Where replies go, when wanted.
    #[serde(default)]
    pub reply_to: Option<ReplyTo>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Map<String, Value>, D::Error> {
    Ok(Option::<Map<String, Value>>::deserialize(d)?.unwrap_or_default())
}

/// A received request with what its headers said.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// The request.
    pub request: Request,
    /// The sender's Lamport clock, if sent.
    pub clock: Option<u64>,
    /// When the sender stops waiting for replies (Unix seconds), if it said.
    pub expires: Option<f64>,
}

impl Request {
    /// A request of `method` with `arguments`, for every node, wanting no reply.
    pub fn new(method: impl Into<String>, arguments: Map<String, Value>) -> Self {
        Request {
            method: method.into(),
            arguments,
            destination: None,
            pattern: None,
            matcher: None,
            ticket: None,
            reply_to: None,
        }
    }

    /// Whether node `node` should act on this request: it is named in `destination`, or,
    /// with no destination, matches `pattern`; with neither, every node acts. A pattern
    /// whose matcher is unknown, or a regex that does not compile, matches no node.
    pub fn is_for(&self, node: &str) -> bool {
        if let Some(d) = self.destination.as_ref().filter(|d| !d.is_empty()) {
            return d.iter().any(|n| n == node);
        }
        let Some(pattern) = self.pattern.as_deref() else {
            return true;
        };
        match self.matcher.as_deref() {
            None | Some("glob") => fnmatch(pattern, node),
            Some("pcre") => {
                regex_lite::Regex::new(&format!("^(?:{pattern})")).is_ok_and(|r| r.is_match(node))
            }
            Some(_) => false,
        }
    }

    /// Reads a request from a broadcast message; an error says what is wrong with it.
    pub fn from_message(m: &Broadcasted) -> Result<Received> {
        let request: Request = serde_json::from_value(m.body.clone()).map_err(|e| {
            Error::protocol("a control request must be a map with a method").with_source(e)
        })?;
        if request.method.is_empty() {
            return Err(Error::protocol("a control request names no method"));
        }
        Ok(Received {
            request,
            clock: m.headers.get("clock").and_then(Value::as_u64),
            expires: m
                .headers
                .get("expires")
                .and_then(Value::as_f64)
                .filter(|e| *e > 0.0),
        })
    }

    /// The broadcast message of this request, with the sender's `clock` and the time its
    /// sender stops waiting (`expires`, Unix seconds; Celery sends 0 for none).
    pub fn to_message(&self, clock: u64, expires: Option<f64>) -> Broadcasted {
        let mut headers = Map::new();
        headers.insert("clock".into(), clock.into());
        headers.insert("expires".into(), expires.unwrap_or(0.0).into());
        Broadcasted::new(
            "",
            headers,
            serde_json::to_value(self).unwrap_or(Value::Null),
        )
    }
}

/// One node's reply to a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The request's ticket.
    pub ticket: String,
    /// The node that answered.
    pub node: String,
    /// Its answer (conventionally `{"ok": ...}` or `{"error": ...}`, or a command's own shape).
    pub answer: Value,
    /// The node's clock when it answered.
    pub clock: Option<u64>,
}

impl Reply {
    /// The message carrying this reply to the queue bound under `routing_key`.
    pub fn to_message(&self, routing_key: &str) -> Broadcasted {
        let mut headers = Map::new();
        headers.insert("ticket".into(), self.ticket.clone().into());
        if let Some(c) = self.clock {
            headers.insert("clock".into(), c.into());
        }
        let mut body = Map::new();
        body.insert(self.node.clone(), self.answer.clone());
        Broadcasted::new(routing_key, headers, Value::Object(body))
    }

    /// Reads a reply from a message: `{"<node>": <answer>}` with a `ticket` header.
    pub fn from_message(m: &Broadcasted) -> Result<Reply> {
        let ticket = m
            .headers
            .get("ticket")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::protocol("a control reply has no ticket header"))?;
        let (node, answer) = match &m.body {
            Value::Object(o) if o.len() == 1 => o.iter().next().expect("one entry"),
            _ => {
                return Err(Error::protocol(
                    "a control reply must be a map of one node name to its answer",
                ));
            }
        };
        Ok(Reply {
            ticket: ticket.to_owned(),
            node: node.clone(),
            answer: answer.clone(),
            clock: m.headers.get("clock").and_then(Value::as_u64),
        })
    }
}

/// Sends `request` to every node with a fresh ticket and a reply queue of this process, and
/// collects the replies for `wait`, or until `limit` replies came (Celery's `Mailbox` call
/// with `reply=True`). Replies to other tickets are ignored, malformed ones logged.
pub async fn collect(
    channels: &dyn super::Broadcast,
    clock: &super::Clock,
    mut request: Request,
    wait: std::time::Duration,
    limit: Option<usize>,
) -> Result<Vec<Reply>> {
    let (key, mut inbox) = channels.reply_inbox().await?;
    let ticket = crate::protocol::new_id();
    request.ticket = Some(ticket.clone());
    request.reply_to = Some(ReplyTo::new(key));
    let expires = super::event::now_unix() + wait.as_secs_f64();
    channels
        .send_control(&request.to_message(clock.forward(), Some(expires)))
        .await?;
    let deadline = tokio::time::Instant::now() + wait;
    let mut replies = Vec::new();
    while limit.is_none_or(|l| replies.len() < l) {
        match tokio::time::timeout_at(deadline, inbox.next()).await {
            Ok(Ok(Some(m))) => match Reply::from_message(&m) {
                Ok(r) if r.ticket == ticket => {
                    if let Some(c) = r.clock {
                        clock.adjust(c);
                    }
                    replies.push(r);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "dropping a malformed control reply"),
            },
            Ok(Ok(None)) | Err(_) => break,
            Ok(Err(e)) => return Err(e),
        }
    }
    Ok(replies)
}

/// Python's `fnmatch.fnmatchcase`: `*` any run, `?` one character, `[seq]` / `[!seq]` one
/// character of (or not of) a set with ranges; anything else matches itself.
pub fn fnmatch(pattern: &str, name: &str) -> bool {
    fn class(p: &[char], c: char) -> Option<(bool, usize)> {
        // p starts after '['; returns (matched, length of the class including ']').
        let (negate, mut i) = match p.first() {
            Some('!') => (true, 1),
            _ => (false, 0),
        };
        let start = i;
        let mut hit = false;
        while i < p.len() {
            if p[i] == ']' && i > start {
                return Some((hit != negate, i + 1));
            }
            if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
                hit |= p[i] <= c && c <= p[i + 2];
                i += 3;
            } else {
                hit |= p[i] == c;
                i += 1;
            }
        }
        None
    }
    fn go(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|i| go(&p[1..], &n[i..])),
            Some('?') => !n.is_empty() && go(&p[1..], &n[1..]),
            Some('[') => match (
                n.first(),
                class(&p[1..], n.first().copied().unwrap_or('\0')),
            ) {
                (Some(_), Some((true, len))) => go(&p[1 + len..], &n[1..]),
                (Some(_), Some((false, _))) | (None, Some(_)) => false,
                // An unclosed `[` is a literal.
                (_, None) => n.first() == Some(&'[') && go(&p[1..], &n[1..]),
            },
            Some(c) => n.first() == Some(c) && go(&p[1..], &n[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_allow_list_reads_groups_names_and_aliases() {
        let a = ControlAllow::from_names(["inspect", "revoke"]).unwrap();
        for m in ["ping", "stats", "dump_active", "revoke", "frobnicate"] {
            assert!(a.allows(m), "{m}");
        }
        for m in ["shutdown", "rate_limit", "pool_restart", "terminate"] {
            assert!(!a.allows(m), "{m}");
        }
        assert_eq!(
            ControlAllow::from_names(["ping", "all"]).unwrap(),
            ControlAllow::All
        );
        assert!(ControlAllow::from_names(Vec::<String>::new()).unwrap() != ControlAllow::All);
        assert!(
            !ControlAllow::from_names(Vec::<String>::new())
                .unwrap()
                .allows("ping")
        );
        let e = ControlAllow::from_names(["shutdwon"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"shutdwon\"") && e.contains("shutdown"), "{e}");
        let every = ControlAllow::from_names(["control"]).unwrap();
        assert!(every.allows("shutdown") && !every.allows("ping"));
    }

    use super::*;
    use serde_json::json;

    fn request(body: Value) -> Request {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn celerys_request_reads_and_says_who_acts() {
        let r = request(json!({
            "method": "rate_limit",
            "arguments": {"task_name": "tasks.add", "rate_limit": "10/m"},
            "destination": ["w1@host"], "pattern": null, "matcher": null,
            "ticket": "t-1",
            "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "k"}
        }));
        assert!(r.is_for("w1@host"));
        assert!(!r.is_for("w2@host"));
        assert_eq!(r.reply_to, Some(ReplyTo::new("k")));

        let everyone = request(json!({"method": "ping", "arguments": null, "destination": []}));
        assert!(everyone.is_for("anyone@x"));
        assert!(everyone.arguments.is_empty());

        let glob = request(json!({"method": "ping", "pattern": "w[12]@*", "matcher": "glob"}));
        assert!(glob.is_for("w1@host") && glob.is_for("w2@h") && !glob.is_for("w3@host"));
        let pcre = request(json!({"method": "ping", "pattern": "w\\d@", "matcher": "pcre"}));
        assert!(pcre.is_for("w7@host") && !pcre.is_for("xw7@host"));
        let bad = request(json!({"method": "ping", "pattern": "(", "matcher": "pcre"}));
        assert!(!bad.is_for("w1@host"));
        let unknown = request(json!({"method": "ping", "pattern": "*", "matcher": "sql"}));
        assert!(!unknown.is_for("w1@host"));
    }

    #[test]
    fn messages_round_trip_and_bad_ones_are_named() {
        let mut r = Request::new("ping", Map::new());
        r.ticket = Some("t".into());
        r.reply_to = Some(ReplyTo::new("oid"));
        let m = r.to_message(7, Some(1.5e9));
        let back = Request::from_message(&m).unwrap();
        assert_eq!(back.request, r);
        assert_eq!((back.clock, back.expires), (Some(7), Some(1.5e9)));
        assert_eq!(
            Request::from_message(&r.to_message(1, None))
                .unwrap()
                .expires,
            None
        );

        for body in [
            json!("ping"),
            json!({"arguments": {}}),
            json!({"method": ""}),
        ] {
            let m = Broadcasted::new("", Map::new(), body.clone());
            assert!(Request::from_message(&m).is_err(), "{body}");
        }

        let reply = Reply {
            ticket: "t".into(),
            node: "w1@h".into(),
            answer: json!({"ok": "pong"}),
            clock: Some(9),
        };
        let m = reply.to_message("oid");
        assert_eq!(m.body, json!({"w1@h": {"ok": "pong"}}));
        assert_eq!(Reply::from_message(&m).unwrap(), reply);
        let no_ticket = Broadcasted::new("oid", Map::new(), m.body.clone());
        assert!(Reply::from_message(&no_ticket).is_err());
    }

    #[test]
    fn fnmatch_is_pythons() {
        assert!(fnmatch("celery@*", "celery@host"));
        assert!(fnmatch("w?@h", "w1@h"));
        assert!(!fnmatch("w?@h", "w12@h"));
        assert!(fnmatch("w[0-9]", "w5"));
        assert!(!fnmatch("w[!0-9]", "w5"));
        assert!(fnmatch("w[!0-9]", "wx"));
        assert!(fnmatch("a[", "a["));
        assert!(fnmatch("*", ""));
        assert!(!fnmatch("a", "ab"));
    }
}
