//! One conformance suite for every broker, result backend and beat store driver.
//!
//! The contracts in [`celeriac_core::broker`], [`celeriac_core::backend`] and
//! [`celeriac_core::beat`] are enforced here, once, against every driver (the in-memory ones
//! included). A driver's test binary invokes
//!
//! ```text
//! celeriac_test::broker_conformance!(path::to::setup_broker);
//! celeriac_test::backend_conformance!(path::to::setup_backend);
//! celeriac_test::beat_store_conformance!(path::to::setup_beat_store);
//! ```
//!
//! where the setup functions are
//!
//! ```text
//! async fn setup_broker() -> Option<celeriac_core::DynBroker>
//! async fn setup_backend() -> Option<celeriac_core::DynBackend>
//! async fn setup_beat_store() -> Option<celeriac_core::DynBeatStore>
//! ```
//!
//! Each macro expands to a module (`broker_conformance` / `backend_conformance` /
//! `beat_store_conformance`) holding one `#[test]` per case. A test calls the setup function once and hands the driver to the case;
//! `None` means the service is unavailable (the setup function has printed a `SKIPPED:` notice,
//! see [`crate::services::require_service`]) and the test returns early. The setup path is
//! resolved from the module that invokes the macro.
//!
//! # Design
//!
//! - The cases are ordinary `pub async fn case_*` functions in [`broker`], [`backend`] and
//!   [`beat`]; the macros only stamp tests, so the logic is type-checked once, here, and can be
//!   called by hand while debugging a driver. One case is only called by hand:
//!   [`broker::case_result_probe`], for drivers whose fetch reads task states, since it needs
//!   a broker and a backend on one store.
//! - Every broker and backend case uses its own queue names and task ids, so cases may share one
//!   store (one SQLite file, one Redis database) and run in parallel. A beat store holds one
//!   lease, so each beat case needs an empty store of its own: its setup function must return a
//!   fresh one on every call (a new file, a new key prefix).
//! - Nothing waits with a fixed sleep to synchronise. A case waits for an event with a deadline
//!   (`tokio::time::timeout` around `Consumer::next`, or polling `stats` until it matches). A
//!   few checks are about something *not* happening (a delayed message not delivered early, a
//!   fourth message not handed over beyond the prefetch limit); those watch a window of a few
//!   hundred milliseconds, which can only produce false passes on a slow machine, never false
//!   failures.
//! - Every case can fail: each has a driver bug it catches (the crate's own tests run several
//!   cases against deliberately broken drivers to prove it).
//! - The tests run on a multi-threaded tokio runtime with two workers, built by this crate
//!   ([`run_case`]), so a driver crate needs only `celeriac-test` as a dev-dependency. Each case
//!   is bounded by [`CASE_TIMEOUT`], so a hung driver fails instead of hanging CI.

pub mod backend;
pub mod beat;
pub mod broadcast;
pub mod broker;

use std::future::Future;
use std::time::Duration;

/// The longest a whole case may take before it fails as hung.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a case waits for something that should happen (a delivery, a result).
///
/// Generous: a machine under load must not fail a correct driver.
pub const EVENTUALLY: Duration = Duration::from_secs(15);

/// How long a case watches for something that must not happen (an early or extra delivery).
pub const QUIET: Duration = Duration::from_millis(300);

/// Allowed error when comparing a driver's stored timestamps with the clock (storage may round
/// to the millisecond).
pub const CLOCK_TOLERANCE: Duration = Duration::from_millis(5);

/// Runs one case on a fresh multi-threaded runtime (two workers), failing after
/// [`CASE_TIMEOUT`].
///
/// This is what the generated tests call; it is the same as
/// `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]` plus a timeout.
pub fn run_case<F: Future<Output = ()>>(case: F) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build tokio runtime");
    rt.block_on(async {
        if tokio::time::timeout(CASE_TIMEOUT, case).await.is_err() {
            panic!("case did not finish within {CASE_TIMEOUT:?}: the driver hangs");
        }
    });
}

/// Stamps one test per case; used by [`broker_conformance!`] and [`backend_conformance!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    ($setup:path, $area:ident; $($test:ident => $case:ident),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                $crate::conformance::run_case(async {
                    if let ::std::option::Option::Some(driver) = $setup().await {
                        $crate::conformance::$area::$case(driver).await;
                    }
                });
            }
        )*
    };
}

/// Stamps the broker conformance tests into a module named `broker_conformance`.
///
/// `$setup` is a path to `async fn() -> Option<celeriac_core::DynBroker>`, resolved from the
/// invoking module; it is called once per test. See the [module docs](crate::conformance).
///
/// ```
/// use std::sync::Arc;
/// use celeriac_core::DynBroker;
///
/// async fn memory() -> Option<DynBroker> {
///     Some(Arc::new(celeriac_core::memory::MemoryBroker::new()))
/// }
///
/// celeriac_test::broker_conformance!(memory);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! broker_conformance {
    ($setup:path) => {
        /// The broker conformance suite (generated by `celeriac_test::broker_conformance!`).
        #[allow(unused_imports)]
        mod broker_conformance {
            use super::*;

            $crate::__conformance_tests! { $setup, broker;
                publish_consume_ack => case_publish_consume_ack,
                declare_lists_the_queue => case_declare_lists_the_queue,
                reject_drop_discards => case_reject_drop_discards,
                reject_now_redelivers => case_reject_now_redelivers,
                reject_after_waits => case_reject_after_waits,
                lease_expiry_redelivers => case_lease_expiry_redelivers,
                extend_lease_keeps_the_message => case_extend_lease_keeps_the_message,
                delayed_never_early => case_delayed_never_early,
                priority_order => case_priority_order,
                fifo_within_a_priority => case_fifo_within_a_priority,
                purge_counts_ready_and_delayed => case_purge_counts_ready_and_delayed,
                stats_count_each_state => case_stats_count_each_state,
                prefetch_limit => case_prefetch_limit,
                concurrent_consumers_exactly_once => case_concurrent_consumers_exactly_once,
                one_consumer_many_queues => case_one_consumer_many_queues,
                publish_batch => case_publish_batch,
                message_round_trips => case_message_round_trips,
                next_is_cancel_safe => case_next_is_cancel_safe,
                close_ends_consumers => case_close_ends_consumers,
            }
        }
    };
}

/// Stamps the result backend conformance tests into a module named `backend_conformance`.
///
/// `$setup` is a path to `async fn() -> Option<celeriac_core::DynBackend>`, resolved from the
/// invoking module; it is called once per test. See the [module docs](crate::conformance).
///
/// ```
/// use std::sync::Arc;
/// use celeriac_core::DynBackend;
///
/// async fn memory() -> Option<DynBackend> {
///     Some(Arc::new(celeriac_core::memory::MemoryBackend::new()))
/// }
///
/// celeriac_test::backend_conformance!(memory);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! backend_conformance {
    ($setup:path) => {
        /// The result backend conformance suite (generated by
        /// `celeriac_test::backend_conformance!`).
        #[allow(unused_imports)]
        mod backend_conformance {
            use super::*;

            $crate::__conformance_tests! { $setup, backend;
                store_get_round_trip => case_store_get_round_trip,
                unknown_id_is_none => case_unknown_id_is_none,
                get_many => case_get_many,
                precedence => case_precedence,
                wait_resolves_on_ready_state => case_wait_resolves_on_ready_state,
                wait_times_out => case_wait_times_out,
                forget => case_forget,
                groups => case_groups,
                incr_is_atomic => case_incr_is_atomic,
                coord_throttle => case_coord_throttle,
                coord_lock => case_coord_lock,
                coord_slots => case_coord_slots,
            }
        }
    };
}

/// Stamps the broadcast conformance tests (remote control and events) into a module named
/// `broadcast_conformance`, for brokers that carry broadcast channels.
///
/// `$setup` is a path to `async fn() -> Option<celeriac_core::DynBroker>`, as for
/// [`broker_conformance!`].
///
/// ```
/// use std::sync::Arc;
/// use celeriac_core::DynBroker;
///
/// async fn memory() -> Option<DynBroker> {
///     Some(Arc::new(celeriac_core::memory::MemoryBroker::new()))
/// }
///
/// celeriac_test::broadcast_conformance!(memory);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! broadcast_conformance {
    ($setup:path) => {
        /// The broadcast conformance suite (generated by `celeriac_test::broadcast_conformance!`).
        #[allow(unused_imports)]
        mod broadcast_conformance {
            use super::*;

            $crate::__conformance_tests! { $setup, broadcast;
                control_reaches_every_listening_node => case_control_reaches_every_listening_node,
                replies_reach_their_queue_only => case_replies_reach_their_queue_only,
                events_follow_their_binding => case_events_follow_their_binding,
            }
        }
    };
}

/// Stamps the beat store conformance tests into a module named `beat_store_conformance`.
///
/// `$setup` is a path to `async fn() -> Option<celeriac_core::DynBeatStore>`, resolved from the
/// invoking module; it is called once per test and must return an empty store each time (see
/// [`beat`](crate::conformance::beat)). See the [module docs](crate::conformance).
///
/// ```
/// use std::sync::Arc;
/// use celeriac_core::DynBeatStore;
///
/// async fn memory() -> Option<DynBeatStore> {
///     Some(Arc::new(celeriac_core::memory::MemoryBeatStore::new()))
/// }
///
/// celeriac_test::beat_store_conformance!(memory);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! beat_store_conformance {
    ($setup:path) => {
        /// The beat store conformance suite (generated by
        /// `celeriac_test::beat_store_conformance!`).
        #[allow(unused_imports)]
        mod beat_store_conformance {
            use super::*;

            $crate::__conformance_tests! { $setup, beat;
                lease_terms => case_lease_terms,
                saved_state_reads_back => case_saved_state_reads_back,
                stale_leader_is_fenced => case_stale_leader_is_fenced,
                release_starts_a_new_term => case_release_starts_a_new_term,
                entries_and_controls => case_entries_and_controls,
                replacing_an_entry_resets_its_state => case_replacing_an_entry_resets_its_state,
                removing_an_entry_takes_everything => case_removing_an_entry_takes_everything,
                specs_are_opaque_json => case_specs_are_opaque_json,
            }
        }
    };
}

pub use crate::{
    backend_conformance, beat_store_conformance, broadcast_conformance, broker_conformance,
};
