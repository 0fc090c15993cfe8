//! kombu's JSON envelope for broadcast messages, as Redis (and our SQLite) carry them.
//!
//! The same shape as a task message's envelope (see [`crate::protocol::envelope`]): the JSON
//! body in base64, `content-type` `application/json`, the headers, and `properties` with the
//! exchange and routing key in `delivery_info`. Messages are transient (`delivery_mode` 1).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Map, Value, json};

use super::Broadcasted;
use crate::error::{Error, Result};

/// The envelope of `m`, sent on `exchange`.
pub fn encode(m: &Broadcasted, exchange: &str) -> Vec<u8> {
    let (content_type, body) = m.wire_body();
    encode_as(&m.routing_key, &m.headers, content_type, &body, exchange)
}

/// The envelope of a message whose body is already JSON text (see
/// [`Broadcast::send_event_json`](super::Broadcast::send_event_json)).
///
/// Written into one buffer of the right size, the body base64-encoded in place: a worker's
/// event batches are several kilobytes, and every large allocation costs the allocator a
/// sweep of its small free chunks.
pub fn encode_json(
    routing_key: &str,
    headers: &Map<String, Value>,
    body: &[u8],
    exchange: &str,
) -> Vec<u8> {
    encode_as(routing_key, headers, "application/json", body, exchange)
}

fn encode_as(
    routing_key: &str,
    headers: &Map<String, Value>,
    content_type: &str,
    body: &[u8],
    exchange: &str,
) -> Vec<u8> {
    let encoded = body.len().div_ceil(3) * 4;
    let mut out = Vec::with_capacity(encoded + 512);
    out.extend_from_slice(br#"{"body": ""#);
    let start = out.len();
    out.resize(start + encoded, 0);
    let written = B64
        .encode_slice(body, &mut out[start..])
        .unwrap_or_default();
    out.truncate(start + written);
    out.extend_from_slice(br#"", "content-encoding": "utf-8", "content-type": "#);
    let _ = serde_json::to_writer(&mut out, content_type);
    out.extend_from_slice(br#", "headers": "#);
    // Writing JSON values into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, headers);
    out.extend_from_slice(br#", "properties": "#);
    let properties = json!({
        "delivery_mode": 1,
        "delivery_info": {"exchange": exchange, "routing_key": routing_key},
        "priority": 0,
        "body_encoding": "base64",
        "delivery_tag": crate::protocol::new_id(),
    });
    let _ = serde_json::to_writer(&mut out, &properties);
    out.push(b'}');
    out
}

/// Reads an envelope: its exchange and the message. Errors say what is wrong, for the log.
pub fn decode(bytes: &[u8]) -> Result<(String, Broadcasted)> {
    let doc: Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::protocol("a broadcast message is not JSON").with_source(e))?;
    let Value::Object(mut doc) = doc else {
        return Err(Error::protocol("a broadcast message must be a JSON map"));
    };
    let props = match doc.remove("properties") {
        Some(Value::Object(p)) => p,
        _ => Map::new(),
    };
    let info = props.get("delivery_info");
    let field = |k: &str| {
        info.and_then(|i| i.get(k))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let headers = match doc.remove("headers") {
        Some(Value::Object(h)) => h,
        None | Some(Value::Null) => Map::new(),
        Some(_) => {
            return Err(Error::protocol(
                "a broadcast message's headers must be a map",
            ));
        }
    };
    let raw = match doc.get("body") {
        Some(Value::String(s)) => s.as_str(),
        _ => return Err(Error::protocol("a broadcast message has no body text")),
    };
    let base64 = props.get("body_encoding").and_then(Value::as_str) == Some("base64");
    let bytes = if base64 {
        B64.decode(raw)
            .map_err(|e| Error::protocol("a broadcast body is not base64").with_source(e))?
    } else {
        raw.as_bytes().to_vec()
    };
    let text = |k: &str| doc.get(k).and_then(Value::as_str);
    let (body, signed) =
        Broadcasted::read_body(text("content-type"), text("content-encoding"), &bytes)
            .map_err(|e| Error::protocol(format!("a broadcast message: {e:#}")))?;
    let mut m = Broadcasted::new(field("routing_key"), headers, body);
    m.signed = signed;
    Ok((field("exchange"), m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_read_what_kombu_writes() {
        let mut h = Map::new();
        h.insert("clock".into(), 3.into());
        let m = Broadcasted::new("task.multi", h, json!([{"type": "task-started"}]));
        let (exchange, back) = decode(&encode(&m, "celeryev")).unwrap();
        assert_eq!(exchange, "celeryev");
        assert_eq!(back, m);

        // A signed control request keeps its text and says application/data.
        let signed = Broadcasted {
            body: json!("c2lnbmVk"),
            signed: true,
            ..m
        };
        let wire = encode(&signed, "celery.pidbox");
        let doc: Value = serde_json::from_slice(&wire).unwrap();
        assert_eq!(doc["content-type"], "application/data");
        assert_eq!(doc["body"], B64.encode("c2lnbmVk"));
        assert_eq!(decode(&wire).unwrap().1, signed);

        // As kombu 5.x publishes a pidbox request on Redis.
        let kombu = json!({
            "body": B64.encode(br#"{"method": "ping", "arguments": {}, "destination": null, "pattern": null, "matcher": null}"#),
            "content-encoding": "utf-8", "content-type": "application/json",
            "headers": {"clock": 1, "expires": 1767607535.2},
            "properties": {"delivery_mode": 2, "delivery_info": {"exchange": "celery.pidbox", "routing_key": ""},
                            "priority": 0, "body_encoding": "base64", "delivery_tag": "x"}
        });
        let (exchange, m) = decode(&serde_json::to_vec(&kombu).unwrap()).unwrap();
        assert_eq!(exchange, "celery.pidbox");
        assert_eq!(m.body["method"], "ping");
        assert_eq!(m.headers["clock"], 1);
    }

    #[test]
    fn bad_envelopes_are_named() {
        for (bytes, want) in [
            (b"not json".to_vec(), "not JSON"),
            (b"[1]".to_vec(), "a JSON map"),
            (
                br#"{"body": "x", "content-type": "application/x-python-serialize"}"#.to_vec(),
                "only application/json and signed",
            ),
            (br#"{"body": 5}"#.to_vec(), "no body"),
            (
                br#"{"body": "%%", "properties": {"body_encoding": "base64"}}"#.to_vec(),
                "not base64",
            ),
            (
                br#"{"body": "{", "headers": {}}"#.to_vec(),
                "body is not JSON",
            ),
            (br#"{"body": "1", "headers": 3}"#.to_vec(), "headers"),
        ] {
            let e = decode(&bytes).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
