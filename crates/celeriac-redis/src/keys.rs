//! Key names, exactly as kombu and Celery spell them, and kombu's priority buckets.

use celeriac_core::broadcast::{CONTROL_EXCHANGE, EVENT_EXCHANGE, REPLY_EXCHANGE};

/// kombu's separator between a queue name and its priority step, and inside binding members.
pub(crate) const SEP: &str = "\x06\x16";

/// kombu's `priority_steps`: the buckets a queue is split into, polled in this order.
pub(crate) const PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];

/// kombu's `Channel.priority(n)`: the largest step not above `n`.
pub(crate) fn step_for(kombu: u8) -> u8 {
    PRIORITY_STEPS
        .iter()
        .copied()
        .filter(|s| *s <= kombu.min(9))
        .max()
        .unwrap_or(0)
}

/// Broker key names under kombu's `global_keyprefix`, which is prepended verbatim.
#[derive(Debug, Clone)]
pub(crate) struct BrokerKeys {
    prefix: String,
    db: i64,
}

impl BrokerKeys {
    pub(crate) fn new(prefix: &str, db: i64) -> Self {
        BrokerKeys {
            prefix: prefix.to_owned(),
            db,
        }
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The list holding `queue`'s messages of priority step `step` (`queue` itself for 0).
    pub(crate) fn list(&self, queue: &str, step: u8) -> String {
        if step == 0 {
            format!("{}{queue}", self.prefix)
        } else {
            format!("{}{queue}{SEP}{step}", self.prefix)
        }
    }

    /// The four lists of `queue`, in the order kombu polls them.
    pub(crate) fn lists(&self, queue: &str) -> [String; 4] {
        PRIORITY_STEPS.map(|s| self.list(queue, s))
    }

    /// `_kombu.binding.<exchange>`.
    pub(crate) fn binding(&self, exchange: &str) -> String {
        format!("{}_kombu.binding.{exchange}", self.prefix)
    }

    /// `_kombu.binding_permanent.<exchange>` (kombu 5.7's record of non-expiring bindings).
    pub(crate) fn binding_permanent(&self, exchange: &str) -> String {
        format!("{}_kombu.binding_permanent.{exchange}", self.prefix)
    }

    /// A binding member: `routing_key SEP pattern SEP queue`.
    pub(crate) fn binding_member(routing_key: &str, queue: &str) -> String {
        format!("{routing_key}{SEP}{SEP}{queue}")
    }

    pub(crate) fn unacked(&self) -> String {
        format!("{}unacked", self.prefix)
    }

    pub(crate) fn unacked_index(&self) -> String {
        format!("{}unacked_index", self.prefix)
    }

    pub(crate) fn unacked_mutex(&self) -> String {
        format!("{}unacked_mutex", self.prefix)
    }

    /// The stream of `queue`'s messages of priority step `step` in the native layout:
    /// `celeriac.stream.<queue>`, with kombu's `SEP<step>` suffix for steps above 0.
    pub(crate) fn stream(&self, queue: &str, step: u8) -> String {
        if step == 0 {
            format!("{}celeriac.stream.{queue}", self.prefix)
        } else {
            format!("{}celeriac.stream.{queue}{SEP}{step}", self.prefix)
        }
    }

    /// The four streams of `queue` in the native layout, most urgent first.
    pub(crate) fn streams(&self, queue: &str) -> [String; 4] {
        PRIORITY_STEPS.map(|s| self.stream(queue, s))
    }

    /// Our sorted set of delayed messages of `queue` (score: due time in Unix ms).
    pub(crate) fn delayed(&self, queue: &str) -> String {
        format!("{}celeriac.delayed.{queue}", self.prefix)
    }

    /// Our pub/sub channel on which publishers announce new messages in `queue`, so idle
    /// consumers fetch at once instead of polling. Channels are server-wide, not per database,
    /// so the name carries the database number.
    pub(crate) fn wake(&self, queue: &str) -> String {
        format!("{}celeriac.wake.{}.{queue}", self.prefix, self.db)
    }

    /// The prefix of our per-delivery redelivery counters, `celeriac.redelivered.<tag>`.
    pub(crate) fn redelivered_prefix(&self) -> String {
        format!("{}celeriac.redelivered.", self.prefix)
    }

    /// A `SCAN MATCH` pattern for every binding set.
    pub(crate) fn binding_pattern(&self) -> String {
        format!("{}_kombu.binding.*", glob_escape(&self.prefix))
    }

    /// `_kombu.binding_deadlines` (kombu 5.7): a sorted set of exchange names, each scored
    /// with the time (Unix ms) after which its binding table may be swept, for the tables of
    /// expiring queues (pidbox, reply and event queues).
    pub(crate) fn binding_deadlines(&self) -> String {
        format!("{}_kombu.binding_deadlines", self.prefix)
    }

    /// The pub/sub channel of a message sent to fanout `exchange` with `routing_key`, as
    /// kombu's `_get_publish_topic` names it (`fanout_prefix` and `fanout_patterns` on, their
    /// defaults): `/<db>.<exchange>`, or `/<db>.<exchange>/<routing_key>` when there is a
    /// routing key.
    pub(crate) fn fanout_channel(&self, exchange: &str, routing_key: &str) -> String {
        if routing_key.is_empty() {
            format!("{}/{}.{exchange}", self.prefix, self.db)
        } else {
            format!("{}/{}.{exchange}/{routing_key}", self.prefix, self.db)
        }
    }

    /// The `PSUBSCRIBE` pattern of a queue bound to fanout `exchange` with `binding`: the
    /// channel of [`BrokerKeys::fanout_channel`] for the binding with `#` turned into `*`, as
    /// kombu's `_queue_bind` does. The prefix and the exchange are glob-escaped (kombu sends
    /// them as they are, which differs only for a prefix holding `*?[]\`), and so is the
    /// binding except for its `*` wildcards.
    pub(crate) fn fanout_pattern(&self, exchange: &str, binding: &str) -> String {
        let mut p = glob_escape(&self.fanout_channel(exchange, ""));
        if !binding.is_empty() {
            p.push('/');
            for c in binding.replace('#', "*").chars() {
                if "?[]\\".contains(c) {
                    p.push('\\');
                }
                p.push(c);
            }
        }
        p
    }
}

/// Node `node`'s queue on the control exchange, `<node>.celery.pidbox` (kombu's
/// `Mailbox.get_queue`): on Redis only its binding exists, requests come by pub/sub.
pub(crate) fn pidbox_queue(node: &str) -> String {
    format!("{node}.{CONTROL_EXCHANGE}")
}

/// The reply queue bound under `routing_key`, `<routing_key>.reply.celery.pidbox` (kombu's
/// `Mailbox.get_reply_queue`, whose routing key is the client's oid).
pub(crate) fn reply_queue(routing_key: &str) -> String {
    format!("{routing_key}.{REPLY_EXCHANGE}")
}

/// An event receiver's queue, `celeryev.<id>` (Celery's `EventReceiver`: its
/// `event_queue_prefix`, `celeryev`, and a fresh node id).
pub(crate) fn event_queue(id: &str) -> String {
    format!("{EVENT_EXCHANGE}.{id}")
}

/// Result backend key names under Celery's `global_keyprefix` rule: a `_` is appended unless
/// the prefix ends in one of `: _ - .`.
#[derive(Debug, Clone)]
pub(crate) struct BackendKeys {
    prefix: String,
}

impl BackendKeys {
    pub(crate) fn new(global_keyprefix: &str) -> Self {
        let mut prefix = global_keyprefix.to_owned();
        if prefix.chars().last().is_some_and(|c| !":_-.".contains(c)) {
            prefix.push('_');
        }
        BackendKeys { prefix }
    }

    /// `celery-task-meta-<id>`: also the pub/sub channel of the task's state changes.
    pub(crate) fn task(&self, task_id: &str) -> String {
        format!("{}celery-task-meta-{task_id}", self.prefix)
    }

    /// `celery-taskset-meta-<id>`.
    pub(crate) fn group(&self, group_id: &str) -> String {
        format!("{}celery-taskset-meta-{group_id}", self.prefix)
    }

    /// A counter, named by the caller, under the prefix.
    pub(crate) fn counter(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "*?[]\\".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_map_onto_kombu_buckets() {
        let steps: Vec<u8> = (0..=10).map(step_for).collect();
        assert_eq!(steps, [0, 0, 0, 3, 3, 3, 6, 6, 6, 9, 9]);
        let k = BrokerKeys::new("", 0);
        assert_eq!(
            k.lists("celery"),
            [
                "celery",
                "celery\x06\x163",
                "celery\x06\x166",
                "celery\x06\x169"
            ]
        );
    }

    #[test]
    fn prefixes_follow_kombu_and_celery() {
        let k = BrokerKeys::new("pfx", 2);
        assert_eq!(k.wake("q"), "pfxceleriac.wake.2.q");
        assert_eq!(k.redelivered_prefix(), "pfxceleriac.redelivered.");
        assert_eq!(k.list("q", 0), "pfxq");
        assert_eq!(k.binding("q"), "pfx_kombu.binding.q");
        assert_eq!(k.unacked_mutex(), "pfxunacked_mutex");
        assert_eq!(BackendKeys::new("pfx").task("i"), "pfx_celery-task-meta-i");
        assert_eq!(BackendKeys::new("pfx:").task("i"), "pfx:celery-task-meta-i");
        assert_eq!(BackendKeys::new("").group("g"), "celery-taskset-meta-g");
        assert_eq!(
            BrokerKeys::new("a*b", 0).binding_pattern(),
            "a\\*b_kombu.binding.*"
        );
    }

    #[test]
    fn broadcast_names_follow_kombu() {
        let k = BrokerKeys::new("", 0);
        assert_eq!(k.fanout_channel("celery.pidbox", ""), "/0.celery.pidbox");
        assert_eq!(
            k.fanout_channel("celeryev", "task.multi"),
            "/0.celeryev/task.multi"
        );
        assert_eq!(k.fanout_pattern("celery.pidbox", ""), "/0.celery.pidbox");
        assert_eq!(k.fanout_pattern("celeryev", "#"), "/0.celeryev/*");
        assert_eq!(
            k.fanout_pattern("celeryev", "worker.#"),
            "/0.celeryev/worker.*"
        );
        assert_eq!(k.binding("celery.pidbox"), "_kombu.binding.celery.pidbox");
        assert_eq!(k.binding_deadlines(), "_kombu.binding_deadlines");

        // The prefix goes before every key, channel and pattern; the database is in channels.
        let p = BrokerKeys::new("pfx:", 3);
        assert_eq!(
            p.fanout_channel("celery.pidbox", ""),
            "pfx:/3.celery.pidbox"
        );
        assert_eq!(
            p.fanout_channel("celeryev", "worker.heartbeat"),
            "pfx:/3.celeryev/worker.heartbeat"
        );
        assert_eq!(
            p.fanout_pattern("celery.pidbox", ""),
            "pfx:/3.celery.pidbox"
        );
        assert_eq!(p.fanout_pattern("celeryev", "#"), "pfx:/3.celeryev/*");
        assert_eq!(
            p.binding("reply.celery.pidbox"),
            "pfx:_kombu.binding.reply.celery.pidbox"
        );
        assert_eq!(p.binding_deadlines(), "pfx:_kombu.binding_deadlines");
        assert_eq!(
            p.lists(&reply_queue("oid")),
            [
                "pfx:oid.reply.celery.pidbox",
                "pfx:oid.reply.celery.pidbox\x06\x163",
                "pfx:oid.reply.celery.pidbox\x06\x166",
                "pfx:oid.reply.celery.pidbox\x06\x169"
            ]
        );

        // Glob characters of the prefix are escaped in patterns; a binding's `*` is not.
        let g = BrokerKeys::new("a*[b]?", 1);
        assert_eq!(
            g.fanout_pattern("celeryev", "task.*"),
            "a\\*\\[b\\]\\?/1.celeryev/task.*"
        );
        assert_eq!(
            g.fanout_channel("celeryev", "task.x"),
            "a*[b]?/1.celeryev/task.x"
        );

        // Members are not prefixed: only keys are.
        assert_eq!(
            BrokerKeys::binding_member("", &pidbox_queue("w1@host")),
            "\x06\x16\x06\x16w1@host.celery.pidbox"
        );
        assert_eq!(
            BrokerKeys::binding_member("oid", &reply_queue("oid")),
            "oid\x06\x16\x06\x16oid.reply.celery.pidbox"
        );
        assert_eq!(
            BrokerKeys::binding_member("#", &event_queue("u")),
            "#\x06\x16\x06\x16celeryev.u"
        );
    }
}
