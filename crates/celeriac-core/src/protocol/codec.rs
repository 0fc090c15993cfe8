//! Body codecs: JSON (the default, compatible with kombu's JSON) and msgpack (feature `msgpack`).
//!
//! Pickle and any other content type are refused: decoding a pickle runs code chosen by
//! whoever can write to the broker.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// A body serializer celeriac speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ContentType {
    /// `application/json`, `utf-8`.
    #[default]
    Json,
    /// `application/x-msgpack`, `binary` (feature `msgpack`).
    MsgPack,
    /// `application/data`, `utf-8`: Celery's `auth` serializer, a JSON body signed with an
    /// X.509 key (see [`crate::security`]). Only an app or worker holding a
    /// [`BodySigner`](crate::security::BodySigner) writes or reads it; [`encode`] and
    /// [`decode`] refuse it.
    Auth,
}

impl ContentType {
    /// The MIME type.
    pub fn mime(self) -> &'static str {
        match self {
            ContentType::Json => "application/json",
            ContentType::MsgPack => "application/x-msgpack",
            ContentType::Auth => crate::security::SIGNED_CONTENT_TYPE,
        }
    }

    /// The content encoding kombu pairs with the MIME type.
    pub fn encoding(self) -> &'static str {
        match self {
            ContentType::Json => "utf-8",
            ContentType::MsgPack => "binary",
            ContentType::Auth => crate::security::SIGNED_CONTENT_ENCODING,
        }
    }

    /// Parses a MIME type, refusing the ones celeriac does not accept.
    pub fn from_mime(mime: &str) -> Result<Self> {
        match mime {
            "application/json" | "json" => Ok(ContentType::Json),
            "application/x-msgpack" | "msgpack" => Ok(ContentType::MsgPack),
            "application/data" | "auth" => Ok(ContentType::Auth),
            "application/x-python-serialize" => Err(Error::protocol(
                "refusing pickle content (application/x-python-serialize): it can execute code",
            )),
            other => Err(Error::protocol(format!(
                "content type {other:?} is not accepted (accepted: application/json, \
                 application/x-msgpack, application/data)"
            ))),
        }
    }

    /// Parses a serializer name as used in configuration (`json`, `msgpack`, `auth`).
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "json" => Ok(ContentType::Json),
            "msgpack" => Ok(ContentType::MsgPack),
            "auth" => Ok(ContentType::Auth),
            other => Err(Error::config(format!(
                "unknown serializer {other:?} (known: json, msgpack, auth)"
            ))),
        }
    }
}

impl std::str::FromStr for ContentType {
    type Err = Error;

    /// A serializer's name as configured: `json`, `msgpack` or `auth`.
    fn from_str(name: &str) -> Result<Self> {
        ContentType::from_name(name)
    }
}

impl std::fmt::Display for ContentType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ContentType::Json => "json",
            ContentType::MsgPack => "msgpack",
            ContentType::Auth => "auth",
        })
    }
}

impl<'de> serde::Deserialize<'de> for ContentType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        ContentType::from_name(&name).map_err(serde::de::Error::custom)
    }
}

/// Serializes `value` with `ct`.
pub fn encode<T: Serialize>(ct: ContentType, value: &T) -> Result<Vec<u8>> {
    match ct {
        ContentType::Json => Ok(serde_json::to_vec(value)?),
        ContentType::MsgPack => encode_msgpack(value),
        ContentType::Auth => Err(Error::new(
            crate::ErrorKind::Security,
            "serializer auth signs a json body with the app's key: encode with json, then sign",
        )),
    }
}

/// Deserializes bytes written with `ct`, unwrapping kombu's typed JSON values.
pub fn decode<T: DeserializeOwned>(ct: ContentType, bytes: &[u8]) -> Result<T> {
    match ct {
        ContentType::Json => {
            check_json_depth(bytes)?;
            // The common body (no kombu type wrappers, no integer literal that could be wider
            // than 64 bits) is read straight into `T`; everything else, and every error, goes
            // through the checked path below.
            if plain_json(bytes) {
                if let Ok(v) = serde_json::from_slice(bytes) {
                    return Ok(v);
                }
            }
            let v = json_from_slice(bytes)?;
            serde_json::from_value(v)
                .map_err(|e| Error::protocol(format!("invalid message body: {e}")))
        }
        ContentType::MsgPack => decode_msgpack(bytes),
        ContentType::Auth => Err(Error::new(
            crate::ErrorKind::Security,
            "a signed message (application/data, Celery's auth serializer) cannot be verified \
             here: security is not configured (serializer = \"auth\", see docs/SECURITY.md)",
        )),
    }
}

#[cfg(feature = "msgpack")]
fn encode_msgpack<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    rmp_serde::to_vec_named(value)
        .map_err(|e| Error::protocol("cannot encode msgpack").with_source(e))
}

#[cfg(not(feature = "msgpack"))]
fn encode_msgpack<T: Serialize>(_: &T) -> Result<Vec<u8>> {
    Err(Error::new(
        crate::ErrorKind::Unsupported,
        "msgpack needs the `msgpack` feature",
    ))
}

/// The deepest nesting of arrays and maps a message body may have, in either codec. Real
/// bodies (arguments, and canvases nested a few signatures deep) stay far below it; a hostile
/// one nested deeper must not exhaust a worker thread's stack in the typed decoding of nested
/// signatures (the fuzzer aborted a test thread on one). serde_json stops at 128 and
/// rmp-serde at 1,024 on their own.
pub const MAX_BODY_DEPTH: usize = 64;

/// Refuses JSON nested deeper than [`MAX_BODY_DEPTH`], with one pass over the bytes.
fn check_json_depth(bytes: &[u8]) -> Result<()> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_BODY_DEPTH {
                    return Err(Error::protocol(format!(
                        "invalid message body: nested deeper than {MAX_BODY_DEPTH} levels"
                    )));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(feature = "msgpack")]
const MSGPACK_MAX_DEPTH: usize = MAX_BODY_DEPTH;

#[cfg(feature = "msgpack")]
fn decode_msgpack<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    use serde::Deserialize as _;
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(MSGPACK_MAX_DEPTH);
    let v = Value::deserialize(&mut de)
        .map_err(|e| Error::protocol("invalid msgpack body").with_source(e))?;
    serde_json::from_value(v).map_err(|e| Error::protocol(format!("invalid message body: {e}")))
}

#[cfg(not(feature = "msgpack"))]
fn decode_msgpack<T: DeserializeOwned>(_: &[u8]) -> Result<T> {
    Err(Error::new(
        crate::ErrorKind::Unsupported,
        "msgpack needs the `msgpack` feature",
    ))
}

/// Parses JSON as kombu writes it.
///
/// Python's encoder writes bare `NaN`, `Infinity` and `-Infinity`; JSON has no such tokens, so
/// they become `null`. Objects with exactly the keys `__type__` and `__value__` are kombu's
/// typed values (datetime, uuid, decimal, bytes): they become their plain JSON form.
pub fn json_from_slice(bytes: &[u8]) -> Result<Value> {
    let v = match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => v,
        Err(first) => {
            let Some(fixed) = replace_non_finite(bytes) else {
                return Err(Error::protocol("invalid json").with_source(first));
            };
            serde_json::from_slice(&fixed)
                .map_err(|_| Error::protocol("invalid json").with_source(first))?
        }
    };
    if has_huge_number(&v) {
        refuse_wide_integers(bytes)?;
    }
    Ok(unwrap_typed(v))
}

/// The smallest magnitude a float parsed from an integer literal has once the literal no longer
/// fits in an `i64`/`u64` (2^63).
const WIDE: f64 = 9_223_372_036_854_775_808.0;

/// Whether `v` holds a float at least 2^63 in magnitude: serde_json parses integer literals that
/// do not fit in 64 bits as such floats, so only then is the raw text worth checking.
fn has_huge_number(v: &Value) -> bool {
    match v {
        Value::Number(n) => {
            n.as_f64().is_some_and(|f| f.abs() >= WIDE) && !n.is_i64() && !n.is_u64()
        }
        Value::Array(items) => items.iter().any(has_huge_number),
        Value::Object(map) => map.values().any(has_huge_number),
        _ => false,
    }
}

/// Whether `bytes` can skip the checked path: no `__type__` wrapper anywhere, and no run of 19
/// or more digits (the shortest literal that may not fit in 64 bits), inside strings or not.
fn plain_json(bytes: &[u8]) -> bool {
    let mut digits = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b.is_ascii_digit() {
            digits += 1;
            if digits >= 19 {
                return false;
            }
        } else {
            digits = 0;
            if b == b'_' && bytes[i..].starts_with(b"__type__") {
                return false;
            }
        }
    }
    true
}

/// Refuses integer literals outside `i64`/`u64` (Python ints are unbounded; JSON readers without
/// big numbers would silently round them to the nearest float, changing the value).
fn refuse_wide_integers(bytes: &[u8]) -> Result<()> {
    let mut i = 0;
    let mut in_string = false;
    let mut escaped = false;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        if b == b'"' {
            in_string = true;
            i += 1;
            continue;
        }
        if b == b'-' || b.is_ascii_digit() {
            let start = i;
            i += 1;
            while i < bytes.len()
                && matches!(bytes[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
            {
                i += 1;
            }
            let token = &bytes[start..i];
            let integer = !token.iter().any(|c| matches!(c, b'.' | b'e' | b'E'));
            if integer {
                // The token is ASCII digits with an optional sign, so it is valid UTF-8.
                let text = std::str::from_utf8(token).unwrap_or_default();
                if text.parse::<i64>().is_err() && text.parse::<u64>().is_err() && text != "-" {
                    return Err(Error::protocol(format!(
                        "integer {text} does not fit in 64 bits; celeriac reads integers from \
                         -2^63 to 2^64-1 exactly and refuses wider ones rather than rounding them \
                         (send such values as strings)"
                    )));
                }
            }
            continue;
        }
        i += 1;
    }
    Ok(())
}

/// Replaces the bare tokens `NaN`, `Infinity` and `-Infinity` outside strings with `null`.
/// Returns `None` when there is nothing to replace.
fn replace_non_finite(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut replaced = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        let rest = &bytes[i..];
        let token: Option<usize> = if rest.starts_with(b"NaN") {
            Some(3)
        } else if rest.starts_with(b"Infinity") {
            Some(8)
        } else if rest.starts_with(b"-Infinity") {
            Some(9)
        } else {
            None
        };
        if let Some(n) = token {
            out.extend_from_slice(b"null");
            replaced = true;
            i += n;
            continue;
        }
        if b == b'"' {
            in_string = true;
        }
        out.push(b);
        i += 1;
    }
    replaced.then_some(out)
}

/// Turns kombu's `{"__type__": ..., "__value__": ...}` wrappers into plain JSON values.
pub fn unwrap_typed(v: Value) -> Value {
    match v {
        Value::Array(items) => Value::Array(items.into_iter().map(unwrap_typed).collect()),
        Value::Object(map) => {
            if map.len() == 2 && map.contains_key("__type__") && map.contains_key("__value__") {
                return unwrap_one(map);
            }
            Value::Object(map.into_iter().map(|(k, v)| (k, unwrap_typed(v))).collect())
        }
        other => other,
    }
}

fn unwrap_one(mut map: Map<String, Value>) -> Value {
    let ty = map
        .get("__type__")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let value = map.remove("__value__").unwrap_or(Value::Null);
    match (ty.as_str(), value) {
        ("uuid", Value::Object(inner)) => match inner.get("hex").and_then(Value::as_str) {
            Some(hex) if hex.len() == 32 => Value::String(format!(
                "{}-{}-{}-{}-{}",
                &hex[0..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..32]
            )),
            _ => Value::Object(inner),
        },
        // datetime, date, time, decimal, bytes and base64 all carry a string: keep it.
        (_, value) => value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn refuses_pickle_with_a_reason() {
        let e = ContentType::from_mime("application/x-python-serialize").unwrap_err();
        assert!(e.to_string().contains("pickle"));
        let e = ContentType::from_mime("application/x-yaml").unwrap_err();
        assert!(e.to_string().contains("not accepted"));
    }

    /// The direct read and the checked path agree wherever the direct read is taken, and the
    /// bodies it must not take go the checked way.
    #[test]
    fn plain_bodies_read_directly_as_the_checked_path_reads_them() {
        let checked = json_from_slice;
        for body in [
            &br#"[[1, 2], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#[..],
            br#"[["\u00e9", 1.5e300, -9223372036854775808], {"k": [true, null]}, {}]"#,
            br#"{"a": 1, "a": 2}"#,
            br#"[18446744073709551615, "1234567890123456789"]"#,
        ] {
            assert_eq!(
                decode::<Value>(ContentType::Json, body).unwrap(),
                checked(body).unwrap()
            );
        }
        assert!(plain_json(br#"[[1, 2], {}, {}]"#));
        // Wrappers, possibly wide integers and non-finite floats take the checked path.
        let wrapped = br#"[{"__type__": "bytes", "__value__": "aGk="}]"#;
        assert!(!plain_json(wrapped));
        assert_eq!(
            decode::<Value>(ContentType::Json, wrapped).unwrap(),
            checked(wrapped).unwrap()
        );
        let wide = b"[1180591620717411303424]";
        assert!(!plain_json(wide));
        assert!(decode::<Value>(ContentType::Json, wide).is_err());
        let nan = b"[NaN]";
        assert_eq!(
            decode::<Value>(ContentType::Json, nan).unwrap(),
            json!([null])
        );
    }

    #[test]
    fn non_finite_floats_are_written_as_null_as_docs_tasks_says() {
        let body = crate::protocol::Body::new(
            vec![json!(f64::NAN), json!(f64::INFINITY), json!(1.5)],
            Map::new(),
        );
        let bytes = encode(ContentType::Json, &body).unwrap();
        let back: crate::protocol::Body = decode(ContentType::Json, &bytes).unwrap();
        assert_eq!(back.args, vec![Value::Null, Value::Null, json!(1.5)]);
        let v = serde_json::to_value(f64::NEG_INFINITY).unwrap();
        assert_eq!(v, Value::Null);
    }

    #[test]
    fn tolerates_python_non_finite_floats_outside_strings() {
        let v = json_from_slice(br#"[NaN, Infinity, -Infinity, "NaN stays", 1.5]"#).unwrap();
        assert_eq!(v, json!([null, null, null, "NaN stays", 1.5]));
        assert!(json_from_slice(b"[nope]").is_err());
    }

    #[test]
    fn refuses_integers_wider_than_64_bits_instead_of_rounding_them() {
        let e = json_from_slice(br#"[1, {"n": 1180591620717411303424}]"#).unwrap_err();
        assert!(e.to_string().contains("1180591620717411303424"), "{e}");
        assert!(e.to_string().contains("64 bits"), "{e}");
        let e = json_from_slice(b"[-9223372036854775809]").unwrap_err();
        assert!(e.to_string().contains("-9223372036854775809"), "{e}");
        // The limits themselves, wide floats, and digits inside strings are fine.
        let v = json_from_slice(
            br#"[18446744073709551615, -9223372036854775808, 1e300, -2.5e19,
                 "1180591620717411303424", "a\"99999999999999999999999"]"#,
        )
        .unwrap();
        assert_eq!(v[0], json!(u64::MAX));
        assert_eq!(v[1], json!(i64::MIN));
        assert_eq!(v[2], json!(1e300));
        assert_eq!(v[3], json!(-2.5e19));
        assert_eq!(v[4], json!("1180591620717411303424"));
    }

    #[test]
    fn unwraps_kombu_typed_values() {
        let raw = br#"{"when": {"__type__": "datetime", "__value__": "2024-01-02T03:04:05+00:00"},
            "id": {"__type__": "uuid", "__value__": {"hex": "12345678123456781234567812345678"}},
            "price": {"__type__": "decimal", "__value__": "1.10"},
            "nested": [{"__type__": "bytes", "__value__": "raw"}],
            "not_typed": {"__type__": "x", "__value__": 1, "other": 2}}"#;
        let v = json_from_slice(raw).unwrap();
        assert_eq!(v["when"], json!("2024-01-02T03:04:05+00:00"));
        assert_eq!(v["id"], json!("12345678-1234-5678-1234-567812345678"));
        assert_eq!(v["price"], json!("1.10"));
        assert_eq!(v["nested"], json!(["raw"]));
        assert_eq!(v["not_typed"]["other"], json!(2));
    }

    #[cfg(feature = "msgpack")]
    #[test]
    fn msgpack_round_trips_a_body() {
        let body = crate::protocol::Body::new(vec![json!(1), json!("two")], Map::new());
        let bytes = encode(ContentType::MsgPack, &body).unwrap();
        let back: crate::protocol::Body = decode(ContentType::MsgPack, &bytes).unwrap();
        assert_eq!(back, body);
    }

    /// A hostile body nested deeper than any real one is refused with an error, in both
    /// codecs, instead of exhausting the stack (found by the fuzzer: a msgpack body of a few
    /// hundred nested arrays aborted the process).
    #[cfg(feature = "msgpack")]
    #[test]
    fn deeply_nested_bodies_are_refused_not_a_crash() {
        for depth in [MAX_BODY_DEPTH + 1, 200, 5_000] {
            // msgpack: `depth` one-element arrays (0x91) around a nil (0xc0).
            let mut mp = vec![0x91_u8; depth];
            mp.push(0xc0);
            let e = decode::<Value>(ContentType::MsgPack, &mp).unwrap_err();
            assert!(e.to_string().contains("invalid msgpack"), "{e}");
            let json = format!("{}null{}", "[".repeat(depth), "]".repeat(depth));
            assert!(decode::<Value>(ContentType::Json, json.as_bytes()).is_err());
        }
        let mut ok = vec![0x91_u8; MAX_BODY_DEPTH - 1];
        ok.push(0xc0);
        assert!(decode::<Value>(ContentType::MsgPack, &ok).is_ok());
        let n = MAX_BODY_DEPTH;
        let json = format!("{}\"[{{\\\"\"{}", "[".repeat(n), "]".repeat(n));
        assert!(
            decode::<Value>(ContentType::Json, json.as_bytes()).is_ok(),
            "brackets inside strings do not count"
        );
    }
}
