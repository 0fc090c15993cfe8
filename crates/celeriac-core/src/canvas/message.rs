//! Building the message that runs one call: [`build_call`] (typed options) and
//! [`build_message`] (a signature map, as canvas carries it).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::options::{SendOptions, after};
use crate::error::{Error, Result};
use crate::protocol::{Body, ContentType, Embed, Headers, Message, Signature, TimeLimit};
use crate::security::BodySigner;
use crate::task::TaskOptions;

/// Longest `argsrepr`/`kwargsrepr` written into headers, as Celery does.
const REPR_MAX: usize = 1024;

/// A message built from a signature, ready to publish.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Outgoing {
    /// The message.
    pub message: Message,
    /// The queue the signature or its task names; `None` means "route it yourself".
    pub queue: Option<String>,
    /// When it may run, if later than now.
    pub eta: Option<DateTime<Utc>>,
    /// The priority asked for, if any.
    pub priority: Option<u8>,
}

/// Who sends, and how: the parts of a message that do not come from the signature.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Sender<'a> {
    /// The body codec.
    pub content_type: ContentType,
    /// The `origin` header (the sender's node name).
    pub origin: Option<&'a str>,
    /// The time countdowns and relative expiries count from.
    pub now: DateTime<Utc>,
    /// Signs every body built (serializer `auth`); `None`: bodies go out unsigned.
    pub signer: Option<&'a dyn BodySigner>,
}

impl<'a> Sender<'a> {
    /// A sender encoding with `content_type`, now.
    pub fn new(content_type: ContentType, origin: Option<&'a str>) -> Self {
        Sender {
            content_type,
            origin,
            now: Utc::now(),
            signer: None,
        }
    }

    /// The same sender, signing every body with `signer` when there is one.
    #[must_use]
    pub fn signed_by(mut self, signer: Option<&'a dyn BodySigner>) -> Self {
        self.signer = signer;
        self
    }
}

/// One task call to build a message for: the task, its arguments and typed options.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Call<'a> {
    /// The task name.
    pub task: &'a str,
    /// Positional arguments.
    pub args: &'a [Value],
    /// Keyword arguments.
    pub kwargs: &'a Map<String, Value>,
    /// How to send it.
    pub options: &'a SendOptions,
}

impl<'a> Call<'a> {
    /// A call of `task` with `args`, `kwargs` and `options`.
    pub fn new(
        task: &'a str,
        args: &'a [Value],
        kwargs: &'a Map<String, Value>,
        options: &'a SendOptions,
    ) -> Self {
        Call {
            task,
            args,
            kwargs,
            options,
        }
    }
}

/// Builds the message for `sig`, a signature in Celery's map form: its options are read
/// with [`SendOptions::from_wire`], then as [`build_call`].
///
/// Fails for options of the wrong type (a `countdown` that is not a number, ...) and for
/// composite signatures (`subtask_type` `chain`, `group`, `chord`), which are not messages.
pub fn build_message(
    sig: &Signature,
    task_options: &TaskOptions,
    chain: Option<Vec<Signature>>,
    sender: &Sender<'_>,
) -> Result<Outgoing> {
    if let Some(kind) = sig.subtask_type.as_deref() {
        return Err(Error::protocol(format!(
            "a {kind} signature ({}) cannot be sent as one message",
            sig.task
        )));
    }
    let options = SendOptions::from_wire(&sig.options)?;
    build_call(
        Call::new(&sig.task, &sig.args, &sig.kwargs, &options),
        task_options,
        chain,
        sender,
    )
}

/// Builds the message for `call`, with `task_options` (the task's registration, or defaults)
/// filling what its options leave out, and `chain` as the rest of its chain (reversed: the
/// next step last).
///
/// Fails when a countdown or expiry lies past the calendar's end, or the body cannot be
/// encoded or signed.
pub fn build_call(
    call: Call<'_>,
    task_options: &TaskOptions,
    chain: Option<Vec<Signature>>,
    sender: &Sender<'_>,
) -> Result<Outgoing> {
    let o = call.options;
    let id = o.task_id.clone().unwrap_or_else(crate::protocol::new_id);
    let now = sender.now;
    let eta = o.run_at(now)?;
    let expires = match o.expires_at(now)? {
        Some(t) => Some(t),
        None => task_options
            .expires
            .map(|e| after(now, e, "expires"))
            .transpose()?,
    };
    let priority = o.priority.or(task_options.priority);

    let mut headers = Headers::new(call.task, id);
    headers.eta = eta;
    headers.expires = expires;
    let secs = |d: Option<std::time::Duration>| d.map(|d| d.as_secs_f64());
    headers.timelimit = TimeLimit {
        hard: secs(o.time_limit.or(task_options.time_limit)),
        soft: secs(o.soft_time_limit.or(task_options.soft_time_limit)),
    };
    headers.argsrepr = Some(repr(&Value::Array(call.args.to_vec())));
    headers.kwargsrepr = Some(repr(&Value::Object(call.kwargs.clone())));
    headers.origin = sender.origin.map(str::to_owned);
    headers.ignore_result = o.ignore_result.unwrap_or(task_options.ignore_result);
    headers.shadow = o.shadow.clone();
    if let Some(root) = &o.root_id {
        headers.root_id = Some(root.clone());
    }
    headers.parent_id = o.parent_id.clone();
    headers.group = o.group_id.clone();
    headers.group_index = o.group_index;
    headers.extra = o.headers.clone();
    // Every send goes through here: the client's, the worker's canvas steps, the web API's.
    #[cfg(feature = "otel")]
    headers.inject_current_trace();

    let some = |v: &Vec<Signature>| (!v.is_empty()).then(|| v.clone());
    let embed = Embed {
        callbacks: some(&o.link),
        errbacks: some(&o.link_error),
        chain,
        chord: o.chord.as_deref().cloned(),
    };
    let body = Body {
        args: call.args.to_vec(),
        kwargs: call.kwargs.clone(),
        embed,
    };
    let mut message = Message::new(headers, &body, sender.content_type)?;
    if let Some(signer) = sender.signer {
        signer.sign(&mut message)?;
    }
    message.properties.priority = priority;
    // Celery's freeze stamps the sender's reply queue on every step; results go there.
    message.properties.reply_to = o.reply_to.clone();
    Ok(Outgoing {
        message,
        queue: o.queue.clone().or_else(|| task_options.queue.clone()),
        eta: eta.filter(|t| *t > now),
        priority,
    })
}

/// `sig` as a callback of a task that returned `value`: the value prepended to its args
/// unless the signature is immutable.
pub fn with_parent_value(sig: &Signature, value: Value) -> Signature {
    let mut s = sig.clone();
    if !s.immutable {
        s.args.insert(0, value);
    }
    s
}

/// A short printable form of arguments, for logs and monitors.
pub fn repr(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > REPR_MAX {
        let mut cut = REPR_MAX - 3;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sender() -> Sender<'static> {
        Sender::new(ContentType::Json, Some("gen1@host"))
    }

    #[test]
    fn options_become_headers_and_embed() {
        let mut sig = Signature::new("tasks.add", vec![json!(1)]);
        sig.options = json!({
            "task_id": "t-1", "queue": "math", "priority": 12, "countdown": 5,
            "parent_id": "p", "root_id": "r", "group_id": "g", "group_index": 2,
            "link": {"task": "tasks.echo"}, "link_error": [{"task": "tasks.log"}],
            "headers": {"tenant": "acme"}, "time_limit": 3, "reply_to": "client-oid"
        })
        .as_object()
        .cloned()
        .unwrap();
        let rest = vec![Signature::new("tasks.mul", vec![json!(2)])];
        let out =
            build_message(&sig, &TaskOptions::default(), Some(rest.clone()), &sender()).unwrap();
        let h = &out.message.headers;
        assert_eq!(h.id, "t-1");
        assert_eq!(h.parent_id.as_deref(), Some("p"));
        assert_eq!(h.root_id.as_deref(), Some("r"));
        assert_eq!(h.group.as_deref(), Some("g"));
        assert_eq!(h.group_index, Some(2));
        assert_eq!(h.timelimit.hard, Some(3.0));
        assert_eq!(h.extra["tenant"], json!("acme"));
        assert!(h.eta.is_some() && out.eta.is_some());
        assert_eq!(out.queue.as_deref(), Some("math"));
        assert_eq!(out.priority, Some(9));
        assert_eq!(
            out.message.properties.reply_to.as_deref(),
            Some("client-oid")
        );
        let body = out.message.decode_body().unwrap();
        assert_eq!(body.args, vec![json!(1)]);
        assert_eq!(body.embed.callbacks.unwrap()[0].task, "tasks.echo");
        assert_eq!(body.embed.errbacks.unwrap()[0].task, "tasks.log");
        assert_eq!(body.embed.chain, Some(rest));
    }

    #[test]
    fn task_options_fill_the_gaps_and_bad_options_are_refused() {
        let sig = Signature::new("tasks.add", vec![]);
        let t = TaskOptions {
            queue: Some("q".into()),
            priority: Some(3),
            ..TaskOptions::default()
        };
        let out = build_message(&sig, &t, None, &sender()).unwrap();
        assert_eq!(out.queue.as_deref(), Some("q"));
        assert_eq!(out.message.properties.priority, Some(3));
        assert_eq!(
            out.message.headers.root_id.as_deref(),
            Some(out.message.id())
        );

        let mut bad = sig.clone();
        bad.options.insert("countdown".into(), json!("soon"));
        let e = build_message(&bad, &t, None, &sender()).unwrap_err();
        assert!(e.to_string().contains("countdown"), "{e}");
        let mut group = sig;
        group.subtask_type = Some("group".into());
        assert!(build_message(&group, &t, None, &sender()).is_err());
    }

    #[test]
    fn parent_values_are_prepended_unless_immutable() {
        let sig = Signature::new("t", vec![json!(1)]);
        assert_eq!(
            with_parent_value(&sig, json!(0)).args,
            vec![json!(0), json!(1)]
        );
        let mut si = sig;
        si.immutable = true;
        assert_eq!(with_parent_value(&si, json!(0)).args, vec![json!(1)]);
    }
}
