//! kombu's JSON envelope: a whole message as one JSON document.
//!
//! Transports without native message properties (Redis, SQL) store every message this way:
//! `{"body", "content-encoding", "content-type", "headers", "properties"}` with the body in
//! base64. Celeriac's SQLite broker stores the same text, so a message can be inspected with
//! any JSON tool and moved between brokers unchanged.
//!
//! Decoding also accepts protocol 1 messages (all fields in the body, empty headers) and turns
//! them into protocol 2, as Celery's worker does.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::{Body, ContentType, Embed, Headers, Message, Properties, TimeLimit, codec};
use crate::error::{Error, Result};

#[derive(Serialize)]
struct Out<'a> {
    body: String,
    #[serde(rename = "content-encoding")]
    content_encoding: &'a str,
    #[serde(rename = "content-type")]
    content_type: &'a str,
    headers: &'a Headers,
    properties: OutProps<'a>,
}

#[derive(Serialize)]
struct OutProps<'a> {
    correlation_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_to: Option<&'a str>,
    delivery_mode: u8,
    delivery_info: DeliveryInfo<'a>,
    priority: u8,
    body_encoding: &'static str,
    delivery_tag: String,
}

#[derive(Serialize)]
struct DeliveryInfo<'a> {
    exchange: &'a str,
    routing_key: &'a str,
}

/// Writes `message` as kombu's JSON envelope, published to `exchange` with `routing_key`.
///
/// The body is base64, and the delivery tag a fresh UUID, as kombu writes them.
pub fn encode(message: &Message, exchange: &str, routing_key: &str) -> Result<Vec<u8>> {
    let out = Out {
        body: B64.encode(&message.body),
        content_encoding: &message.content_encoding,
        content_type: &message.content_type,
        headers: &message.headers,
        properties: OutProps {
            correlation_id: &message.properties.correlation_id,
            reply_to: message.properties.reply_to.as_deref(),
            delivery_mode: message.properties.delivery_mode,
            delivery_info: DeliveryInfo {
                exchange,
                routing_key,
            },
            // kombu writes 0 when no priority was given.
            priority: message.properties.priority.unwrap_or(0),
            body_encoding: "base64",
            delivery_tag: super::new_id(),
        },
    };
    Ok(serde_json::to_vec(&out)?)
}

/// The envelope as read by the fast path: the body and headers stay raw text until it is
/// known what they hold.
#[derive(Deserialize)]
struct In<'a> {
    #[serde(borrow, default)]
    body: Option<&'a RawValue>,
    #[serde(rename = "content-encoding", borrow, default)]
    content_encoding: Option<Cow<'a, str>>,
    #[serde(rename = "content-type", borrow, default)]
    content_type: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    headers: Option<&'a RawValue>,
    #[serde(borrow, default)]
    properties: Option<RawObject<'a>>,
}

/// The task properties of an envelope's `properties` object; fields of an unexpected type
/// are ignored.
fn properties_of(props: &RawObject<'_>) -> Properties {
    Properties {
        correlation_id: props
            .str("correlation_id")
            .map(Cow::into_owned)
            .unwrap_or_default(),
        reply_to: props.str("reply_to").map(Cow::into_owned),
        delivery_mode: props.u64("delivery_mode").map_or(2, |m| m.min(2) as u8),
        // kombu's default priority, 0, is what Python writes when none was given.
        priority: props
            .u64("priority")
            .filter(|p| *p > 0)
            .map(|p| p.min(255) as u8),
    }
}

/// The common case read without building a JSON tree: a protocol 2 envelope whose body is a
/// string and whose headers name a task. `None` sends every other envelope (protocol 1, a
/// JSON body, anything malformed) to the general path, which also words the errors; so both
/// paths accept and refuse the same messages.
fn decode_fast(bytes: &[u8]) -> Option<(Message, RawObject<'_>)> {
    let env: In<'_> = serde_json::from_slice(bytes).ok()?;
    let props = env.properties?;
    let raw_body = env.body?;
    if !raw_body.get().starts_with('"') {
        return None;
    }
    let body: Cow<'_, str> = serde_json::from_str(raw_body.get()).ok()?;
    let body = match props.str("body_encoding").as_deref() {
        Some("base64") => B64.decode(body.as_bytes()).ok()?,
        _ => body.into_owned().into_bytes(),
    };
    let headers: Headers = serde_json::from_str(env.headers?.get()).ok()?;
    let mut properties = properties_of(&props);
    if properties.correlation_id.is_empty() {
        properties.correlation_id = headers.id.clone();
    }
    let message = Message {
        headers,
        properties,
        content_type: env
            .content_type
            .map_or_else(|| "application/json".to_owned(), Cow::into_owned),
        content_encoding: env
            .content_encoding
            .map_or_else(|| "utf-8".to_owned(), Cow::into_owned),
        body,
    };
    Some((message, props))
}

/// Reads a kombu JSON envelope (protocol 2 or 1) into a [`Message`].
pub fn decode(bytes: &[u8]) -> Result<Message> {
    decode_with_properties(bytes).map(|(m, _)| m)
}

/// Reads a kombu JSON envelope like [`decode`], and also returns its `properties` object as
/// sent (empty when there is none): transports keep their own fields there (kombu's delivery
/// tag and `delivery_info`, a redelivered flag), and reading them from this saves a second
/// parse of the message.
pub fn decode_with_properties(bytes: &[u8]) -> Result<(Message, RawObject<'_>)> {
    if let Some(decoded) = decode_fast(bytes) {
        return Ok(decoded);
    }
    decode_general(bytes)
}

/// Reads any envelope through a JSON tree: protocol 1, JSON bodies, and the errors.
fn decode_general(bytes: &[u8]) -> Result<(Message, RawObject<'_>)> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::protocol("message is not a json envelope").with_source(e))?;
    let Value::Object(mut env) = v else {
        return Err(Error::protocol("message envelope must be a json object"));
    };
    let content_type =
        take_str(&mut env, "content-type").unwrap_or_else(|| "application/json".to_owned());
    let content_encoding =
        take_str(&mut env, "content-encoding").unwrap_or_else(|| "utf-8".to_owned());
    let props = match env.remove("properties") {
        Some(Value::Object(p)) => p,
        None | Some(Value::Null) => Map::new(),
        Some(_) => return Err(Error::protocol("envelope properties must be an object")),
    };
    let body = match env.remove("body") {
        Some(Value::String(s)) => {
            if props.get("body_encoding").and_then(Value::as_str) == Some("base64") {
                B64.decode(s.as_bytes()).map_err(|e| {
                    Error::protocol("envelope body is not valid base64").with_source(e)
                })?
            } else {
                s.into_bytes()
            }
        }
        Some(Value::Null) | None => return Err(Error::protocol("envelope has no body")),
        Some(other) => serde_json::to_vec(&other)?,
    };
    // The same object again, as the raw form callers get (this path is the rare one).
    let props = raw_properties(bytes);
    let properties = properties_of(&props);
    let headers = env.remove("headers").unwrap_or(Value::Null);
    let has_task = headers.get("task").is_some_and(|t| !t.is_null());
    if has_task {
        let Value::Object(headers) = headers else {
            return Err(Error::protocol("task headers must be a json object"));
        };
        let headers = Headers::from_map(headers)?;
        let mut properties = properties;
        if properties.correlation_id.is_empty() {
            properties.correlation_id = headers.id.clone();
        }
        let message = Message {
            headers,
            properties,
            content_type,
            content_encoding,
            body,
        };
        return Ok((message, props));
    }
    from_protocol_v1(&content_type, &body, properties).map(|m| (m, props))
}

fn take_str(map: &mut Map<String, Value>, key: &str) -> Option<String> {
    match map.remove(key) {
        Some(Value::String(s)) => Some(s),
        _ => None,
    }
}

/// Converts a protocol 1 message (everything in the body) into protocol 2.
fn from_protocol_v1(
    content_type: &str,
    body: &[u8],
    mut properties: Properties,
) -> Result<Message> {
    let ct = ContentType::from_mime(content_type)?;
    let v: Value = codec::decode(ct, body)?;
    let Value::Object(mut m) = v else {
        return Err(Error::protocol(
            "not a celery task message: no task header and the body is not a protocol 1 map",
        ));
    };
    let Some(Value::String(task)) = m.remove("task") else {
        return Err(Error::protocol(
            "not a celery task message: no task name in headers or body",
        ));
    };
    let Some(Value::String(id)) = m.remove("id") else {
        return Err(Error::protocol("protocol 1 message has no task id"));
    };
    let mut headers = Headers::new(task, id.clone());
    let time = |v: Option<Value>| -> Result<_> {
        match v {
            Some(Value::String(s)) => crate::time::parse(&s).map(Some),
            _ => Ok(None),
        }
    };
    headers.eta = time(m.remove("eta"))?;
    headers.expires = time(m.remove("expires"))?;
    headers.retries = m.remove("retries").and_then(|r| r.as_u64()).unwrap_or(0) as u32;
    let group = m.remove("group").filter(|g| !g.is_null());
    headers.group = match group.or_else(|| m.remove("taskset")) {
        Some(Value::String(g)) => Some(g),
        _ => None,
    };
    headers.group_index = m
        .remove("group_index")
        .and_then(|g| g.as_u64())
        .map(|g| g as u32);
    if let Some(tl) = m.remove("timelimit") {
        headers.timelimit = serde_json::from_value::<TimeLimit>(tl).unwrap_or_default();
    }
    let args = match m.remove("args") {
        Some(Value::Array(a)) => a,
        _ => Vec::new(),
    };
    let kwargs = match m.remove("kwargs") {
        Some(Value::Object(k)) => k,
        _ => Map::new(),
    };
    let sigs = |v: Option<Value>| -> Option<Vec<super::Signature>> {
        v.and_then(|v| serde_json::from_value(v).ok())
    };
    let embed = Embed {
        callbacks: sigs(m.remove("callbacks")),
        errbacks: sigs(m.remove("errbacks")),
        chain: None,
        chord: m
            .remove("chord")
            .and_then(|c| serde_json::from_value(c).ok()),
    };
    let body = Body {
        args,
        kwargs,
        embed,
    };
    if properties.correlation_id.is_empty() {
        properties.correlation_id = id;
    }
    Ok(Message {
        headers,
        properties,
        content_type: ContentType::Json.mime().to_owned(),
        content_encoding: ContentType::Json.encoding().to_owned(),
        body: codec::encode(ContentType::Json, &body)?,
    })
}

/// The `properties` object of an envelope already read as a JSON tree, read again without
/// decoding its values; empty when it cannot be (say, when the envelope repeats a key).
fn raw_properties(bytes: &[u8]) -> RawObject<'_> {
    #[derive(Deserialize)]
    struct Only<'a> {
        #[serde(borrow, default)]
        properties: Option<RawObject<'a>>,
    }
    serde_json::from_slice::<Only<'_>>(bytes)
        .ok()
        .and_then(|o| o.properties)
        .unwrap_or_default()
}

/// A JSON object read without decoding its values: each key with its value's JSON text, both
/// borrowed from the message (a key with escapes is unescaped into a copy).
///
/// What [`decode_with_properties`] returns for an envelope's `properties`: transports read a
/// few of its fields, and decoding all of them into a [`Map`] cost about ten allocations per
/// message. The typed getters read a field when it has their JSON type and give `None`
/// otherwise, as [`Value`]'s `as_*` methods do; a repeated key reads as its last value, as it
/// does in a [`Map`].
#[derive(Debug, Default, Clone)]
pub struct RawObject<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> RawObject<'a> {
    /// The JSON text of `key`'s value.
    pub fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    /// `key`'s value when it is a string.
    pub fn str(&self, key: &str) -> Option<Cow<'a, str>> {
        let text: &'a str = self.get(key)?.get();
        match serde_json::from_str::<&'a str>(text) {
            Ok(s) => Some(Cow::Borrowed(s)),
            // A string with escapes cannot be borrowed; anything else is not a string.
            Err(_) => serde_json::from_str::<String>(text).ok().map(Cow::Owned),
        }
    }

    /// `key`'s value when it is a non-negative integer that fits a `u64`.
    pub fn u64(&self, key: &str) -> Option<u64> {
        serde_json::from_str(self.get(key)?.get()).ok()
    }

    /// `key`'s value when it is a number.
    pub fn f64(&self, key: &str) -> Option<f64> {
        serde_json::from_str(self.get(key)?.get()).ok()
    }

    /// `key`'s value when it is `true` or `false`.
    pub fn bool(&self, key: &str) -> Option<bool> {
        serde_json::from_str(self.get(key)?.get()).ok()
    }

    /// `key`'s value when it is an object.
    pub fn object(&self, key: &str) -> Option<RawObject<'a>> {
        serde_json::from_str(self.get(key)?.get()).ok()
    }

    /// Whether `key`'s value is a string, told from its JSON text without unescaping it.
    pub fn is_str(&self, key: &str) -> bool {
        self.get(key).is_some_and(|v| v.get().starts_with('"'))
    }

    /// Whether `key` is present (with any value, `null` included).
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
}

/// Equal when the same keys hold the same JSON text, in the same order.
impl PartialEq for RawObject<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(&other.0)
                .all(|((ka, va), (kb, vb))| ka == kb && va.get() == vb.get())
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawObject<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = RawObject<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> std::result::Result<Self::Value, M::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(Key(k)) = map.next_key::<Key<'a>>()? {
                    fields.push((k, map.next_value::<&'a RawValue>()?));
                }
                Ok(RawObject(fields))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// An object's key, borrowed when it has no escapes.
#[derive(Deserialize)]
struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use serde_json::json;

    /// The complete message of celery-wire.md §2.5, as it sits in Redis, written by hand.
    const PY_MESSAGE: &str = r#"{"body": "W1syLCAyXSwge30sIHsiY2FsbGJhY2tzIjogbnVsbCwgImVycmJhY2tzIjogbnVsbCwgImNoYWluIjogbnVsbCwgImNob3JkIjogbnVsbH1d",
 "content-encoding": "utf-8", "content-type": "application/json",
 "headers": {"lang": "py", "task": "proj.tasks.add", "id": "3f0e8d4c-1c2b-4a59-8e7d-6b5a4c3d2e1f",
             "shadow": null, "eta": "2026-01-05T10:15:30.250000+00:00",
             "expires": "2026-01-05T10:16:20.250000+00:00", "group": null, "group_index": null,
             "retries": 0, "timelimit": [30, 20], "root_id": "3f0e8d4c-1c2b-4a59-8e7d-6b5a4c3d2e1f",
             "parent_id": null, "argsrepr": "(2, 2)", "kwargsrepr": "{}", "origin": "gen4242@build-01",
             "ignore_result": false, "replaced_task_nesting": 0, "stamped_headers": null, "stamps": {}},
 "properties": {"correlation_id": "3f0e8d4c-1c2b-4a59-8e7d-6b5a4c3d2e1f",
                "reply_to": "55d606cb-8f74-314c-aae5-41b36c5c970b", "delivery_mode": 2,
                "expiration": "60000",
                "delivery_info": {"exchange": "", "routing_key": "celery"}, "priority": 5,
                "body_encoding": "base64", "delivery_tag": "f267f1e1-fc42-41a8-9586-fe3375a52891"}}"#;

    /// Each getter of a raw object reads what the matching `Value::as_*` reads from the same
    /// object decoded as a tree: strings with and without escapes, numbers of every kind,
    /// other types, escaped and repeated keys.
    #[test]
    fn raw_object_reads_what_a_json_tree_reads() {
        let text = r#"{"s": "plain", "e": "caf\u00e9 \"q\"", "n": 5, "neg": -3, "f": 2.5,
            "big": 18446744073709551616, "t": true, "z": null, "a": [1], "o": {"k": "v", "x": 1},
            "k\u00e9y": "escaped key", "dup": 1, "dup": "last"}"#;
        let raw: RawObject<'_> = serde_json::from_str(text).unwrap();
        let tree: Map<String, Value> = serde_json::from_str(text).unwrap();
        let keys = [
            "s", "e", "n", "neg", "f", "big", "t", "z", "a", "o", "kéy", "dup", "missing",
        ];
        for k in keys {
            let v = tree.get(k);
            assert_eq!(raw.str(k).as_deref(), v.and_then(Value::as_str), "{k}");
            assert_eq!(raw.u64(k), v.and_then(Value::as_u64), "{k}");
            assert_eq!(raw.f64(k), v.and_then(Value::as_f64), "{k}");
            assert_eq!(raw.bool(k), v.and_then(Value::as_bool), "{k}");
            assert_eq!(raw.contains_key(k), v.is_some(), "{k}");
            assert_eq!(
                raw.object(k).is_some(),
                v.is_some_and(Value::is_object),
                "{k}"
            );
        }
        let o = raw.object("o").unwrap();
        assert_eq!(o.str("k").as_deref(), Some("v"));
        assert_eq!(o.u64("x"), Some(1));
        assert!(
            matches!(raw.str("s"), Some(Cow::Borrowed("plain"))),
            "borrowed"
        );
        assert!(serde_json::from_str::<RawObject<'_>>("[1]").is_err());
    }

    /// The fast path either declines or reads exactly what the general path reads.
    #[test]
    fn fast_and_general_paths_agree() {
        let ours = {
            let mut h = Headers::new("tasks.add", "id-1");
            h.extra
                .insert("custom".into(), json!({"a": [1, 2.5, null]}));
            let body = Body::new(vec![json!(1)], Map::new());
            let mut m = Message::new(h, &body, ContentType::Json).unwrap();
            m.properties.reply_to = Some("r".into());
            m.properties.priority = Some(7);
            encode(&m, "", "q").unwrap()
        };
        let py = PY_MESSAGE.as_bytes().to_vec();
        let variants: Vec<Vec<u8>> = vec![
            ours.clone(),
            py.clone(),
            // Odd property types are ignored, as the general path ignores them.
            PY_MESSAGE
                .replace("\"delivery_mode\": 2", "\"delivery_mode\": \"x\"")
                .replace("\"priority\": 5", "\"priority\": -3")
                .into_bytes(),
            // No correlation id: the task id stands in.
            PY_MESSAGE
                .replace("\"correlation_id\": \"3f0e8d4c-1c2b-4a59-8e7d-6b5a4c3d2e1f\",", "")
                .into_bytes(),
            // A body that is not base64-encoded, with escapes in it.
            br#"{"body": "[[\"\\u00e9\"], {}, {}]", "content-type": "application/json",
                "headers": {"task": "t", "id": "i"}, "properties": {}}"#
                .to_vec(),
            // Declined by the fast path: protocol 1, a JSON body, no properties, null task.
            br#"{"body": {"task": "t", "id": "i", "args": [1]}, "headers": {}, "properties": {}}"#
                .to_vec(),
            br#"{"body": "e30=", "headers": {"task": null, "id": "i"}, "properties": {"body_encoding": "base64"}}"#
                .to_vec(),
            br#"{"body": "[[], {}, {}]", "headers": {"task": "t", "id": "i"}}"#.to_vec(),
            br#"{"body": "[[], {}, {}]", "headers": {"task": "t", "id": "i"}, "properties": 3}"#
                .to_vec(),
            br#"{"body": "%%%", "headers": {"task": "t", "id": "i"}, "properties": {"body_encoding": "base64"}}"#
                .to_vec(),
        ];
        let mut fast = 0;
        for v in &variants {
            let general = decode_general(v);
            if let Some(quick) = decode_fast(v) {
                fast += 1;
                let text = String::from_utf8_lossy(v);
                assert_eq!(Some(&quick), general.as_ref().ok(), "{text}");
            }
            assert_eq!(
                decode_with_properties(v).map_err(|e| e.to_string()),
                general.map_err(|e| e.to_string())
            );
        }
        // The common messages do take the fast path.
        assert_eq!(fast, 5);
        assert!(decode_fast(&ours).is_some() && decode_fast(&py).is_some());
    }

    #[test]
    fn decodes_a_python_celery_message() {
        let m = decode(PY_MESSAGE.as_bytes()).unwrap();
        assert_eq!(m.task(), "proj.tasks.add");
        assert_eq!(m.id(), "3f0e8d4c-1c2b-4a59-8e7d-6b5a4c3d2e1f");
        let eta = Utc.with_ymd_and_hms(2026, 1, 5, 10, 15, 30).unwrap()
            + chrono::Duration::milliseconds(250);
        assert_eq!(m.headers.eta, Some(eta));
        assert_eq!(
            m.headers.timelimit,
            TimeLimit {
                hard: Some(30.0),
                soft: Some(20.0)
            }
        );
        assert_eq!(m.headers.origin.as_deref(), Some("gen4242@build-01"));
        assert_eq!(m.properties.priority, Some(5));
        assert_eq!(
            m.properties.reply_to.as_deref(),
            Some("55d606cb-8f74-314c-aae5-41b36c5c970b")
        );
        let body = m.decode_body().unwrap();
        assert_eq!(body.args, vec![json!(2), json!(2)]);
        assert!(body.kwargs.is_empty());
        assert_eq!(body.embed, Embed::default());
    }

    #[test]
    fn encodes_what_kombu_writes_and_reads_it_back() {
        let m = decode(PY_MESSAGE.as_bytes()).unwrap();
        let bytes = encode(&m, "", "celery").unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        crate::protocol::assert_key_order(
            &text,
            &[
                "body",
                "content-encoding",
                "content-type",
                "headers",
                "properties",
            ],
        );
        assert_eq!(v["properties"]["body_encoding"], "base64");
        assert_eq!(
            v["properties"]["delivery_info"],
            json!({"exchange": "", "routing_key": "celery"})
        );
        assert_eq!(v["properties"]["delivery_tag"].as_str().unwrap().len(), 36);
        crate::protocol::assert_key_order(
            &text,
            &[
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
            ],
        );
        assert_eq!(v["headers"]["eta"], "2026-01-05T10:15:30.250000+00:00");
        assert_eq!(v["headers"]["timelimit"], json!([30.0, 20.0]));
        let back = decode(&bytes).unwrap();
        assert_eq!(back, m);
    }

    /// No priority is written as kombu's default, 0 (what Python writes when none is given),
    /// and 0, a missing priority or one of another type reads as none.
    #[test]
    fn no_priority_is_kombus_default_zero() {
        let mut m = decode(PY_MESSAGE.as_bytes()).unwrap();
        m.properties.priority = None;
        let bytes = encode(&m, "", "celery").unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["properties"]["priority"], 0);
        assert_eq!(decode(&bytes).unwrap(), m);
        for (text, want) in [
            ("\"priority\": 0", None),
            ("\"priority\": \"high\"", None),
            ("\"priority\": null", None),
            ("\"priority\": 1", Some(1)),
        ] {
            let env = PY_MESSAGE.replace("\"priority\": 5", text);
            assert_eq!(
                decode(env.as_bytes()).unwrap().properties.priority,
                want,
                "{text}"
            );
        }
        let env = PY_MESSAGE.replace("\"priority\": 5,", "");
        assert_eq!(decode(env.as_bytes()).unwrap().properties.priority, None);
    }

    #[test]
    fn accepts_a_raw_utf8_body_and_redelivered_noise() {
        let raw = r#"{"body": "[[1], {}, {}]", "content-type": "application/json",
            "headers": {"task": "t", "id": "i", "redelivered": true}, "properties": {}}"#;
        let m = decode(raw.as_bytes()).unwrap();
        assert_eq!(m.properties.correlation_id, "i");
        assert_eq!(m.decode_body().unwrap().args, vec![json!(1)]);
    }

    #[test]
    fn converts_protocol_1() {
        let body = r#"{"task": "proj.tasks.add", "id": "c5a564a7", "args": [1, 2], "kwargs": {},
            "group": null, "retries": 1, "eta": "2026-01-05T10:15:30.672544+00:00", "expires": null,
            "utc": true, "callbacks": null, "errbacks": null, "timelimit": [10, 5], "taskset": "g1", "chord": null}"#;
        let env = json!({"body": body, "content-type": "application/json", "headers": {}, "properties": {}});
        let m = decode(env.to_string().as_bytes()).unwrap();
        assert_eq!(m.task(), "proj.tasks.add");
        assert_eq!(m.headers.retries, 1);
        assert_eq!(m.headers.group.as_deref(), Some("g1"));
        assert_eq!(
            m.headers.timelimit,
            TimeLimit {
                hard: Some(10.0),
                soft: Some(5.0)
            }
        );
        assert_eq!(m.decode_body().unwrap().args, vec![json!(1), json!(2)]);
    }

    #[test]
    fn malformed_envelopes_get_clear_errors() {
        for (raw, want) in [
            ("not json", "not a json envelope"),
            ("[1,2]", "must be a json object"),
            (r#"{"headers": {"task": "t", "id": "i"}}"#, "no body"),
            (
                r#"{"body": "e30=", "properties": {"body_encoding": "base64"}, "headers": {}}"#,
                "no task name",
            ),
            (
                r#"{"body": "!!", "properties": {"body_encoding": "base64"}, "headers": {"task": "t", "id": "i"}}"#,
                "base64",
            ),
            (
                r#"{"body": "x", "headers": {"task": "t"}}"#,
                "invalid task headers",
            ),
        ] {
            let e = decode(raw.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(want), "{raw}: {e}");
        }
    }

    /// An envelope of task `t`, id `i`, with `extra` merged into its headers.
    fn with_headers(extra: Value) -> Vec<u8> {
        let mut headers = json!({"lang": "py", "task": "t", "id": "i", "argsrepr": "(1,)"});
        for (k, v) in extra.as_object().unwrap() {
            headers[k] = v.clone();
        }
        let env = json!({"body": B64.encode(r#"[[1], {}, {}]"#), "content-type": "application/json",
            "content-encoding": "utf-8", "headers": headers,
            "properties": {"body_encoding": "base64", "delivery_tag": "d", "priority": 0}});
        serde_json::to_vec(&env).unwrap()
    }

    #[test]
    fn a_bad_header_is_kept_as_sent_and_named_while_the_others_are_read() {
        for (key, bad, why) in [
            ("eta", json!("tomorrow"), "invalid iso-8601 time"),
            ("expires", json!([1]), "ISO-8601"),
            ("timelimit", json!("30"), "invalid type"),
            ("group_index", json!(-1), "invalid value"),
            ("retries", json!("2"), "non-negative integer"),
            ("eta", json!(1e300), "out of range"),
        ] {
            let bytes = with_headers(json!({ key: bad.clone(), "tenant": "acme" }));
            let m = decode(&bytes).unwrap_or_else(|e| panic!("{key}: {e}"));
            assert_eq!((m.id(), m.task()), ("i", "t"), "{key}");
            assert_eq!(m.headers.argsrepr.as_deref(), Some("(1,)"), "{key}");
            assert_eq!(m.headers.extra["tenant"], json!("acme"), "{key}");
            assert_eq!(m.headers.invalid.get(key), Some(&bad), "{key}");
            let e = m.headers.check().unwrap_err().to_string();
            assert!(
                e.contains(&format!("`{key}` = {bad}")) && e.contains(why),
                "{e}"
            );
            // Written back, the header is as it was sent: the message is forwarded intact.
            let again = decode(&encode(&m, "", "q").unwrap()).unwrap();
            assert_eq!(again.headers.invalid.get(key), Some(&bad), "{key}");
            assert_eq!(again.body, m.body);
        }
    }

    #[test]
    fn headers_python_accepts_are_read_leniently() {
        let m = decode(&with_headers(json!({"retries": -1}))).unwrap();
        assert_eq!(m.headers.retries, 0);
        let m = decode(&with_headers(json!({"retries": 1u64 << 40}))).unwrap();
        assert_eq!(m.headers.retries, u32::MAX);
        let m = decode(&with_headers(json!({"retries": 2.0}))).unwrap();
        assert_eq!(m.headers.retries, 2);
        let m = decode(&with_headers(json!({"eta": 1_767_608_130.5, "expires": 0}))).unwrap();
        assert_eq!(
            m.headers.eta.map(crate::time::format).as_deref(),
            Some("2026-01-05T10:15:30.500000+00:00")
        );
        assert_eq!(m.headers.expires, None);
        for m in [&m, &decode(&with_headers(json!({"retries": -1}))).unwrap()] {
            assert!(m.headers.invalid.is_empty());
            m.headers.check().unwrap();
        }
    }

    #[test]
    fn without_a_readable_id_or_name_the_message_cannot_be_read() {
        for extra in [json!({"id": 5, "retries": -1}), json!({"task": ["t"]})] {
            let e = decode(&with_headers(extra.clone()))
                .unwrap_err()
                .to_string();
            assert!(e.contains("invalid task headers"), "{extra}: {e}");
        }
    }
}
