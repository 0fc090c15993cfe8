//! Canvas: chains, groups, chords, map/starmap/chunks, built from [`Signature`]s.
//!
//! For code that composes tasks: run one after another passing results along ([`chain`]),
//! side by side with a handle on all of them ([`group`], [`GroupResult`]), side by side and
//! then one task over all the results ([`chord`]), or one task over many arguments ([`map`],
//! [`starmap`], [`chunks`]). Callbacks on single signatures are [`Signature::link`] and
//! [`Signature::link_error`]; [`Signature::immutable`] is Celery's `.si()`.
//!
//! Everything travels in Celery's wire encoding (the body's `embed`: callbacks, errbacks, the
//! reversed chain, the chord body), so the worker that finishes a task sends the next one:
//! no coordinator process, and Python Celery workers complete our canvas and ours theirs.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> celeriac::Result<()> {
//! use std::time::Duration;
//! use celeriac::canvas::{chord, group};
//!
//! #[celeriac::task(name = "tasks.add")]
//! fn add(x: i64, y: i64) -> i64 { x + y }
//!
//! #[celeriac::task(name = "tasks.tsum")]
//! fn tsum(numbers: Vec<i64>) -> i64 { numbers.iter().sum() }
//!
//! let app = celeriac::App::builder().broker_url("memory://")
//!     .task::<add>().task::<tsum>().build().await?;
//! let worker = app.worker(app.worker_options());
//! let stop = worker.shutdown_handle();
//! let running = tokio::spawn(worker.run());
//!
//! // add(2, 2) | add(4) | add(8): each step gets the previous result first.
//! let add_to = |n: i64| celeriac::Signature::<i64>::new("tasks.add").arg(n);
//! let r = celeriac::chain![add::s(2, 2), add_to(4), add_to(8)].apply_async(&app).await?;
//! assert_eq!(r.get_timeout(Duration::from_secs(10)).await?, 16);
//!
//! let g = group((0..4).map(|i| add::s(i, i))).apply_async(&app).await?;
//! assert_eq!(g.join(Some(Duration::from_secs(10))).await?, vec![0, 2, 4, 6]);
//!
//! // tsum([add(1, 0), add(2, 0), add(3, 0)]): the body gets the header's results first.
//! let c = chord(group((1..=3).map(|i| add::s(i, 0))), celeriac::Signature::<i64>::new("tasks.tsum"))
//!     .apply_async(&app).await?;
//! assert_eq!(c.get_timeout(Duration::from_secs(10)).await?, 6);
//! # stop.warm(); running.await.expect("join").expect("worker");
//! # Ok(()) }
//! ```
//!
//! # Chords: counting, failures, redelivery
//!
//! The header is saved as a group before any member is sent; the worker finishing a member
//! counts it in the backend (an atomic `incr`), and once the count reaches the header size it
//! checks that every member's result is ready and claims the body with a second counter, so
//! the body is sent once, with the results in header order (see [`celeriac_core::canvas`]).
//! No polling "unlock" task is used. A member that fails (or is revoked) fails the body with
//! `ChordError("Dependency <id> raised <error>")` and runs the body's `link_error` callbacks.
//! A redelivered member (a worker died after running it) adds to the count again, which never
//! fires the body early because the results themselves are checked; mark header tasks
//! `acks_late` so that a worker crash redelivers them rather than losing them.
//!
//! # Nesting
//!
//! `into_signature` turns a [`Chain`], [`Group`] or [`Chord`] into a [`Signature`] that can
//! be a chain step, a group member or a chord body, in Celery's map form: a chord as a chain
//! step (the previous result goes to every header member, the next step gets the body's
//! result), a group followed by steps (Celery's rule: that is a chord), a chain inside a
//! group. The worker plans nested maps the same way whoever built them
//! ([`celeriac_core::canvas::plan`]).
//!
//! # Not yet
//!
//! A chain or group inside a chord header, a group as a chain's last step (use
//! [`Group::apply_async`]). For dataflow graphs see [`crate::flow`].
//!
//! # Python workers
//!
//! On Celery's `db+` tables a Python worker counts no chord parts: Celery's clients send a
//! `celery.chord_unlock` task with the chord, which polls the header's results every second
//! and then sends the body. A chord sent there sends one too, so Python workers complete it;
//! celeriac workers complete it through the counter or the unlock, whichever claims it
//! first.

use std::marker::PhantomData;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::result::decode_ready;
use crate::{App, AsyncResult, Error, Result, Signature};
use celeriac_core::protocol::new_id;
use celeriac_core::{ErrorKind, TaskOptions, TaskState};

/// The name of the built-in task that runs one task over a list of argument tuples in one
/// message (Celery's `celery.starmap`); [`chunks`] sends it, every celeriac worker runs it.
pub const STARMAP_TASK: &str = "celery.starmap";

/// A signature frozen for a composite: its map, with a task id, and its registered options.
struct Frozen {
    wire: celeriac_core::Signature,
    options: Option<TaskOptions>,
    id: String,
}

fn freeze<O>(sig: &Signature<O>) -> Result<Frozen> {
    if let Some(e) = &sig.encode_error {
        return Err(Error::protocol(e.clone()));
    }
    let mut wire = sig.to_wire();
    let id = freeze_wire(&mut wire)?.ok_or_else(|| {
        Error::protocol(
            "a group's outcome is a GroupResult, not one task's: send it with Group::apply_async, \
             or follow it with more steps in a chain (which makes it a chord)",
        )
    })?;
    Ok(Frozen {
        wire,
        options: sig.registered_options(),
        id,
    })
}

/// Gives `wire` (and, for composites, the tasks whose ids matter) a task id; returns the id
/// of the result it ends in: its own, a chain's last task's, a chord's body's, `None` for a
/// group.
fn freeze_wire(wire: &mut celeriac_core::Signature) -> Result<Option<String>> {
    let nested = |wire: &celeriac_core::Signature, key: &str| {
        Error::protocol(format!("{} needs kwargs.{key}", wire.task))
    };
    match wire.subtask_type.as_deref() {
        None => Ok(Some(
            match wire.options.get("task_id").and_then(Value::as_str) {
                Some(id) => id.to_owned(),
                None => {
                    let id = new_id();
                    wire.options
                        .insert("task_id".into(), Value::String(id.clone()));
                    id
                }
            },
        )),
        Some("chain") => {
            let mut tasks: Vec<celeriac_core::Signature> = wire
                .kwargs
                .get("tasks")
                .and_then(|t| serde_json::from_value(t.clone()).ok())
                .ok_or_else(|| nested(wire, "tasks"))?;
            let mut last = None;
            for t in &mut tasks {
                last = freeze_wire(t)?;
            }
            wire.kwargs.insert("tasks".into(), encode(&tasks)?);
            Ok(last)
        }
        Some("chord") => {
            let mut body: celeriac_core::Signature = wire
                .kwargs
                .get("body")
                .and_then(|t| serde_json::from_value(t.clone()).ok())
                .ok_or_else(|| nested(wire, "body"))?;
            let id = freeze_wire(&mut body)?;
            wire.kwargs.insert("body".into(), encode(&body)?);
            Ok(id)
        }
        Some(_) => Ok(None),
    }
}

fn encode(v: &impl Serialize) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| Error::protocol(format!("cannot encode a signature: {e}")))
}

/// Sends a signature map that may be a composite, followed by `chain` (reversed): planned
/// into plain messages ([`celeriac_core::canvas::plan`]), chord headers saved first.
pub(crate) async fn send_planned(
    app: &App,
    wire: &celeriac_core::Signature,
    options: Option<TaskOptions>,
    chain: Option<Vec<celeriac_core::Signature>>,
) -> Result<()> {
    if wire.subtask_type.is_none() {
        app.send_wire(wire, options, chain).await?;
        return Ok(());
    }
    let p = celeriac_core::canvas::plan(wire, chain)?;
    let mut unlocks = Vec::new();
    for (gid, ids, body) in &p.groups {
        app.backend().save_group(gid, ids).await?;
        if let Some(unlock) =
            celeriac_core::canvas::announce_chord(&**app.backend(), gid, ids, body).await?
        {
            unlocks.push((unlock, body.task.as_str()));
        }
    }
    for step in p.steps {
        app.send_wire(&step.sig, None, step.chain).await?;
    }
    for (unlock, body_task) in unlocks {
        send_unlock(app, unlock, body_task, None).await?;
    }
    Ok(())
}

/// Sends a chord's `celery.chord_unlock` where its body goes, as Celery routes it: the body's
/// own queue, else its task's (registered, annotated or routed), else the default queue.
async fn send_unlock(
    app: &App,
    mut unlock: celeriac_core::Signature,
    body_task: &str,
    body_options: Option<TaskOptions>,
) -> Result<()> {
    if !unlock.options.contains_key("queue") {
        let queue = app.queue_for(body_task, &app.options_for(body_task, body_options));
        unlock.options.insert("queue".into(), Value::String(queue));
    }
    app.send_wire(&unlock, None, None).await.map(|_| ())
}

/// A composite signature: `task` (`celery.group`, ...) with its members under `kwargs`.
fn composite<O>(kind: &str, members: Map<String, Value>, error: Option<String>) -> Signature<O> {
    let mut s = Signature::new(format!("celery.{kind}"));
    s.kwargs = members;
    s.subtask_type = Some(kind.to_owned());
    s.encode_error = error;
    s
}

fn wires<'a>(sigs: impl IntoIterator<Item = &'a Signature<Value>>) -> (Value, Option<String>) {
    let mut error = None;
    let list = sigs
        .into_iter()
        .map(|s| {
            if error.is_none() {
                error.clone_from(&s.encode_error);
            }
            serde_json::to_value(s.to_wire()).unwrap_or(Value::Null)
        })
        .collect();
    (Value::Array(list), error)
}

// ===== chain =====

/// Tasks run one after another, each result prepended to the next task's arguments (unless
/// that signature is [immutable](Signature::immutable)). `O` is the last task's output.
///
/// Only the first task is sent; it carries the rest (Celery's reversed `embed.chain`). A
/// failure stops the chain: the steps still to come are stored as FAILURE with the same error
/// and the errbacks run.
#[derive(Debug)]
pub struct Chain<O = Value> {
    steps: Vec<Signature<Value>>,
    _output: PhantomData<fn() -> O>,
}

impl<O> Clone for Chain<O> {
    fn clone(&self) -> Self {
        Chain {
            steps: self.steps.clone(),
            _output: PhantomData,
        }
    }
}

/// A chain of signatures of any outputs; see [`chain!`](crate::chain!) for a typed one.
pub fn chain<O>(steps: impl IntoIterator<Item = Signature<O>>) -> Chain<Value> {
    Chain {
        steps: steps.into_iter().map(Signature::untyped).collect(),
        _output: PhantomData,
    }
}

/// A [`Chain`] of the given signatures, typed by the last one's output.
///
/// ```
/// # async fn demo(app: &celeriac::App) -> celeriac::Result<()> {
/// use celeriac::Signature;
/// let total = celeriac::chain![
///     Signature::<i64>::new("tasks.add").arg(1).arg(2),
///     Signature::<i64>::new("tasks.mul").arg(10),
/// ]
/// .apply_async(app)
/// .await?;
/// # let _ = total; Ok(()) }
/// ```
#[macro_export]
macro_rules! chain {
    ($first:expr $(, $rest:expr)* $(,)?) => {
        $crate::canvas::Chain::new($first)$(.then($rest))*
    };
}

impl<O> Chain<O> {
    /// A chain starting with `first`.
    pub fn new(first: Signature<O>) -> Self {
        Chain {
            steps: vec![first.untyped()],
            _output: PhantomData,
        }
    }

    /// Appends `next`, which receives the previous result as its first argument.
    pub fn then<P>(mut self, next: Signature<P>) -> Chain<P> {
        self.steps.push(next.untyped());
        Chain {
            steps: self.steps,
            _output: PhantomData,
        }
    }

    /// Runs `errback` when any step fails (added to every step, run once).
    #[must_use]
    pub fn link_error<P>(mut self, errback: &Signature<P>) -> Self {
        self.steps = self
            .steps
            .into_iter()
            .map(|s| s.link_error(errback))
            .collect();
        self
    }

    /// The chain as one signature (Celery's `celery.chain` map), to nest it in a group, a
    /// chord body or another chain.
    pub fn into_signature(self) -> Signature<O> {
        let (tasks, error) = wires(&self.steps);
        let mut m = Map::new();
        m.insert("tasks".into(), tasks);
        composite("chain", m, error)
    }

    /// Sends the first step; returns a handle on the last step's result.
    ///
    /// Steps may be composites ([`Group::into_signature`], [`Chord::into_signature`]): a group
    /// followed by more steps becomes a chord whose body is the next step (as in Celery); the
    /// last step must not be a bare group (use a chord, or [`Group::apply_async`]).
    pub async fn apply_async(self, app: &App) -> Result<AsyncResult<O>> {
        if self.steps.is_empty() {
            return Err(Error::protocol("an empty chain cannot be sent"));
        }
        let mut frozen = Vec::with_capacity(self.steps.len());
        let last_step = self.steps.len() - 1;
        for (i, s) in self.steps.iter().enumerate() {
            if i < last_step && s.subtask_type.as_deref() == Some("group") {
                // Only its members' ids matter; the next step waits for them as a chord body.
                if let Some(e) = &s.encode_error {
                    return Err(Error::protocol(e.clone()));
                }
                frozen.push(Frozen {
                    wire: s.to_wire(),
                    options: None,
                    id: String::new(),
                });
            } else {
                frozen.push(freeze(s)?);
            }
        }
        let first = frozen.remove(0);
        let last = frozen.last().map_or(first.id.clone(), |f| f.id.clone());
        let rest: Vec<_> = frozen.into_iter().rev().map(|f| f.wire).collect();
        send_planned(app, &first.wire, first.options, Some(rest)).await?;
        Ok(AsyncResult::sent(app, last))
    }
}

// ===== group =====

/// Tasks run side by side; [`Group::apply_async`] returns a [`GroupResult`].
#[derive(Debug)]
pub struct Group<O = Value> {
    members: Vec<Signature<O>>,
}

impl<O> Clone for Group<O> {
    fn clone(&self) -> Self {
        Group {
            members: self.members.clone(),
        }
    }
}

/// A group of signatures.
pub fn group<O>(members: impl IntoIterator<Item = Signature<O>>) -> Group<O> {
    Group {
        members: members.into_iter().collect(),
    }
}

impl<O> Group<O> {
    /// The members.
    pub fn members(&self) -> &[Signature<O>] {
        &self.members
    }

    /// The group as one signature (Celery's `celery.group` map), to nest it in a chain: a
    /// group followed by more steps is a chord, whose next step gets the list of results.
    pub fn into_signature(self) -> Signature<Vec<O>> {
        let members: Vec<Signature<Value>> =
            self.members.into_iter().map(Signature::untyped).collect();
        let (tasks, error) = wires(&members);
        let mut m = Map::new();
        m.insert("tasks".into(), tasks);
        composite("group", m, error)
    }

    /// Saves the group, then sends every member with `group` and `group_index` headers.
    ///
    /// A member may be a chain or a chord ([`Chain::into_signature`],
    /// [`Chord::into_signature`]); its result is the chain's last task's or the chord body's.
    pub async fn apply_async(self, app: &App) -> Result<GroupResult<O>> {
        let gid = new_id();
        let frozen = self
            .members
            .iter()
            .map(freeze)
            .collect::<Result<Vec<_>>>()?;
        let ids: Vec<String> = frozen.iter().map(|f| f.id.clone()).collect();
        app.backend().save_group(&gid, &ids).await?;
        for (i, f) in frozen.into_iter().enumerate() {
            let mut wire = f.wire;
            wire.options
                .insert("group_id".into(), Value::String(gid.clone()));
            wire.options.insert("group_index".into(), i.into());
            send_planned(app, &wire, f.options, None).await?;
        }
        Ok(GroupResult::from_ids(app, gid, ids))
    }
}

/// How far a group has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Progress {
    /// Members that succeeded.
    pub succeeded: usize,
    /// Members that failed or were revoked.
    pub failed: usize,
    /// All members.
    pub total: usize,
}

impl Progress {
    /// Members that finished either way.
    pub fn done(&self) -> usize {
        self.succeeded + self.failed
    }
}

/// A handle on a group's results: per-member [`AsyncResult`]s in group order.
pub struct GroupResult<O = Value> {
    id: String,
    app: App,
    results: Vec<AsyncResult<O>>,
}

impl<O> Clone for GroupResult<O> {
    fn clone(&self) -> Self {
        GroupResult {
            id: self.id.clone(),
            app: self.app.clone(),
            results: self.results.clone(),
        }
    }
}

impl<O> std::fmt::Debug for GroupResult<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupResult")
            .field("id", &self.id)
            .field("results", &self.results)
            .finish()
    }
}

impl<O> GroupResult<O> {
    /// A handle on group `id` with member ids `ids` (in group order).
    pub fn from_ids(app: &App, id: impl Into<String>, ids: Vec<String>) -> Self {
        GroupResult {
            id: id.into(),
            app: app.clone(),
            results: ids
                .into_iter()
                .map(|i| AsyncResult::from_id(app, i))
                .collect(),
        }
    }

    /// The group id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The members' results, in group order.
    pub fn results(&self) -> &[AsyncResult<O>] {
        &self.results
    }

    /// The number of members.
    pub fn len(&self) -> usize {
        self.results.len()
    }

    /// Whether the group has no members.
    pub fn is_empty(&self) -> bool {
        self.results.is_empty()
    }

    /// Each member's state, in group order.
    pub async fn states(&self) -> Result<Vec<TaskState>> {
        let mut states = Vec::with_capacity(self.results.len());
        for r in &self.results {
            states.push(r.state().await?);
        }
        Ok(states)
    }

    /// How many members succeeded, failed, and exist.
    pub async fn progress(&self) -> Result<Progress> {
        let states = self.states().await?;
        let succeeded = states.iter().filter(|s| **s == TaskState::Success).count();
        let failed = states
            .iter()
            .filter(|s| s.is_ready() && **s != TaskState::Success)
            .count();
        Ok(Progress {
            succeeded,
            failed,
            total: states.len(),
        })
    }

    /// How many members succeeded (Celery's `completed_count`).
    pub async fn completed_count(&self) -> Result<usize> {
        Ok(self.progress().await?.succeeded)
    }

    /// Whether every member finished.
    pub async fn ready(&self) -> Result<bool> {
        let p = self.progress().await?;
        Ok(p.done() == p.total)
    }

    /// Revokes every member that has not finished.
    pub async fn revoke(&self) -> Result<()> {
        for r in &self.results {
            r.revoke().await?;
        }
        Ok(())
    }

    /// Saves the group's member ids in the backend (Celery's format), for [`GroupResult::restore`].
    pub async fn save(&self) -> Result<()> {
        let ids: Vec<String> = self.results.iter().map(|r| r.id().to_owned()).collect();
        self.app.backend().save_group(&self.id, &ids).await
    }

    /// The group saved under `id`, if any.
    pub async fn restore(app: &App, id: &str) -> Result<Option<Self>> {
        Ok(app
            .backend()
            .restore_group(id)
            .await?
            .map(|ids| GroupResult::from_ids(app, id, ids)))
    }
}

impl<O: DeserializeOwned> GroupResult<O> {
    /// Waits for every member and returns their outputs in group order; the first failed
    /// member (in group order) is the error. Fails with [`ErrorKind::Timeout`] when the whole
    /// wait takes longer than `timeout`.
    pub async fn join(&self, timeout: Option<Duration>) -> Result<Vec<O>> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut out = Vec::with_capacity(self.results.len());
        for r in &self.results {
            let left = deadline.map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
            let meta = r.wait_meta(left).await.map_err(|e| {
                if e.kind() == ErrorKind::Timeout {
                    Error::new(
                        ErrorKind::Timeout,
                        format!("group {} not ready after {timeout:?}", self.id),
                    )
                } else {
                    e
                }
            })?;
            out.push(decode_ready(meta)?);
        }
        Ok(out)
    }
}

// ===== chord =====

/// A group (the header) whose ordered results become the first argument of one more task (the
/// body) once every member has finished.
#[derive(Debug)]
pub struct Chord<P = Value> {
    header: Vec<Signature<Value>>,
    body: Signature<P>,
}

/// A chord of `header` and `body`.
pub fn chord<O, P>(header: Group<O>, body: Signature<P>) -> Chord<P> {
    Chord {
        header: header.members.into_iter().map(Signature::untyped).collect(),
        body,
    }
}

/// A handle on a chord: the header's [`GroupResult`] and the body's [`AsyncResult`].
#[derive(Debug, Clone)]
pub struct ChordResult<P = Value> {
    header: GroupResult<Value>,
    body: AsyncResult<P>,
}

impl<P> ChordResult<P> {
    /// The header group's results.
    pub fn header(&self) -> &GroupResult<Value> {
        &self.header
    }

    /// The body's result.
    pub fn body(&self) -> &AsyncResult<P> {
        &self.body
    }
}

impl<P: DeserializeOwned> ChordResult<P> {
    /// Waits for the body's output, at most `timeout`.
    pub async fn get_timeout(&self, timeout: Duration) -> Result<P> {
        self.body.get_timeout(timeout).await
    }
}

impl<P> Chord<P> {
    /// The chord as one signature (Celery's `celery.chord` map), to make it a chain step:
    /// the previous step's result goes to every header member, and the next step gets the
    /// body's result.
    pub fn into_signature(self) -> Signature<P> {
        let (header, mut error) = wires(&self.header);
        let body = self.body.untyped();
        if error.is_none() {
            error.clone_from(&body.encode_error);
        }
        let mut m = Map::new();
        m.insert("header".into(), header);
        m.insert(
            "body".into(),
            serde_json::to_value(body.to_wire()).unwrap_or(Value::Null),
        );
        composite("chord", m, error)
    }

    /// Saves the header group, then sends every member carrying the body (which may be a
    /// chain, [`Chain::into_signature`]). Header members must be plain signatures.
    pub async fn apply_async(self, app: &App) -> Result<ChordResult<P>> {
        if let Some(s) = self.header.iter().find(|s| s.is_composite()) {
            return Err(Error::protocol(format!(
                "a {} inside a chord header is not supported yet",
                s.task()
            )));
        }
        let gid = new_id();
        let body = freeze(&self.body)?;
        let body_result = AsyncResult::from_id(app, body.id.clone());
        let mut body_wire = body.wire;
        body_wire
            .options
            .insert("group_id".into(), Value::String(gid.clone()));
        let frozen = self.header.iter().map(freeze).collect::<Result<Vec<_>>>()?;
        let ids: Vec<String> = frozen.iter().map(|f| f.id.clone()).collect();
        app.backend().save_group(&gid, &ids).await?;
        let unlock = if frozen.is_empty() {
            None
        } else {
            celeriac_core::canvas::announce_chord(&**app.backend(), &gid, &ids, &body_wire).await?
        };
        if frozen.is_empty() {
            // Nothing to wait for: the body runs at once with no results.
            let body_wire =
                celeriac_core::canvas::with_parent_value(&body_wire, Value::Array(vec![]));
            send_planned(app, &body_wire, body.options.clone(), None).await?;
        }
        let chord = serde_json::to_value(&body_wire)
            .map_err(|e| Error::protocol(format!("cannot encode the chord body: {e}")))?;
        for (i, f) in frozen.into_iter().enumerate() {
            let mut wire = f.wire;
            wire.options
                .insert("group_id".into(), Value::String(gid.clone()));
            wire.options.insert("group_index".into(), i.into());
            wire.options.insert("chord".into(), chord.clone());
            app.send_wire(&wire, f.options, None).await?;
        }
        if let Some(unlock) = unlock {
            send_unlock(app, unlock, &body_wire.task, body.options).await?;
        }
        Ok(ChordResult {
            header: GroupResult::from_ids(app, gid, ids),
            body: body_result,
        })
    }
}

// ===== map, starmap, chunks =====

/// One message per item: `task` with the item appended to its arguments, as a group.
pub fn map<O, I: Serialize>(task: &Signature<O>, items: impl IntoIterator<Item = I>) -> Group<O> {
    group(items.into_iter().map(|i| task.clone().arg(i)))
}

/// One message per argument tuple: `task` with the tuple appended to its arguments, as a group.
pub fn starmap<O>(task: &Signature<O>, tuples: impl IntoIterator<Item = Vec<Value>>) -> Group<O> {
    group(tuples.into_iter().map(|t| {
        let mut s = task.clone();
        s.args.extend(t);
        s
    }))
}

/// `task` over every argument tuple, `size` tuples per message (each message runs the
/// built-in [`STARMAP_TASK`], which calls the task once per tuple and returns the list of
/// outputs). A group: its progress counts chunks; [`GroupResult::join`] gives one list per
/// chunk.
pub fn chunks<O>(
    task: &Signature<O>,
    tuples: impl IntoIterator<Item = Vec<Value>>,
    size: usize,
) -> Group<Vec<O>> {
    let tuples: Vec<Vec<Value>> = tuples.into_iter().collect();
    let wire = serde_json::to_value(task.to_wire()).unwrap_or(Value::Null);
    group(tuples.chunks(size.max(1)).map(|c| {
        let mut s = Signature::<Vec<O>>::new(STARMAP_TASK).arg(&wire).arg(c);
        s.options.queue = task.options.queue.clone();
        s
    }))
}
