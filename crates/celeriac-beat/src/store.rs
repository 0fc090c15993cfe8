//! Beat's side of the store: run-time entry specs to and from the JSON a [`BeatStore`] keeps.
//!
//! The store contract lives in core ([`celeriac_core::beat`]) and knows no schedule, so a row's
//! spec is a JSON document there; it becomes an [`EntrySpec`] here. A document that no longer
//! parses (written by another version, edited by hand) fails the read that found it, naming the
//! entry, as a corrupt row does: the leader logs the error and retries on its next pass, the
//! command line reports it.

use std::collections::BTreeMap;

use celeriac_core::beat::{BeatStore, Row};
use celeriac_core::{Error, ErrorKind, Result};
use serde::Deserialize as _;
use serde_json::Value;

use crate::entry::EntrySpec;

/// Every row of `store`, with the specs of run-time entries parsed.
pub(crate) async fn load(
    store: &dyn BeatStore,
) -> Result<(BTreeMap<String, Row>, BTreeMap<String, EntrySpec>)> {
    let rows = store.load().await?;
    let specs = rows
        .iter()
        .filter_map(|(name, row)| Some((name, row.spec.as_ref()?)))
        .map(|(name, spec)| Ok((name.clone(), from_json(name, spec)?)))
        .collect::<Result<_>>()?;
    Ok((rows, specs))
}

/// The spec of entry `name` as stored.
pub(crate) fn from_json(name: &str, spec: &Value) -> Result<EntrySpec> {
    EntrySpec::deserialize(spec).map_err(|e| {
        Error::new(
            ErrorKind::Backend,
            format!("beat store: the stored spec of entry {name:?} is not a valid entry spec"),
        )
        .with_source(e)
    })
}

/// The JSON a store keeps for `spec`.
pub(crate) fn to_json(spec: &EntrySpec) -> Result<Value> {
    Ok(serde_json::to_value(spec)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_and_bad_ones_name_their_entry() {
        let mut spec = EntrySpec::new("tasks.x");
        spec.every = Some(2.5);
        spec.kwargs
            .insert("k".into(), serde_json::json!([1, {"a": null}]));
        let json = to_json(&spec).unwrap();
        assert_eq!(from_json("x", &json).unwrap(), spec);
        let e = from_json("broken", &serde_json::json!({"every": 5})).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Backend);
        assert!(
            e.to_string()
                .contains("entry \"broken\" is not a valid entry spec"),
            "{e}"
        );
        assert!(std::error::Error::source(&e).is_some());
    }
}
