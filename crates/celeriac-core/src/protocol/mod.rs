//! Celery message protocol v2: the one message type celeriac sends and runs.
//!
//! A [`Message`] is what travels through a broker: typed [`Headers`] (task name, id, eta,
//! retries, ...), [`Properties`] (correlation id, priority, ...), a content type, and the
//! serialized body. The body decodes to a [`Body`]: positional `args`, named `kwargs` and the
//! [`Embed`] that carries canvas callbacks.
//!
//! Brokers that keep whole messages as text (SQLite, Redis) store them in kombu's JSON
//! envelope; see [`envelope`]. Python Celery writes and reads the same bytes.

pub mod codec;
pub mod envelope;
mod id;

pub use id::new_id;

use chrono::{DateTime, Utc};
use serde::de::Error as _;
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

pub use codec::ContentType;

use crate::error::{Error, Result};

/// A task message: headers, properties and the serialized body.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Protocol v2 task headers.
    pub headers: Headers,
    /// Transport properties.
    pub properties: Properties,
    /// The body's MIME type, e.g. `application/json`.
    pub content_type: String,
    /// `utf-8` for text codecs, `binary` otherwise.
    pub content_encoding: String,
    /// The serialized [`Body`].
    pub body: Vec<u8>,
}

impl Message {
    /// Builds a message for `headers`, encoding `body` with `content_type`.
    ///
    /// The correlation id is the task id, and the delivery mode persistent.
    pub fn new(headers: Headers, body: &Body, content_type: ContentType) -> Result<Self> {
        let bytes = codec::encode(content_type, body)?;
        let properties = Properties {
            correlation_id: headers.id.clone(),
            ..Properties::default()
        };
        Ok(Message {
            headers,
            properties,
            content_type: content_type.mime().to_owned(),
            content_encoding: content_type.encoding().to_owned(),
            body: bytes,
        })
    }

    /// The task id.
    pub fn id(&self) -> &str {
        &self.headers.id
    }

    /// The registered task name.
    pub fn task(&self) -> &str {
        &self.headers.task
    }

    /// Fails when the body is larger than `limit` bytes (see
    /// [`Config::max_message_size`](crate::Config::max_message_size)); `None` is no limit.
    pub fn check_size(&self, limit: Option<usize>) -> Result<()> {
        match limit {
            Some(limit) if self.body.len() > limit => Err(Error::protocol(format!(
                "the body of task {} ({}) is {} bytes, more than max_message_size ({limit} bytes)",
                self.headers.task,
                self.headers.id,
                self.body.len()
            ))),
            _ => Ok(()),
        }
    }

    /// Decodes the body according to the content type.
    ///
    /// Fails for content types celeriac does not accept (pickle, unknown ones), for compressed
    /// bodies, and for bodies that are not a `[args, kwargs, embed]` triple.
    pub fn decode_body(&self) -> Result<Body> {
        if let Some(c) = self.headers.extra.get("compression") {
            return Err(Error::protocol(format!(
                "compressed bodies are not supported (compression {c})"
            )));
        }
        let ct = ContentType::from_mime(&self.content_type)?;
        codec::decode(ct, &self.body)
    }
}

/// Transport properties of a task message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Properties {
    /// The task id, for task messages.
    pub correlation_id: String,
    /// Where RPC results go; set by Python clients, used only by the `rpc://` backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// 2 = persistent, 1 = transient.
    #[serde(default = "persistent")]
    pub delivery_mode: u8,
    /// 0 (lowest) to 9 (highest): higher runs first. `None`: none was given, and the
    /// message goes where the broker puts Python's tasks sent without one (kombu's default
    /// priority, 0): last on RabbitMQ and SQLite, with the most urgent on Redis (see
    /// celeriac-redis). Envelopes write it as 0, as kombu does; a priority of 0 read from the
    /// wire is `None`, since Python writes 0 for both.
    #[serde(default)]
    pub priority: Option<u8>,
}

fn persistent() -> u8 {
    2
}

impl Default for Properties {
    fn default() -> Self {
        Properties {
            correlation_id: String::new(),
            reply_to: None,
            delivery_mode: 2,
            priority: None,
        }
    }
}

/// `[hard, soft]` time limits in seconds, as on the wire (hard first).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TimeLimit {
    /// After this many seconds the task is stopped.
    pub hard: Option<f64>,
    /// After this many seconds the task is asked to stop (its cancellation fires).
    pub soft: Option<f64>,
}

impl Serialize for TimeLimit {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(2))?;
        seq.serialize_element(&self.hard)?;
        seq.serialize_element(&self.soft)?;
        seq.end()
    }
}

impl<'de> Deserialize<'de> for TimeLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v: Option<Vec<Option<f64>>> = Option::deserialize(d)?;
        match v.as_deref() {
            None | Some([]) => Ok(TimeLimit::default()),
            Some([hard]) => Ok(TimeLimit {
                hard: *hard,
                soft: None,
            }),
            Some([hard, soft]) => Ok(TimeLimit {
                hard: *hard,
                soft: *soft,
            }),
            Some(_) => Err(D::Error::custom("timelimit must be [hard, soft]")),
        }
    }
}

/// Protocol v2 task headers, in the order Python writes them.
///
/// Reading is as lenient as Celery's worker: counts clamp into range (a `retries` of -1 reads
/// as 0), and a time may also be a number of Unix seconds. A header whose value still cannot
/// be read does not fail the whole message: [`envelope::decode`] keeps its value as sent in
/// [`invalid`](Self::invalid), so the worker can refuse the task by id and name, naming the
/// header, and dead-letter the message unchanged.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Headers {
    /// Sender language; informational.
    #[serde(default = "lang")]
    pub lang: String,
    /// Registered task name.
    pub task: String,
    /// Task id (a UUID).
    pub id: String,
    /// Display name override for logs and monitors.
    #[serde(default)]
    pub shadow: Option<String>,
    /// Earliest time to run.
    #[serde(default, with = "crate::time::opt_serde")]
    pub eta: Option<DateTime<Utc>>,
    /// After this time the task is revoked as expired instead of run.
    #[serde(default, with = "crate::time::opt_serde")]
    pub expires: Option<DateTime<Utc>>,
    /// Group id, when part of a group or chord header.
    #[serde(default)]
    pub group: Option<String>,
    /// Position in the group.
    #[serde(default)]
    pub group_index: Option<u32>,
    /// How many times the task has been retried.
    #[serde(default, deserialize_with = "count")]
    pub retries: u32,
    /// `[hard, soft]` time limits.
    #[serde(default)]
    pub timelimit: TimeLimit,
    /// Id of the first task of the workflow (own id when there is no parent).
    #[serde(default)]
    pub root_id: Option<String>,
    /// Id of the task that sent this one.
    #[serde(default)]
    pub parent_id: Option<String>,
    /// Printable form of the args, for logs and monitors.
    #[serde(default)]
    pub argsrepr: Option<String>,
    /// Printable form of the kwargs.
    #[serde(default)]
    pub kwargsrepr: Option<String>,
    /// Node name of the sender.
    #[serde(default)]
    pub origin: Option<String>,
    /// When true, no result is stored.
    #[serde(default, deserialize_with = "null_as_default")]
    pub ignore_result: bool,
    /// Depth of task replacement.
    #[serde(default, deserialize_with = "count")]
    pub replaced_task_nesting: u32,
    /// Names of stamp keys.
    #[serde(default)]
    pub stamped_headers: Option<Vec<String>>,
    /// Stamp values.
    #[serde(default, deserialize_with = "null_as_default")]
    pub stamps: Map<String, Value>,
    /// Any other header (user headers pass through to the task).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// Standard headers whose values could not be read, by name, as they were sent. The typed
    /// field holds its default; serializing writes the value as sent in its place, so a
    /// message with a bad header is forwarded (to a dead-letter queue) unchanged.
    #[serde(skip)]
    pub invalid: Map<String, Value>,
}

impl Serialize for Headers {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;

        /// A time in Celery's format, through [`crate::time::opt_serde`].
        struct Time<'a>(&'a Option<DateTime<Utc>>);
        impl Serialize for Time<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                crate::time::opt_serde::serialize(self.0, s)
            }
        }

        let mut map = s.serialize_map(None)?;
        // Each standard header in Python's order; one that was sent unreadable, as it was sent.
        macro_rules! entry {
            ($key:literal, $value:expr) => {
                match self.invalid.get($key) {
                    Some(sent) => map.serialize_entry($key, sent)?,
                    None => map.serialize_entry($key, $value)?,
                }
            };
        }
        entry!("lang", &self.lang);
        entry!("task", &self.task);
        entry!("id", &self.id);
        entry!("shadow", &self.shadow);
        entry!("eta", &Time(&self.eta));
        entry!("expires", &Time(&self.expires));
        entry!("group", &self.group);
        entry!("group_index", &self.group_index);
        entry!("retries", &self.retries);
        entry!("timelimit", &self.timelimit);
        entry!("root_id", &self.root_id);
        entry!("parent_id", &self.parent_id);
        entry!("argsrepr", &self.argsrepr);
        entry!("kwargsrepr", &self.kwargsrepr);
        entry!("origin", &self.origin);
        entry!("ignore_result", &self.ignore_result);
        entry!("replaced_task_nesting", &self.replaced_task_nesting);
        entry!("stamped_headers", &self.stamped_headers);
        entry!("stamps", &self.stamps);
        for (k, v) in &self.extra {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

fn lang() -> String {
    "py".to_owned()
}

/// A count as Celery's worker reads it: any number, clamped into `0..=u32::MAX` (a
/// `retries` of -1 is 0, of 2**40 is past any `max_retries`); null is 0.
fn count<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None => Ok(0),
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                Ok(u.min(u64::from(u32::MAX)) as u32)
            } else if n.as_i64().is_some() {
                Ok(0)
            } else {
                let f = n.as_f64().unwrap_or(0.0);
                Ok(f.clamp(0.0, f64::from(u32::MAX)) as u32)
            }
        }
        Some(other) => Err(D::Error::custom(format!(
            "expected a non-negative integer, got {other}"
        ))),
    }
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// The standard protocol 2 headers, in the order Python writes them (and [`Headers`] is
/// serialized in).
pub const STANDARD_HEADERS: [&str; 19] = [
    "lang",
    "task",
    "id",
    "shadow",
    "eta",
    "expires",
    "group",
    "group_index",
    "retries",
    "timelimit",
    "root_id",
    "parent_id",
    "argsrepr",
    "kwargsrepr",
    "origin",
    "ignore_result",
    "replaced_task_nesting",
    "stamped_headers",
    "stamps",
];

impl Headers {
    /// Reads headers from a JSON object one header at a time: a standard header whose value
    /// cannot be read goes to [`invalid`](Self::invalid) as it was sent, and the others are
    /// read as usual. Fails only when `task` and `id` are not both strings, since then the
    /// message cannot even be refused by id.
    pub fn from_map(mut map: Map<String, Value>) -> Result<Headers> {
        let whole = match serde_json::from_value::<Headers>(Value::Object(map.clone())) {
            Ok(h) => return Ok(h),
            Err(e) => e,
        };
        let readable = |k: &str| map.get(k).is_some_and(Value::is_string);
        if !readable("task") || !readable("id") {
            return Err(Error::protocol(format!("invalid task headers: {whole}")));
        }
        let mut invalid = Map::new();
        for key in &STANDARD_HEADERS[3..] {
            if let Some(value) = map.get(*key)
                && Self::probe(key, value).is_err()
                && let Some(value) = map.remove(*key)
            {
                invalid.insert((*key).to_owned(), value);
            }
        }
        let mut headers: Headers = serde_json::from_value(Value::Object(map))
            .map_err(|e| Error::protocol(format!("invalid task headers: {e}")))?;
        headers.invalid = invalid;
        Ok(headers)
    }

    /// Reads one standard header alone, as the whole-headers reader would.
    fn probe(key: &str, value: &Value) -> Result<(), serde_json::Error> {
        let mut one = Map::new();
        one.insert("task".to_owned(), Value::String(String::new()));
        one.insert("id".to_owned(), Value::String(String::new()));
        one.insert(key.to_owned(), value.clone());
        serde_json::from_value::<Headers>(Value::Object(one)).map(drop)
    }

    /// Fails, naming each header and why, when some standard header could not be read (see
    /// [`invalid`](Self::invalid)).
    pub fn check(&self) -> Result<()> {
        if self.invalid.is_empty() {
            return Ok(());
        }
        let problems: Vec<String> = self
            .invalid
            .iter()
            .map(|(key, value)| match Self::probe(key, value) {
                Err(e) => format!("`{key}` = {value}: {e}"),
                Ok(()) => format!("`{key}` = {value}"),
            })
            .collect();
        Err(Error::protocol(format!(
            "invalid task header {}",
            problems.join("; ")
        )))
    }

    /// Headers for a new task: every standard key filled, `root_id` = `id`.
    pub fn new(task: impl Into<String>, id: impl Into<String>) -> Self {
        let id = id.into();
        Headers {
            lang: lang(),
            task: task.into(),
            root_id: Some(id.clone()),
            id,
            shadow: None,
            eta: None,
            expires: None,
            group: None,
            group_index: None,
            retries: 0,
            timelimit: TimeLimit::default(),
            parent_id: None,
            argsrepr: None,
            kwargsrepr: None,
            origin: None,
            ignore_result: false,
            replaced_task_nesting: 0,
            stamped_headers: None,
            stamps: Map::new(),
            extra: Map::new(),
            invalid: Map::new(),
        }
    }
}

/// A signature: a task name with stored arguments and options, in Celery's map form.
///
/// Canvas callbacks, chain steps and chord bodies travel as signatures inside [`Embed`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signature {
    /// Task name (`celery.chain`, `celery.group`, `celery.chord` for composites).
    pub task: String,
    /// Stored positional args; a callback's parent result is prepended unless immutable.
    #[serde(default, deserialize_with = "null_as_default")]
    pub args: Vec<Value>,
    /// Stored keyword args.
    #[serde(default, deserialize_with = "null_as_default")]
    pub kwargs: Map<String, Value>,
    /// `apply_async` options (queue, countdown, task_id, ...).
    #[serde(default, deserialize_with = "null_as_default")]
    pub options: Map<String, Value>,
    /// `null` for a plain task; `chain`, `group`, `chord`, ... for composites.
    #[serde(default)]
    pub subtask_type: Option<String>,
    /// When true the parent's result is not prepended.
    #[serde(default, deserialize_with = "null_as_default")]
    pub immutable: bool,
}

impl Signature {
    /// A plain signature of `task` with `args`.
    pub fn new(task: impl Into<String>, args: Vec<Value>) -> Self {
        Signature {
            task: task.into(),
            args,
            kwargs: Map::new(),
            options: Map::new(),
            subtask_type: None,
            immutable: false,
        }
    }
}

/// Canvas data carried in the body: callbacks, errbacks, the rest of a chain, a chord body.
///
/// Always serialized with all four keys (null when empty): Python workers need them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Embed {
    /// Run on success with the result prepended.
    #[serde(default)]
    pub callbacks: Option<Vec<Signature>>,
    /// Run on failure with the failed task id prepended.
    #[serde(default)]
    pub errbacks: Option<Vec<Signature>>,
    /// Remaining chain steps, in reverse: the next step is the last element.
    #[serde(default)]
    pub chain: Option<Vec<Signature>>,
    /// The chord body this task is a header member of.
    #[serde(default)]
    pub chord: Option<Signature>,
}

/// A decoded task body: `[args, kwargs, embed]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Body {
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
    /// Canvas data.
    pub embed: Embed,
}

impl Body {
    /// A body with `args` and `kwargs` and no canvas data.
    pub fn new(args: Vec<Value>, kwargs: Map<String, Value>) -> Self {
        Body {
            args,
            kwargs,
            embed: Embed::default(),
        }
    }
}

impl Serialize for Body {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(3))?;
        seq.serialize_element(&self.args)?;
        seq.serialize_element(&self.kwargs)?;
        seq.serialize_element(&self.embed)?;
        seq.end()
    }
}

impl<'de> Deserialize<'de> for Body {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Body::from_value(v).map_err(D::Error::custom)
    }
}

impl Body {
    /// Reads a body from a decoded value: a 3-array, or (leniently) a 2-array without embed.
    pub fn from_value(v: Value) -> Result<Self, String> {
        let Value::Array(parts) = v else {
            return Err("task body must be an array [args, kwargs, embed]".to_owned());
        };
        if parts.len() != 3 && parts.len() != 2 {
            return Err(format!(
                "task body must have 3 elements [args, kwargs, embed], got {}",
                parts.len()
            ));
        }
        let mut it = parts.into_iter();
        let args = match it.next() {
            Some(Value::Array(a)) => a,
            Some(Value::Null) => Vec::new(),
            _ => return Err("task args must be an array".to_owned()),
        };
        let kwargs = match it.next() {
            Some(Value::Object(m)) => m,
            Some(Value::Null) => Map::new(),
            _ => return Err("task kwargs must be an object".to_owned()),
        };
        let embed = match it.next() {
            None | Some(Value::Null) => Embed::default(),
            Some(v @ Value::Object(_)) => {
                serde_json::from_value(v).map_err(|e| format!("invalid embed: {e}"))?
            }
            Some(_) => return Err("task embed must be an object".to_owned()),
        };
        Ok(Body {
            args,
            kwargs,
            embed,
        })
    }
}

/// Asserts that each `"key":` first appears in `json` in the given order.
#[cfg(test)]
pub(crate) fn assert_key_order(json: &str, keys: &[&str]) {
    let positions: Vec<usize> = keys
        .iter()
        .map(|k| {
            json.find(&format!("\"{k}\":"))
                .unwrap_or_else(|| panic!("key {k} missing in {json}"))
        })
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "keys out of order {keys:?} in {json}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn body_is_always_a_triple_with_four_embed_keys() {
        let body = Body::new(vec![json!(2), json!(2)], Map::new());
        let s = serde_json::to_string(&body).unwrap();
        assert_eq!(
            s,
            r#"[[2,2],{},{"callbacks":null,"errbacks":null,"chain":null,"chord":null}]"#
        );
        let back: Body = serde_json::from_str(&s).unwrap();
        assert_eq!(back, body);
    }

    #[test]
    fn body_errors_are_clear() {
        let e = serde_json::from_str::<Body>(r#"{"task": "x"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be an array"), "{e}");
        let e = serde_json::from_str::<Body>("[[1]]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("3 elements"), "{e}");
        let e = serde_json::from_str::<Body>(r#"[1, {}, {}]"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("args must be an array"), "{e}");
    }

    #[test]
    fn headers_decode_a_minimal_python_message() {
        let h: Headers = serde_json::from_value(json!({"task": "tasks.add", "id": "abc"})).unwrap();
        assert_eq!(h.task, "tasks.add");
        assert_eq!(h.retries, 0);
        assert_eq!(h.timelimit, TimeLimit::default());
        assert!(h.extra.is_empty());
    }

    #[test]
    fn timelimit_is_hard_first_and_accepts_floats() {
        let h: Headers =
            serde_json::from_value(json!({"task": "t", "id": "i", "timelimit": [30, 0.5]}))
                .unwrap();
        assert_eq!(
            h.timelimit,
            TimeLimit {
                hard: Some(30.0),
                soft: Some(0.5)
            }
        );
        let v = serde_json::to_value(h.timelimit).unwrap();
        assert_eq!(v, json!([30.0, 0.5]));
    }

    #[test]
    fn every_standard_header_is_written_in_order() {
        let v = serde_json::to_string(&Headers::new("t", "i")).unwrap();
        assert_key_order(&v, &STANDARD_HEADERS);
        let keys = serde_json::from_str::<Map<String, Value>>(&v).unwrap();
        assert_eq!(keys.len(), STANDARD_HEADERS.len());
    }

    #[test]
    fn user_headers_pass_through() {
        let mut h = Headers::new("t", "i");
        h.extra.insert("tenant".into(), json!("acme"));
        let v = serde_json::to_value(&h).unwrap();
        assert_eq!(v["tenant"], json!("acme"));
        let back: Headers = serde_json::from_value(v).unwrap();
        assert_eq!(back, h);
    }
}
