//! Chords: the parts a backend's own chord protocol is told about, and the counter and claim
//! keys the worker uses on other backends (see the [module docs](super) on chord counting).

use crate::error::Result;

/// One chord header member that returned, handed to a backend's own chord protocol
/// ([`ChordProtocol::chord_part_return`](crate::backend::ChordProtocol::chord_part_return)).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ChordPart<'a> {
    /// The chord's header group id.
    pub group_id: &'a str,
    /// The member's stored outcome (id, state, result or Celery exception map).
    pub meta: &'a crate::TaskMeta,
    /// The member's place in the header, if the message said.
    pub group_index: Option<u32>,
}

impl<'a> ChordPart<'a> {
    /// Member `meta` of chord `group_id`, at `group_index`.
    pub fn new(group_id: &'a str, meta: &'a crate::TaskMeta, group_index: Option<u32>) -> Self {
        ChordPart {
            group_id,
            meta,
            group_index,
        }
    }
}

/// What a backend's own chord protocol says after a header member returned.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ChordStatus {
    /// The backend has no chord protocol of its own for this chord: count it with the
    /// [`chord_counter_key`] instead.
    NotNative,
    /// More members are to come (or another caller completed the chord).
    Waiting,
    /// Every member returned; their outcomes in header order. Returned to one caller only.
    Complete(Vec<crate::TaskMeta>),
}

/// Announces the chord of header members `ids` under `group_id`, with `body`, before any
/// member is sent: to a backend with a chord protocol of its own
/// ([`ChordProtocol`](crate::backend::ChordProtocol)), its size. Returns the
/// `celery.chord_unlock` call to send with the members when the backend's Python workers join
/// chords only that way ([`BackendCapabilities::chord_unlock`](crate::BackendCapabilities),
/// Celery's `db+` tables), as Celery's clients send it there; `None` elsewhere.
///
/// A celeriac worker completes the chord through its counter and through the unlock alike;
/// both claim the chord first ([`chord_claim_key`]), so the body is sent once.
pub async fn announce_chord(
    backend: &dyn crate::ResultBackend,
    group_id: &str,
    ids: &[String],
    body: &crate::Signature,
) -> Result<Option<crate::Signature>> {
    let caps = backend.capabilities();
    if let Some(chords) = caps.chords {
        chords.set_chord_size(group_id, ids.len()).await?;
    }
    Ok(caps
        .chord_unlock
        .then(|| chord_unlock_call(group_id, ids, body)))
}

/// Celery's `celery.chord_unlock(group_id, body, interval=None, max_retries=None, result=…)`
/// call for chord `group_id`, as its clients send it: one second after the header, on the
/// body's queue and priority when the body names them (the sender routes it as the body's
/// task otherwise); `result` lists each member's `as_tuple()` (`[[id, null], null]`). It
/// retries every `result_chord_retry_interval` (1 s by default) until every member is ready,
/// then sends the body.
fn chord_unlock_call(group_id: &str, ids: &[String], body: &crate::Signature) -> crate::Signature {
    use serde_json::{Value, json};
    let body_map = serde_json::to_value(body).unwrap_or(Value::Null);
    let mut call = crate::Signature::new("celery.chord_unlock", vec![json!(group_id), body_map]);
    call.kwargs.insert("interval".into(), Value::Null);
    call.kwargs.insert("max_retries".into(), Value::Null);
    call.kwargs.insert(
        "result".into(),
        Value::Array(ids.iter().map(|id| json!([[id, null], null])).collect()),
    );
    call.options.insert("countdown".into(), json!(1));
    for key in ["queue", "priority"] {
        if let Some(v) = body.options.get(key) {
            call.options.insert(key.into(), v.clone());
        }
    }
    call
}

/// The backend counter of chord `group_id`: one added per execution of a header member.
pub fn chord_counter_key(group_id: &str) -> String {
    format!("celeriac-chord-{group_id}.count")
}

/// The backend counter whose first increment claims the right to fire chord `group_id`'s body.
pub fn chord_claim_key(group_id: &str) -> String {
    format!("celeriac-chord-{group_id}.claim")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_unlock_call_is_celerys() {
        let mut body = crate::Signature::new("tasks.tsum", vec![]);
        body.options.insert("queue".into(), json!("math"));
        body.options.insert("priority".into(), json!(3));
        let ids = ["a".to_owned(), "b".to_owned()];
        let call = chord_unlock_call("g1", &ids, &body);
        assert_eq!(call.task, "celery.chord_unlock");
        assert_eq!(
            call.args,
            [json!("g1"), serde_json::to_value(&body).unwrap()]
        );
        assert_eq!(
            serde_json::Value::Object(call.kwargs),
            json!({
                "interval": null,
                "max_retries": null,
                "result": [[["a", null], null], [["b", null], null]],
            })
        );
        assert_eq!(
            serde_json::Value::Object(call.options),
            json!({"countdown": 1, "queue": "math", "priority": 3})
        );
    }
}
