//! Fuzz targets for the decoders of untrusted input in celeriac-core: what arrives from a
//! broker (task envelopes, protocol v2 headers and bodies, canvas signatures and their options),
//! what arrives on the broadcast exchanges (remote-control requests and replies, events), and the
//! text fields read from them (times, rate limits, task states, URLs). Every target must return
//! (an error is fine) and never panic; see `celeriac_test::fuzz` for the budget and the
//! regression inputs.

use celeriac_core::broadcast::control::{Reply, Request};
use celeriac_core::broadcast::event::Event;
use celeriac_core::canvas::SendOptions;
use celeriac_core::protocol::{Body, Headers, Signature, envelope};
use celeriac_core::{ContentType, RateLimit, TaskState};
use celeriac_test::fuzz::fuzz;
use celeriac_test::services::test_message;
use serde_json::{Map, Value, json};

/// Keys and values the decoders look for.
const DICTIONARY: &[&[u8]] = &[
    b"\"id\"",
    b"\"task\"",
    b"\"eta\"",
    b"\"expires\"",
    b"\"retries\"",
    b"\"timelimit\"",
    b"\"group_index\"",
    b"\"root_id\"",
    b"\"parent_id\"",
    b"\"argsrepr\"",
    b"\"lang\"",
    b"\"body\"",
    b"\"headers\"",
    b"\"properties\"",
    b"\"body_encoding\"",
    b"\"base64\"",
    b"\"content-type\"",
    b"\"content-encoding\"",
    b"\"application/json\"",
    b"\"application/x-msgpack\"",
    b"\"delivery_info\"",
    b"\"priority\"",
    b"\"callbacks\"",
    b"\"errbacks\"",
    b"\"chain\"",
    b"\"chord\"",
    b"\"subtask_type\"",
    b"\"options\"",
    b"\"immutable\"",
    b"\"kwargs\"",
    b"\"args\"",
    b"null",
    b"true",
    b"[]",
    b"{}",
    b"\"\"",
    b"\"2026-12-06T10:00:00+00:00\"",
    b"\"method\"",
    b"\"arguments\"",
    b"\"destination\"",
    b"\"reply_to\"",
    b"\"ticket\"",
    b"\"type\"",
    b"\"hostname\"",
    b"\"timestamp\"",
    b"\"task-succeeded\"",
    b"\"worker-heartbeat\"",
    b"\"clock\"",
    b"\"countdown\"",
];

fn task_envelopes() -> Vec<Vec<u8>> {
    let mut m = test_message("tasks.add");
    let plain = envelope::encode(&m, "", "celery").unwrap();
    m.headers.eta = Some(chrono::Utc::now());
    m.headers.retries = 3;
    let with_eta = envelope::encode(&m, "celery", "celery").unwrap();
    // What a Python client sends on Redis (protocol 2) and an old protocol 1 message.
    let python = br#"{"body": "W1syLCAyXSwge30sIHsiY2FsbGJhY2tzIjogbnVsbCwgImVycmJhY2tzIjogbnVsbCwgImNoYWluIjogbnVsbCwgImNob3JkIjogbnVsbH1d", "content-encoding": "utf-8", "content-type": "application/json", "headers": {"lang": "py", "task": "tasks.add", "id": "8a6d4d4e-1b5e-4b8e-9a3e-1c1f0b0e6a01", "shadow": null, "eta": null, "expires": null, "group": null, "group_index": null, "retries": 0, "timelimit": [null, null], "root_id": "8a6d4d4e-1b5e-4b8e-9a3e-1c1f0b0e6a01", "parent_id": null, "argsrepr": "(2, 2)", "kwargsrepr": "{}", "origin": "gen1@host", "ignore_result": false, "replaced_task_nesting": 0, "stamped_headers": null, "stamps": {}}, "properties": {"correlation_id": "8a6d4d4e-1b5e-4b8e-9a3e-1c1f0b0e6a01", "reply_to": "b7b0f2e0-0c4e-3b0e-8f43-5b7f4d3e2a10", "delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key": "celery"}, "priority": 0, "body_encoding": "base64", "delivery_tag": "0f1a6c1e-8d52-4f2e-9d0a-3f5a1c2b7e44"}}"#.to_vec();
    let v1 = br#"{"body": "eyJ0YXNrIjogInRhc2tzLmFkZCIsICJpZCI6ICJhYmMiLCAiYXJncyI6IFsxLCAyXSwgImt3YXJncyI6IHt9LCAicmV0cmllcyI6IDAsICJldGEiOiBudWxsfQ==", "content-encoding": "utf-8", "content-type": "application/json", "headers": {}, "properties": {"body_encoding": "base64", "delivery_info": {"exchange": "celery", "routing_key": "celery"}, "delivery_tag": "t1"}}"#.to_vec();
    vec![plain, with_eta, python, v1]
}

#[test]
fn fuzz_task_envelope() {
    let seeds = task_envelopes();
    let seeds: Vec<&[u8]> = seeds.iter().map(Vec::as_slice).collect();
    fuzz("task_envelope", &seeds, DICTIONARY, |input| {
        let Ok(m) = envelope::decode(input) else {
            return;
        };
        let _ = m.headers.check();
        let _ = m.check_size(Some(1 << 20));
        let _ = m.decode_body();
        // What was read can be written again, and reads back as the same task.
        let again = envelope::encode(&m, "", "celery").expect("a decoded message encodes");
        let back = envelope::decode(&again).expect("an encoded message decodes");
        assert_eq!(back.id(), m.id());
        assert_eq!(back.task(), m.task());
    });
}

#[test]
fn fuzz_headers_one_by_one() {
    let m = test_message("tasks.add");
    let seed = serde_json::to_vec(&m.headers).unwrap();
    fuzz("headers", &[&seed], DICTIONARY, |input| {
        if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(input) {
            if let Ok(h) = Headers::from_map(map) {
                let _ = h.check();
                let _ = serde_json::to_vec(&h).expect("headers serialize");
            }
        }
    });
}

#[test]
fn fuzz_body_and_canvas() {
    let chain = json!({"task": "tasks.mul", "args": [2], "kwargs": {}, "options": {"queue": "q",
        "countdown": 1.5, "expires": "2026-12-06T10:00:00+00:00", "priority": 3, "task_id": "x"},
        "subtask_type": null, "immutable": false, "chord_size": null});
    let body = json!([[1, 2], {"a": [1.5, null]}, {"callbacks": [chain], "errbacks": null,
        "chain": [chain, chain], "chord": chain, "group_index": 0}]);
    let seed = serde_json::to_vec(&body).unwrap();
    let msgpack = celeriac_core::protocol::codec::encode(ContentType::MsgPack, &body).ok();
    let mut seeds: Vec<&[u8]> = vec![&seed];
    if let Some(m) = &msgpack {
        seeds.push(m);
    }
    fuzz("body", &seeds, DICTIONARY, |input| {
        for ct in [ContentType::Json, ContentType::MsgPack] {
            let Ok(v) = celeriac_core::protocol::codec::decode::<Value>(ct, input) else {
                continue;
            };
            let _ = Body::from_value(v.clone());
            for sig in v.as_array().into_iter().flatten().filter(|s| s.is_object()) {
                if let Ok(s) = serde_json::from_value::<Signature>(sig.clone()) {
                    let _ = SendOptions::from_wire(&s.options);
                }
                for step in sig.as_object().into_iter().flat_map(|o| o.values()) {
                    if let Ok(s) = serde_json::from_value::<Signature>(step.clone()) {
                        let _ = SendOptions::from_wire(&s.options);
                    }
                }
            }
            if let Value::Object(o) = &v {
                let _ = SendOptions::from_wire(o);
            }
        }
    });
}

#[test]
fn fuzz_broadcast() {
    let mut headers = Map::new();
    headers.insert("clock".into(), json!(3));
    headers.insert("expires".into(), json!(1e12));
    let request = celeriac_core::broadcast::Broadcasted::new(
        "",
        headers.clone(),
        json!({"method": "rate_limit", "arguments": {"task_name": "tasks.add", "rate_limit": "10/m"},
               "destination": ["w1@host"], "pattern": null, "matcher": null,
               "ticket": "t-1", "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "k"}}),
    );
    let reply = celeriac_core::broadcast::Broadcasted::new(
        "k",
        headers.clone(),
        json!({"w1@host": {"ok": "pong"}}),
    );
    let events = celeriac_core::broadcast::Broadcasted::new(
        "task.multi",
        headers,
        json!([{"type": "task-succeeded", "hostname": "w1@host", "timestamp": 1.7e9,
                "uuid": "u", "result": "4", "runtime": 0.1, "clock": 9, "local_received": 1.7e9},
               {"type": "worker-heartbeat", "hostname": "w1@host", "timestamp": 1.7e9,
                "freq": 2.0, "active": 0, "processed": 10, "loadavg": [0.1, 0.2, 0.3],
                "sw_ident": "celeriac", "sw_ver": "0.1.0", "sw_sys": "Linux"}]),
    );
    let seeds: Vec<Vec<u8>> = [request, reply, events]
        .iter()
        .map(|m| celeriac_core::broadcast::envelope::encode(m, "celery.pidbox"))
        .collect();
    let seeds: Vec<&[u8]> = seeds.iter().map(Vec::as_slice).collect();
    fuzz("broadcast", &seeds, DICTIONARY, |input| {
        let Ok((_, m)) = celeriac_core::broadcast::envelope::decode(input) else {
            return;
        };
        if let Ok(r) = Request::from_message(&m) {
            let _ = r.request.is_for("w1@host");
            let _ = r.request.to_message(1, r.expires);
        }
        let _ = Reply::from_message(&m);
        for e in Event::from_message(&m).into_iter().flatten() {
            let _ = (e.kind(), e.hostname(), e.timestamp(), e.clock(), e.uuid());
            let _ = serde_json::to_vec(&e.to_value());
        }
    });
}

#[test]
fn fuzz_text_fields() {
    let seeds: &[&[u8]] = &[
        b"2026-12-06T10:00:00.123456+01:00",
        b"2026-12-06 10:00:00",
        b"1733480000.5",
        b"10/m",
        b"0.5/s",
        b"100/h",
        b"SUCCESS",
        b"redis://:secret@127.0.0.1:6379/0;redis://:other@h2:6380/1",
        b"amqp://guest:guest@127.0.0.1:5672//",
        b"sqlite:///var/lib/app/celeriac.db",
    ];
    fuzz(
        "text_fields",
        seeds,
        &[b":", b"/", b"@", b"T", b"+", b"Z", b"."],
        |input| {
            let s = String::from_utf8_lossy(input);
            let _ = celeriac_core::time::parse(&s);
            let _ = s.parse::<RateLimit>();
            let _ = s.parse::<TaskState>();
            let redacted = celeriac_core::url::redact(&s);
            let _ = celeriac_core::url::scheme(&s);
            // The password of the first URL never survives in its authority (the part before
            // the path), whatever follows.
            if let Some(rest) = s.strip_prefix("redis://:") {
                let authority = rest.split(['/', ';']).next().unwrap_or_default();
                if authority.contains('@') {
                    let shown = redacted["redis://".len()..]
                        .split(['/', ';'])
                        .next()
                        .unwrap();
                    let userinfo = shown.rsplit_once('@').map(|(u, _)| u);
                    assert_eq!(userinfo, Some(":***"), "{s} -> {redacted}");
                }
            }
        },
    );
}
