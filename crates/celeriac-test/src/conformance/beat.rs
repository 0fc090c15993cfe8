//! The beat store cases: what every [`BeatStore`](celeriac_core::BeatStore) must do.
//!
//! Unlike the broker and backend cases, each case here needs a store of its own, *empty*: the
//! lease is one per store, so two cases on one store would compete for it. The setup function
//! must therefore return a fresh store on every call (a new SQLite file, a new Redis key
//! prefix, a new in-memory store).
//!
//! Times are whole seconds on a fixed date, passed in as the callers' clock, as the contract
//! wants: no case waits for anything, so none depends on the machine's speed.

use std::time::Duration;

use celeriac_core::DynBeatStore;
use celeriac_core::beat::{EntryState, Lease, Pending};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

// ===== helpers =====

/// The lease time of every case.
const TTL: Duration = Duration::from_secs(10);

/// A time on the cases' fixed day, `s` seconds after midnight UTC.
fn at(s: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp(1_767_225_600 + s, 0).expect("a valid time")
}

async fn acquire(store: &DynBeatStore, holder: &str, now: DateTime<Utc>) -> Option<Lease> {
    store
        .acquire(holder, now, TTL)
        .await
        .unwrap_or_else(|e| panic!("acquire by {holder} failed: {e:?}"))
}

/// Takes the lease, failing the case if the store refuses it.
async fn lead(store: &DynBeatStore, holder: &str, now: DateTime<Utc>) -> Lease {
    acquire(store, holder, now)
        .await
        .unwrap_or_else(|| panic!("{holder} could not take a free or lapsed lease"))
}

async fn save(
    store: &DynBeatStore,
    lease: &Lease,
    now: DateTime<Utc>,
    name: &str,
    state: &EntryState,
) -> bool {
    store
        .save(lease, now, name, state)
        .await
        .unwrap_or_else(|e| panic!("save of {name} failed: {e:?}"))
}

async fn load(
    store: &DynBeatStore,
) -> std::collections::BTreeMap<String, celeriac_core::beat::Row> {
    store
        .load()
        .await
        .unwrap_or_else(|e| panic!("load failed: {e:?}"))
}

/// A state with every field set, so a store that drops one is caught.
fn full_state(runs: u64) -> EntryState {
    let mut st = EntryState::new(at(0));
    st.total_run_count = runs;
    st.triggers_done = 1;
    st.last_run_at = Some(at(4));
    st.pending = Some(Pending::new(format!("task-{runs}"), at(5), 1));
    st
}

/// What `beat add` would store: the JSON of an interval entry.
fn spec(task: &str, every: f64) -> Value {
    json!({"task": task, "every": every, "queue": "q"})
}

// ===== cases =====

/// The first holder gets token 1 and an expiry of `now + ttl`; others are refused while it is
/// current; renewing keeps the token and moves the expiry.
pub async fn case_lease_terms(store: DynBeatStore) {
    let a = lead(&store, "a", at(0)).await;
    assert_eq!(
        (a.holder.as_str(), a.token, a.expires_at),
        ("a", 1, at(10)),
        "the first term"
    );
    assert!(
        acquire(&store, "b", at(0)).await.is_none(),
        "a second holder got a current lease"
    );
    let a2 = lead(&store, "a", at(5)).await;
    assert_eq!((a2.token, a2.expires_at), (1, at(15)), "a renewal");
    assert!(
        acquire(&store, "b", at(14)).await.is_none(),
        "the renewed lease lapsed at its old expiry"
    );
}

/// The leader's writes read back unchanged; a later write replaces an earlier one.
pub async fn case_saved_state_reads_back(store: DynBeatStore) {
    let a = lead(&store, "a", at(0)).await;
    let st = full_state(4);
    assert!(save(&store, &a, at(1), "e", &st).await, "the leader's save");
    let rows = load(&store).await;
    let row = &rows["e"];
    assert_eq!(row.state.as_ref(), Some(&st), "the saved state");
    assert!(
        row.spec.is_none() && !row.paused && row.triggers == 0,
        "a saved state came with controls: {row:?}"
    );
    let mut next = st.clone();
    next.total_run_count = 5;
    next.pending = None;
    assert!(save(&store, &a, at(2), "e", &next).await);
    assert_eq!(load(&store).await["e"].state.as_ref(), Some(&next));
}

/// A lapsed lease goes to the next holder with a larger token, and the stale leader can
/// neither write nor release it; a lease past its expiry cannot write, even with the right
/// token.
pub async fn case_stale_leader_is_fenced(store: DynBeatStore) {
    lead(&store, "a", at(0)).await;
    let a = lead(&store, "a", at(5)).await;
    let st = full_state(4);
    assert!(save(&store, &a, at(5), "e", &st).await);
    let b = lead(&store, "b", at(16)).await;
    assert_eq!(b.token, 2, "a new term after the lease lapsed");
    let mut stale = st.clone();
    stale.total_run_count = 99;
    assert!(
        !save(&store, &a, at(16), "e", &stale).await,
        "a stale leader's write was accepted"
    );
    assert_eq!(load(&store).await["e"].state.as_ref(), Some(&st));
    store.release(&a).await.expect("release");
    assert!(
        acquire(&store, "a", at(16)).await.is_none(),
        "a stale leader released its successor's lease"
    );
    assert!(save(&store, &b, at(16), "e", &st).await);
    assert!(
        !save(&store, &b, at(60), "e", &st).await,
        "a write after the lease's expiry was accepted"
    );
}

/// A released lease goes to the next holder at once, with a new term; the old holder can no
/// longer write.
pub async fn case_release_starts_a_new_term(store: DynBeatStore) {
    let a = lead(&store, "a", at(0)).await;
    store.release(&a).await.expect("release");
    let b = lead(&store, "b", at(1)).await;
    assert_eq!(b.token, 2, "the term after a release");
    assert!(
        !save(&store, &a, at(1), "e", &EntryState::new(at(0))).await,
        "a released lease could still write"
    );
    store.release(&b).await.expect("release");
    let a = lead(&store, "a", at(1)).await;
    assert_eq!(a.token, 3);
}

/// Run-time entries, pauses and triggers are kept per name, next to the leader's state.
pub async fn case_entries_and_controls(store: DynBeatStore) {
    let a = lead(&store, "a", at(0)).await;
    let st = full_state(1);
    let added = spec("tasks.added", 5.0);
    store.put_entry("added", &added).await.expect("put_entry");
    assert!(save(&store, &a, at(1), "added", &st).await);
    store.set_paused("added", true).await.expect("pause");
    store.trigger("added").await.expect("trigger");
    store.trigger("added").await.expect("trigger");
    store.set_paused("declared", true).await.expect("pause");
    store.set_paused("declared", false).await.expect("resume");
    let rows = load(&store).await;
    assert_eq!(
        rows.keys().collect::<Vec<_>>(),
        vec!["added", "declared"],
        "{rows:?}"
    );
    let row = &rows["added"];
    assert_eq!(row.spec.as_ref(), Some(&added));
    assert!(row.paused, "the pause was lost");
    assert_eq!(row.triggers, 2, "triggers are counted");
    assert_eq!(row.state.as_ref(), Some(&st));
    let row = &rows["declared"];
    assert!(
        row.spec.is_none() && !row.paused && row.state.is_none(),
        "{row:?}"
    );
}

/// Replacing a run-time entry starts its state afresh and keeps its controls.
pub async fn case_replacing_an_entry_resets_its_state(store: DynBeatStore) {
    let a = lead(&store, "a", at(0)).await;
    store
        .put_entry("e", &spec("tasks.e", 5.0))
        .await
        .expect("put_entry");
    assert!(save(&store, &a, at(1), "e", &full_state(3)).await);
    store.set_paused("e", true).await.expect("pause");
    store.trigger("e").await.expect("trigger");
    let replaced = spec("tasks.e", 7.0);
    store.put_entry("e", &replaced).await.expect("put_entry");
    let rows = load(&store).await;
    let row = &rows["e"];
    assert_eq!(row.spec.as_ref(), Some(&replaced), "the new definition");
    assert!(row.state.is_none(), "the old state survived: {row:?}");
    assert!(
        row.paused && row.triggers == 1,
        "the controls were lost: {row:?}"
    );
}

/// Only run-time entries (those with a spec) can be removed, and removing one takes
/// everything about it: added again, it starts with no state and no controls.
pub async fn case_removing_an_entry_takes_everything(store: DynBeatStore) {
    let a = lead(&store, "a", at(0)).await;
    store
        .put_entry("added", &spec("tasks.a", 5.0))
        .await
        .expect("put_entry");
    assert!(save(&store, &a, at(1), "added", &full_state(2)).await);
    store.set_paused("added", true).await.expect("pause");
    store.trigger("added").await.expect("trigger");
    assert!(save(&store, &a, at(1), "declared", &full_state(2)).await);
    assert!(
        !store.remove_entry("declared").await.expect("remove"),
        "an entry without a spec was removed"
    );
    assert!(!store.remove_entry("unknown").await.expect("remove"));
    assert!(store.remove_entry("added").await.expect("remove"));
    assert!(
        !store.remove_entry("added").await.expect("remove"),
        "removed twice"
    );
    let rows = load(&store).await;
    assert_eq!(
        rows.keys().collect::<Vec<_>>(),
        vec!["declared"],
        "{rows:?}"
    );
    store
        .put_entry("added", &spec("tasks.a", 5.0))
        .await
        .expect("put_entry");
    let rows = load(&store).await;
    let row = &rows["added"];
    assert!(
        !row.paused && row.triggers == 0 && row.state.is_none(),
        "a removed entry's controls came back: {row:?}"
    );
}

/// A spec is opaque: any JSON object comes back as it was written, fields the store has
/// never heard of, nesting, text that needs escaping and fractional numbers included.
pub async fn case_specs_are_opaque_json(store: DynBeatStore) {
    let odd = json!({
        "task": "tasks.odd",
        "every": 0.1,
        "args": [1, -2.5, "x", null, [true, false]],
        "kwargs": {"text": "é \" ' \\ \n ☃", "deep": {"a": [{"b": 1e-7}]}},
        "a_field_from_a_later_version": {"x": 1},
    });
    let name = "name with spaces: and/or \"quotes\"";
    store.put_entry(name, &odd).await.expect("put_entry");
    let rows = load(&store).await;
    assert_eq!(rows[name].spec.as_ref(), Some(&odd));
}
