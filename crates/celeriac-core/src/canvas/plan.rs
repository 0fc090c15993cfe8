//! Planning a signature that may be a composite (a chain, group or chord map, §3.6 of the
//! wire notes) into the plain messages that start it: [`plan`].

use serde_json::Value;

use super::message::with_parent_value;
use super::options::bad;
use crate::error::{Error, Result};
use crate::protocol::Signature;

/// One plain task message to send: a signature and the rest of its chain (reversed).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Step {
    /// A plain (non-composite) signature.
    pub sig: Signature,
    /// The rest of its chain, next step last.
    pub chain: Option<Vec<Signature>>,
}

/// What starting a signature takes: the plain messages to send, and the groups to save
/// before any of them is sent (the headers of chords, which their members count against).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Plan {
    /// The messages, in sending order.
    pub steps: Vec<Step>,
    /// `(group_id, member task ids, chord body)` of each chord header, to save with
    /// `save_group` and announce ([`announce_chord`](super::announce_chord)) first.
    pub groups: Vec<(String, Vec<String>, Signature)>,
}

/// Flattens a signature that may be a composite map (§3.6 of the wire notes), followed by
/// `chain` (reversed: next step last), into the plain messages that start it.
///
/// - A plain signature is one step carrying the chain.
/// - A `chain` is its first task carrying its other tasks and then `chain`; a first task that
///   is itself a composite is planned the same way.
/// - A `group` is one step per member (members get the group's `task_id`, or a new id, as
///   `group_id`, and their `group_index`). A group followed by more steps becomes a chord
///   whose body is the next step carrying the rest (Celery does the same).
/// - A `chord` (`kwargs.header`: a list or a group map; `kwargs.body`) saves its header as a
///   group and sends each member (a frozen id, `group_id`, `group_index`, the body under
///   `chord`); steps after it run after its body. Header members must be plain signatures.
///
/// A composite's own args are partial args of its members (the first, for a chain; every
/// header member, for a chord). Other composites (`chunks`, `xmap`, ...) are refused.
pub fn plan(sig: &Signature, chain: Option<Vec<Signature>>) -> Result<Plan> {
    let mut p = Plan::default();
    plan_into(sig.clone(), chain.unwrap_or_default(), &mut p)?;
    Ok(p)
}

/// [`plan`] for signatures that need no saved group (no chord inside): the steps, with
/// `parent_value` prepended where a callback's would be.
pub fn expand(sig: &Signature, parent_value: Option<&Value>) -> Result<Vec<Step>> {
    let sig = match parent_value {
        Some(v) => with_parent_value(sig, v.clone()),
        None => sig.clone(),
    };
    let p = plan(&sig, None)?;
    if !p.groups.is_empty() {
        return Err(Error::protocol(format!(
            "{} holds a chord; plan it with canvas::plan, which saves its header",
            sig.task
        )));
    }
    Ok(p.steps)
}

/// A composite's own args prepended to `member`'s (unless immutable).
fn partial(composite: &Signature, member: &mut Signature) {
    if !member.immutable && !composite.args.is_empty() {
        let mut args = composite.args.clone();
        args.append(&mut member.args);
        member.args = args;
    }
}

fn sig_list(owner: &Signature, v: Option<&Value>, what: &str) -> Result<Vec<Signature>> {
    serde_json::from_value(v.cloned().unwrap_or(Value::Null)).map_err(|_| {
        Error::protocol(format!(
            "a {} signature needs {what}, a list of signature maps",
            owner.task
        ))
    })
}

/// `first` followed by `rest` (reversed) as one signature: `first` itself, or a chain map.
pub fn chain_of(first: Signature, rest: Vec<Signature>) -> Signature {
    if rest.is_empty() {
        return first;
    }
    let mut tasks = vec![first];
    tasks.extend(rest.into_iter().rev());
    let mut c = Signature::new("celery.chain", vec![]);
    c.subtask_type = Some("chain".into());
    c.kwargs.insert(
        "tasks".into(),
        serde_json::to_value(tasks).unwrap_or(Value::Null),
    );
    c
}

fn plan_into(sig: Signature, mut rest: Vec<Signature>, p: &mut Plan) -> Result<()> {
    match sig.subtask_type.as_deref() {
        None => {
            let chain = (!rest.is_empty()).then_some(rest);
            p.steps.push(Step { sig, chain });
            Ok(())
        }
        Some("chain") => {
            let mut tasks = sig_list(&sig, sig.kwargs.get("tasks"), "kwargs.tasks")?;
            if tasks.is_empty() {
                return match rest.pop() {
                    None => Ok(()),
                    Some(next) => plan_into(next, rest, p),
                };
            }
            let mut first = tasks.remove(0);
            partial(&sig, &mut first);
            rest.extend(tasks.into_iter().rev());
            plan_into(first, rest, p)
        }
        Some("group") => {
            let mut tasks = sig_list(&sig, sig.kwargs.get("tasks"), "kwargs.tasks")?;
            for m in &mut tasks {
                partial(&sig, m);
            }
            let gid = match sig.options.get("task_id") {
                Some(Value::String(id)) => id.clone(),
                _ => crate::protocol::new_id(),
            };
            if let Some(next) = rest.pop() {
                return plan_chord(gid, tasks, chain_of(next, rest), p);
            }
            for (i, mut member) in tasks.into_iter().enumerate() {
                default_option(&mut member, "group_id", gid.as_str());
                default_option(&mut member, "group_index", i);
                plan_into(member, Vec::new(), p)?;
            }
            Ok(())
        }
        Some("chord") => {
            let header = sig.kwargs.get("header");
            let (mut tasks, gid) = match header {
                Some(Value::Object(g)) if g.get("subtask_type") == Some(&json_str("group")) => {
                    let group: Signature = serde_json::from_value(Value::Object(g.clone()))
                        .map_err(|_| bad("chord header", "a group signature map"))?;
                    let mut tasks = sig_list(&group, group.kwargs.get("tasks"), "kwargs.tasks")?;
                    for m in &mut tasks {
                        partial(&group, m);
                    }
                    let gid = group.options.get("task_id").and_then(Value::as_str);
                    (tasks, gid.map(str::to_owned))
                }
                other => (sig_list(&sig, other, "kwargs.header")?, None),
            };
            for m in &mut tasks {
                partial(&sig, m);
            }
            let body: Signature = sig
                .kwargs
                .get("body")
                .and_then(|b| serde_json::from_value(b.clone()).ok())
                .ok_or_else(|| bad("chord body", "a signature map"))?;
            let gid = gid.unwrap_or_else(crate::protocol::new_id);
            plan_chord(gid, tasks, chain_of(body, rest), p)
        }
        Some(kind) => Err(Error::protocol(format!(
            "a {kind} signature ({}) as a callback or chain step is not supported yet",
            sig.task
        ))),
    }
}

fn json_str(s: &str) -> Value {
    Value::String(s.to_owned())
}

fn plan_chord(
    gid: String,
    header: Vec<Signature>,
    mut body: Signature,
    p: &mut Plan,
) -> Result<()> {
    if header.is_empty() {
        // Nothing to wait for: the body runs at once with no results.
        return plan_into(
            with_parent_value(&body, Value::Array(vec![])),
            Vec::new(),
            p,
        );
    }
    if body.subtask_type.is_none() {
        default_option(&mut body, "group_id", gid.as_str());
    }
    let body_map = serde_json::to_value(&body)
        .map_err(|e| Error::protocol(format!("cannot encode the chord body: {e}")))?;
    let mut ids = Vec::with_capacity(header.len());
    let mut steps = Vec::with_capacity(header.len());
    for (i, mut member) in header.into_iter().enumerate() {
        if let Some(kind) = &member.subtask_type {
            return Err(Error::protocol(format!(
                "a {kind} inside a chord header is not supported yet"
            )));
        }
        let id = match member.options.get("task_id") {
            Some(Value::String(id)) => id.clone(),
            _ => crate::protocol::new_id(),
        };
        member
            .options
            .insert("task_id".into(), Value::String(id.clone()));
        member
            .options
            .insert("group_id".into(), Value::String(gid.clone()));
        member.options.insert("group_index".into(), i.into());
        member.options.insert("chord".into(), body_map.clone());
        ids.push(id);
        steps.push(Step {
            sig: member,
            chain: None,
        });
    }
    p.groups.push((gid, ids, body));
    p.steps.extend(steps);
    Ok(())
}

/// Sets `options[key] = value` unless the signature already has one.
pub fn default_option(sig: &mut Signature, key: &str, value: impl Into<Value>) {
    let entry = sig.options.entry(key.to_owned()).or_insert(Value::Null);
    if entry.is_null() {
        *entry = value.into();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Signature {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn composite_maps_expand_to_plain_messages() {
        let group: Signature = serde_json::from_value(json!({
            "task": "celery.group", "subtask_type": "group", "options": {"task_id": "g"},
            "kwargs": {"tasks": [{"task": "a", "args": [1]}, {"task": "b", "args": [2]}]}
        }))
        .unwrap();
        let steps = expand(&group, Some(&json!(0))).unwrap();
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[1].sig.args, vec![json!(0), json!(2)]);
        assert_eq!(steps[1].sig.options["group_id"], json!("g"));
        assert_eq!(steps[1].sig.options["group_index"], json!(1));

        let chain: Signature = serde_json::from_value(json!({
            "task": "celery.chain", "subtask_type": "chain",
            "kwargs": {"tasks": [{"task": "a"}, {"task": "b"}, {"task": "c"}]}
        }))
        .unwrap();
        let steps = expand(&chain, Some(&json!(5))).unwrap();
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].sig.task, "a");
        assert_eq!(steps[0].sig.args, vec![json!(5)]);
        let rest: Vec<&str> = steps[0]
            .chain
            .as_ref()
            .unwrap()
            .iter()
            .map(|s| s.task.as_str())
            .collect();
        assert_eq!(rest, ["c", "b"]);

        let mut chunks = Signature::new("celery.chunks", vec![]);
        chunks.subtask_type = Some("chunks".into());
        assert!(
            expand(&chunks, None)
                .unwrap_err()
                .to_string()
                .contains("not supported")
        );
    }

    #[test]
    fn nested_composites_plan_into_chords_and_chains() {
        // chain(group(a, b), c, d) is chord(group(a, b), chain(c, d)).
        let c = map(
            json!({"task": "celery.chain", "subtask_type": "chain", "kwargs": {"tasks": [
            {"task": "celery.group", "subtask_type": "group", "options": {"task_id": "g"},
             "kwargs": {"tasks": [{"task": "a"}, {"task": "b"}]}},
            {"task": "c"}, {"task": "d"}]}}),
        );
        let p = plan(&c, None).unwrap();
        assert_eq!(p.groups.len(), 1);
        assert_eq!(p.groups[0].0, "g");
        assert_eq!(p.steps.len(), 2);
        let ids: Vec<&str> = p
            .steps
            .iter()
            .map(|s| s.sig.options["task_id"].as_str().unwrap())
            .collect();
        assert_eq!(p.groups[0].1, ids);
        let body: Signature =
            serde_json::from_value(p.steps[1].sig.options["chord"].clone()).unwrap();
        assert_eq!(body.subtask_type.as_deref(), Some("chain"));
        assert_eq!(p.steps[1].sig.options["group_index"], json!(1));

        // chain(x, chord([a], b), y): x carries the chord, which runs y after its body.
        let c = map(
            json!({"task": "celery.chain", "subtask_type": "chain", "kwargs": {"tasks": [
            {"task": "x"},
            {"task": "celery.chord", "subtask_type": "chord",
             "kwargs": {"header": [{"task": "a"}], "body": {"task": "b"}}},
            {"task": "y"}]}}),
        );
        let p = plan(&c, None).unwrap();
        assert_eq!(p.steps.len(), 1);
        assert_eq!(p.steps[0].sig.task, "x");
        let rest = p.steps[0].chain.clone().unwrap();
        assert_eq!(rest.len(), 2);
        assert_eq!(rest[0].task, "y");
        let p = plan(
            &with_parent_value(&rest[1], json!(7)),
            Some(vec![rest[0].clone()]),
        )
        .unwrap();
        assert_eq!(p.steps[0].sig.task, "a");
        assert_eq!(p.steps[0].sig.args, vec![json!(7)]);
        let body: Signature =
            serde_json::from_value(p.steps[0].sig.options["chord"].clone()).unwrap();
        assert_eq!(body.subtask_type.as_deref(), Some("chain"));

        // group(chain(a, b), c): a carries b; c alone.
        let g = map(
            json!({"task": "celery.group", "subtask_type": "group", "kwargs": {"tasks": [
            {"task": "celery.chain", "subtask_type": "chain", "kwargs": {"tasks": [{"task": "a"}, {"task": "b"}]}},
            {"task": "c"}]}}),
        );
        let p = plan(&g, None).unwrap();
        assert!(p.groups.is_empty());
        assert_eq!(p.steps.len(), 2);
        assert_eq!(p.steps[0].sig.task, "a");
        assert_eq!(p.steps[0].chain.as_ref().unwrap()[0].task, "b");
        assert_eq!(p.steps[1].sig.task, "c");
        // A chain inside a chord header is refused with a clear error.
        let bad = map(
            json!({"task": "celery.chord", "subtask_type": "chord", "kwargs": {
            "header": [{"task": "celery.chain", "subtask_type": "chain", "kwargs": {"tasks": []}}],
            "body": {"task": "b"}}}),
        );
        assert!(
            plan(&bad, None)
                .unwrap_err()
                .to_string()
                .contains("inside a chord header")
        );
    }
}
