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

/// Announces a chord of `size` header members under `group_id` to a backend with a chord
/// protocol of its own ([`ChordProtocol`](crate::backend::ChordProtocol)), before any member
/// is sent; does nothing on other backends.
pub async fn announce_chord(
    backend: &dyn crate::ResultBackend,
    group_id: &str,
    size: usize,
) -> Result<()> {
    match backend.capabilities().chords {
        Some(chords) => chords.set_chord_size(group_id, size).await,
        None => Ok(()),
    }
}

/// The backend counter of chord `group_id`: one added per execution of a header member.
pub fn chord_counter_key(group_id: &str) -> String {
    format!("celeriac-chord-{group_id}.count")
}

/// The backend counter whose first increment claims the right to fire chord `group_id`'s body.
pub fn chord_claim_key(group_id: &str) -> String {
    format!("celeriac-chord-{group_id}.claim")
}
