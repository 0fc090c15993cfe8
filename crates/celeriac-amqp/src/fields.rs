//! AMQP field tables ↔ JSON values, encoded as py-amqp encodes them.
//!
//! Task headers are a JSON-shaped map. On AMQP they travel as a field table, and Python reads
//! them with py-amqp, so we write what py-amqp writes (celery-wire.md §8.6): strings `S`,
//! booleans `t`, floats `d`, integers `I` when they fit in 32 signed bits, else `l` (signed 64,
//! RabbitMQ's convention; py-amqp writes `L`, which amqprs does not model), maps `F`, lists
//! `A`, null `V`. Reading accepts every tag amqprs knows.

use amqprs::{FieldArray, FieldName, FieldTable, FieldValue};
use serde_json::{Map, Number, Value};

/// A JSON value as a field value.
pub(crate) fn to_field(v: &Value) -> FieldValue {
    match v {
        Value::Null => FieldValue::V,
        Value::Bool(b) => FieldValue::t(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                match i32::try_from(i) {
                    Ok(small) => FieldValue::I(small),
                    Err(_) => FieldValue::l(i),
                }
            } else if let Some(u) = n.as_u64() {
                // Beyond i64: no integer tag holds it; a double is the closest Python reads.
                FieldValue::d(u as f64)
            } else {
                FieldValue::d(n.as_f64().unwrap_or(0.0))
            }
        }
        Value::String(s) => long_str(s),
        Value::Array(items) => {
            let vals: Vec<FieldValue> = items.iter().map(to_field).collect();
            FieldValue::A(FieldArray::try_from(vals).unwrap_or_default())
        }
        Value::Object(map) => FieldValue::F(to_table(map)),
    }
}

fn long_str(s: &str) -> FieldValue {
    match s.try_into() {
        Ok(ls) => FieldValue::S(ls),
        Err(_) => FieldValue::V,
    }
}

/// A JSON map as a field table; keys longer than 255 bytes (not representable) are dropped.
pub(crate) fn to_table(map: &Map<String, Value>) -> FieldTable {
    let mut t = FieldTable::new();
    for (k, v) in map {
        if let Ok(name) = FieldName::try_from(k.as_str()) {
            t.insert(name, to_field(v));
        }
    }
    t
}

/// A field value as JSON.
pub(crate) fn from_field(v: &FieldValue) -> Value {
    match v {
        FieldValue::V => Value::Null,
        FieldValue::t(b) => Value::Bool(*b),
        FieldValue::b(i) => Value::from(*i),
        FieldValue::B(i) => Value::from(*i),
        FieldValue::s(i) => Value::from(*i),
        FieldValue::u(i) => Value::from(*i),
        FieldValue::I(i) => Value::from(*i),
        FieldValue::i(i) => Value::from(*i),
        FieldValue::l(i) => Value::from(*i),
        FieldValue::f(f) => Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number),
        FieldValue::d(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        FieldValue::D(d) => Value::String(d.to_string()),
        FieldValue::S(s) => Value::String(s.as_ref().clone()),
        FieldValue::A(a) => Value::Array(
            Vec::<FieldValue>::from(a.clone())
                .iter()
                .map(from_field)
                .collect(),
        ),
        FieldValue::T(t) => Value::from(*t),
        FieldValue::F(t) => Value::Object(from_table(t)),
        FieldValue::x(bytes) => {
            let raw: Vec<u8> = bytes.clone().into();
            Value::String(String::from_utf8_lossy(&raw).into_owned())
        }
    }
}

/// A field table as a JSON map.
pub(crate) fn from_table(t: &FieldTable) -> Map<String, Value> {
    t.as_ref()
        .iter()
        .map(|(k, v)| (k.as_ref().clone(), from_field(v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn task_headers_round_trip_with_void_and_arrays() {
        let v = json!({"id": "x", "eta": null, "timelimit": [null, 2.5], "retries": 3,
            "big": 5_000_000_000_i64, "neg": -7, "stamps": {"a": ["b"]}, "ok": true});
        let Value::Object(m) = &v else { unreachable!() };
        let t = to_table(m);
        assert!(matches!(
            t.get(&"eta".try_into().unwrap()),
            Some(FieldValue::V)
        ));
        assert!(matches!(
            t.get(&"retries".try_into().unwrap()),
            Some(FieldValue::I(3))
        ));
        assert!(matches!(
            t.get(&"big".try_into().unwrap()),
            Some(FieldValue::l(_))
        ));
        assert_eq!(Value::Object(from_table(&t)), v);
    }
}
