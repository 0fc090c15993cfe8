//! Canvas on the wire: turning a [`Signature`](crate::protocol::Signature) map into the
//! [`Message`](crate::protocol::Message) that runs it, and the names of the chord keys a result
//! backend keeps.
//!
//! For the `celeriac` facade (which sends signatures, chains, groups and chords) and for the
//! worker (which sends callbacks, the next chain step and chord bodies): both build messages
//! here, so a signature means the same thing whoever sends it. The caller resolves the queue
//! when the signature names none (routes live in the app, not here) and publishes.
//!
//! - [`SendOptions`] (`options`): how to send a call, typed. Signatures that travel in messages
//!   hold them as Celery's `apply_async` map (§3.1 of the wire notes); that map is read and
//!   written only at this edge ([`SendOptions::from_wire`], [`SendOptions::to_wire`]).
//! - [`build_call`] and [`build_message`] (`message`): the message that runs a call or a
//!   signature map, with the task's registered options filling the gaps.
//! - [`plan`] (`plan`): a composite map (chain, group, chord) as the plain messages that
//!   start it, and the chord headers to save first.
//! - Chord keys and parts (`chord`); dataflow graphs live in [`crate::flow`].
//!
//! # Chord counting
//!
//! A chord's header members are saved as a group (`save_group(gid, ids)`) before any is
//! published. Every execution of a header member, after its result is stored, adds one to the
//! counter [`chord_counter_key`] with [`ResultBackend::incr`](crate::ResultBackend::incr). The
//! counter is only a hint: once it reaches the header size, the worker reads every member's
//! stored result, and only when all are ready does it take the claim [`chord_claim_key`]
//! (`incr` returning 1) and publish the body. A redelivered member adds one more (a count that
//! is too high costs an extra read, never an early body), and a member whose result was
//! already stored when it was redelivered still counts (so a crash between storing and counting
//! loses nothing). The claim makes the body fire once.
//!
//! A backend with a chord protocol of its own (Celery's Redis backend: the `celery-taskset-meta-<gid>`
//! `.j`/`.t`/`.s` keys) is asked first ([`ChordProtocol::chord_part_return`](crate::backend::ChordProtocol::chord_part_return)
//! with a [`ChordPart`]); the counter is used only when it answers [`ChordStatus::NotNative`].
//! Chord senders announce the header size with
//! [`ChordProtocol::set_chord_size`](crate::backend::ChordProtocol::set_chord_size), so a Python worker
//! completes our chords and ours complete Python's.

mod chord;
mod message;
mod options;
mod plan;

pub use chord::{ChordPart, ChordStatus, announce_chord, chord_claim_key, chord_counter_key};
pub use message::{Call, Outgoing, Sender, build_call, build_message, repr, with_parent_value};
pub use options::{Expires, SendOptions};
pub use plan::{Plan, Step, chain_of, default_option, expand, plan};
