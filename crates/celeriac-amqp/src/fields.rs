//! AMQP field tables ↔ JSON values, encoded as py-amqp encodes them.
//!
//! Task headers are a JSON-shaped map. On AMQP they travel as a field table, and Python reads
//! them with py-amqp, so we write what py-amqp writes (celery-wire.md §8.6): strings `S`,
//! booleans `t`, floats `d`, integers `I` when they fit in 32 signed bits, else `l` (signed 64,
//! RabbitMQ's convention, which RabbitMQ itself reads when it dead-letters a message), maps
//! `F`, lists `A`, null `V`. Reading accepts every tag of [`crate::wire::codec`], py-amqp's `L`
//! included.

use serde_json::{Map, Number, Value};

use crate::wire::{FieldTable, FieldValue};

/// A JSON value as a field value.
pub(crate) fn to_field(v: &Value) -> FieldValue {
    match v {
        Value::Null => FieldValue::Void,
        Value::Bool(b) => FieldValue::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                match i32::try_from(i) {
                    Ok(small) => FieldValue::I32(small),
                    Err(_) => FieldValue::I64(i),
                }
            } else if let Some(u) = n.as_u64() {
                // Beyond i64: no integer tag holds it; a double is the closest Python reads.
                FieldValue::F64(u as f64)
            } else {
                FieldValue::F64(n.as_f64().unwrap_or(0.0))
            }
        }
        Value::String(s) => FieldValue::str(s),
        Value::Array(items) => FieldValue::Array(items.iter().map(to_field).collect()),
        Value::Object(map) => FieldValue::Table(to_table(map)),
    }
}

/// A JSON map as a field table; keys longer than 255 bytes (not representable) are dropped.
pub(crate) fn to_table(map: &Map<String, Value>) -> FieldTable {
    map.iter()
        .filter(|(k, _)| k.len() <= 255)
        .map(|(k, v)| (k.clone(), to_field(v)))
        .collect()
}

/// A field value as JSON.
pub(crate) fn from_field(v: &FieldValue) -> Value {
    match v {
        FieldValue::Void => Value::Null,
        FieldValue::Bool(b) => Value::Bool(*b),
        FieldValue::I8(i) => Value::from(*i),
        FieldValue::U8(i) => Value::from(*i),
        FieldValue::I16(i) => Value::from(*i),
        FieldValue::U16(i) => Value::from(*i),
        FieldValue::I32(i) => Value::from(*i),
        FieldValue::U32(i) => Value::from(*i),
        FieldValue::I64(i) | FieldValue::I64L(i) => Value::from(*i),
        FieldValue::F32(f) => Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number),
        FieldValue::F64(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        FieldValue::Decimal { scale, value } => {
            Number::from_f64(f64::from(*value) / 10f64.powi(i32::from(*scale)))
                .map_or(Value::Null, Value::Number)
        }
        FieldValue::LongStr(s) | FieldValue::Bytes(s) => {
            Value::String(String::from_utf8_lossy(s).into_owned())
        }
        FieldValue::Array(a) => Value::Array(a.iter().map(from_field).collect()),
        FieldValue::Timestamp(t) => Value::from(*t),
        FieldValue::Table(t) => Value::Object(from_table(t)),
    }
}

/// A field table as a JSON map.
pub(crate) fn from_table(t: &FieldTable) -> Map<String, Value> {
    t.iter().map(|(k, v)| (k.clone(), from_field(v))).collect()
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
        assert_eq!(t["eta"], FieldValue::Void);
        assert_eq!(t["retries"], FieldValue::I32(3));
        assert_eq!(t["big"], FieldValue::I64(5_000_000_000));
        assert_eq!(Value::Object(from_table(&t)), v);
    }

    #[test]
    fn py_amqp_values_read_as_json() {
        assert_eq!(
            from_field(&FieldValue::I64L(-5_000_000_000)),
            json!(-5_000_000_000_i64)
        );
        assert_eq!(
            from_field(&FieldValue::Decimal {
                scale: 2,
                value: -150
            }),
            json!(-1.5)
        );
        assert_eq!(from_field(&FieldValue::Timestamp(7)), json!(7));
    }
}
