//! The redelivery counter, batched fetching and the wake-up channel.

use std::time::Duration;

use celeriac_core::{Broker, ConsumeOptions, PublishOptions, Requeue};
use celeriac_redis::RedisOptions;
use futures_util::StreamExt;
use redis::AsyncCommands;

use crate::util::{self, broker_with, msg, next_within, raw};

const WAIT: Duration = Duration::from_secs(20);

/// A message whose lease runs out N times (its consumer vanishes each time) reports N
/// redeliveries, then N + 1 after a requeue; the counter is deleted with the message's ack.
/// This is what lets the worker's `max_redeliveries` count past one on Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_restored_n_times_reports_n() {
    if !util::redis_up() {
        return;
    }
    let q = "redeliver";
    let (p, broker, m) = one_queued(q).await;
    let lease = Duration::from_millis(300);
    let queues = [q.to_owned()];
    for n in 0..3u32 {
        // A consumer takes it and dies without settling: the lease runs out and any consumer
        // restores it.
        let mut c = broker
            .consume(&queues, ConsumeOptions::new(1).lease(lease))
            .await
            .unwrap();
        let d = next_within(&mut c, WAIT).await;
        assert_eq!(d.message.as_ref().unwrap().id(), m.id());
        assert_eq!(d.redeliveries, n, "delivery {n}");
        assert_eq!(d.redelivered(), n > 0);
        drop(d);
        drop(c);
    }
    let mut c = broker
        .consume(&queues, ConsumeOptions::new(1).lease(lease))
        .await
        .unwrap();
    let d = next_within(&mut c, WAIT).await;
    assert_eq!(d.redeliveries, 3);
    let tag = delivery_tag(&p, q).await;
    let counter = format!("{p}celeriac.redelivered.{tag}");
    let mut r = raw().await;
    let stored: i64 = r.get(&counter).await.unwrap();
    assert_eq!(stored, 3);
    let ttl: i64 = r.ttl(&counter).await.unwrap();
    assert!(ttl > 0, "the counter expires (ttl {ttl})");

    d.reject(Requeue::Now).await.unwrap();
    let d = next_within(&mut c, WAIT).await;
    assert_eq!(d.redeliveries, 4, "a requeue counts too");
    d.ack().await.unwrap();
    let exists: bool = r.exists(&counter).await.unwrap();
    assert!(!exists, "ack deletes the counter");
}

/// Only a message flagged `redelivered` has its counter read: every path that counts a
/// redelivery flags the message, so a counter under an unflagged message's tag is stale. It
/// is neither read (the delivery reports 0) nor deleted by the ack (it expires), which spares
/// the server a counter read on every fetch and a delete on every ack of a first delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unflagged_message_does_not_read_a_counter() {
    if !util::redis_up() {
        return;
    }
    let q = "unflagged";
    let (p, broker, m) = one_queued(q).await;
    let mut r = raw().await;
    // Whichever of the queue's priority lists it went to.
    let lists: Vec<String> = r.keys(format!("{p}{q}*")).await.unwrap();
    assert_eq!(lists.len(), 1, "{lists:?}");
    let queued: String = r.lindex(&lists[0], 0).await.unwrap();
    let env: serde_json::Value = serde_json::from_str(&queued).unwrap();
    let tag = env["properties"]["delivery_tag"]
        .as_str()
        .unwrap()
        .to_owned();
    let counter = format!("{p}celeriac.redelivered.{tag}");
    let _: () = r.set_ex(&counter, 5, 600).await.unwrap();

    let queues = [q.to_owned()];
    let mut c = broker
        .consume(&queues, ConsumeOptions::new(1))
        .await
        .unwrap();
    let d = next_within(&mut c, WAIT).await;
    assert_eq!(d.message.as_ref().unwrap().id(), m.id());
    assert_eq!(d.redeliveries, 0, "a first delivery reads no counter");
    d.ack().await.unwrap();
    let stats = broker.stats(q).await.unwrap();
    assert_eq!((stats.ready, stats.unacked), (0, 0), "the ack settled it");
    let left: i64 = r.get(&counter).await.unwrap();
    assert_eq!(left, 5, "the ack of a first delivery deletes no counter");
}

/// A message whose envelope was pushed twice (so both copies carry one `delivery_tag`) is
/// delivered twice, and no copy is lost when its consumer dies: each delivery is recorded in
/// `unacked` under a tag of its own (the later copy re-tagged, in its envelope too, as kombu
/// keys entries by it), so neither overwrites the other's entry nor is removed by the other's
/// ack. Both ways a copy meets its twin: in one fetch, and in a later fetch while the first is
/// held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_delivery_tags_lose_no_message() {
    // See: issue 23 (B)
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default()).await;
    let q = "twins";
    broker.declare(q).await.unwrap();
    let queues = [q.to_owned()];
    let lease = ConsumeOptions::new(1).lease(Duration::from_millis(300));
    let mut r = raw().await;
    let push_twice = |env: String| {
        let list = format!("{p}{q}");
        async move {
            let mut r = raw().await;
            let _: () = r.lpush(&list, vec![env.clone(), env]).await.unwrap();
        }
    };

    // One fetch takes both; the consumer dies with both unsettled: both come back, once each.
    // Twice: an envelope the fetch reads by search, and one with an escaped character in a
    // header, which it decodes.
    for escaped in [false, true] {
        let (id, env) = unannounced_envelopes(&p, q, 1).await.remove(0);
        let env = if escaped {
            let mut v: serde_json::Value = serde_json::from_str(&env).unwrap();
            v["headers"]["note"] = "a \"quoted\" word".into();
            serde_json::to_string(&v).unwrap()
        } else {
            env
        };
        push_twice(env).await;
        let mut c = broker
            .consume(
                &queues,
                ConsumeOptions::new(2).lease(Duration::from_millis(300)),
            )
            .await
            .unwrap();
        let held = [
            next_within(&mut c, WAIT).await,
            next_within(&mut c, WAIT).await,
        ];
        for d in &held {
            assert_eq!(d.message.as_ref().unwrap().id(), id, "escaped: {escaped}");
        }
        entries_keyed_by_their_own_tags(&p, 2).await;
        drop(held);
        drop(c);
        let mut c = broker
            .consume(&queues, ConsumeOptions::new(2))
            .await
            .unwrap();
        for n in 0..2 {
            let d = next_within(&mut c, WAIT).await;
            assert_eq!(d.message.as_ref().unwrap().id(), id, "copy {n}");
            assert_eq!(d.redeliveries, 1, "copy {n}: restored once");
            d.ack().await.unwrap();
        }
        drop(c);
        let stats = broker.stats(q).await.unwrap();
        assert_eq!((stats.ready, stats.unacked), (0, 0), "both copies settled");
    }

    // Two fetches: the second copy is taken while the first is held; the first is acked, the
    // second's consumer dies: the second comes back.
    let (id, env) = unannounced_envelopes(&p, q, 1).await.remove(0);
    push_twice(env).await;
    let mut a = broker.consume(&queues, lease.clone()).await.unwrap();
    let first = next_within(&mut a, WAIT).await;
    let mut b = broker.consume(&queues, lease.clone()).await.unwrap();
    let second = next_within(&mut b, WAIT).await;
    for d in [&first, &second] {
        assert_eq!(d.message.as_ref().unwrap().id(), id);
    }
    entries_keyed_by_their_own_tags(&p, 2).await;
    first.ack().await.unwrap();
    drop(second);
    drop((a, b));
    let mut c = broker
        .consume(&queues, ConsumeOptions::new(1))
        .await
        .unwrap();
    let d = next_within(&mut c, WAIT).await;
    assert_eq!(d.message.as_ref().unwrap().id(), id);
    assert!(d.redelivered(), "the second copy, restored");
    d.ack().await.unwrap();
    let stats = broker.stats(q).await.unwrap();
    assert_eq!((stats.ready, stats.unacked), (0, 0), "both copies settled");
    let left: i64 = r.hlen(format!("{p}unacked")).await.unwrap();
    assert_eq!(left, 0);
}

/// `unacked` under prefix `p` holds `n` entries, each indexed and keyed by its envelope's
/// `delivery_tag`, as kombu records them.
async fn entries_keyed_by_their_own_tags(p: &str, n: usize) {
    let mut r = raw().await;
    let entries: Vec<(String, String)> = r.hgetall(format!("{p}unacked")).await.unwrap();
    let index: Vec<String> = r.zrange(format!("{p}unacked_index"), 0, -1).await.unwrap();
    assert_eq!(entries.len(), n, "one entry per delivery: {entries:?}");
    assert_eq!(index.len(), n, "one index member per delivery: {index:?}");
    for (tag, entry) in &entries {
        let v: serde_json::Value = serde_json::from_str(entry).unwrap();
        assert_eq!(v[0]["properties"]["delivery_tag"], tag.as_str(), "{entry}");
        assert!(index.contains(tag), "{tag} is indexed");
    }
}

/// A broker under a fresh prefix with queue `q` declared and one message published to it:
/// the prefix, the broker and the message.
async fn one_queued(q: &str) -> (String, celeriac_redis::RedisBroker, celeriac_core::Message) {
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default()).await;
    broker.declare(q).await.unwrap();
    let m = msg();
    broker
        .publish(q, &m, PublishOptions::default())
        .await
        .unwrap();
    (p, broker, m)
}

/// The delivery tag of the one message recorded in `unacked` under prefix `p`.
async fn delivery_tag(p: &str, _queue: &str) -> String {
    let mut r = raw().await;
    let tags: Vec<String> = r.hkeys(format!("{p}unacked")).await.unwrap();
    assert_eq!(tags.len(), 1, "{tags:?}");
    tags[0].clone()
}

/// One fetch takes up to the free prefetch; messages fetched and not handed out go back to
/// their queue when the consumer is dropped, at once (not after the visibility timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_fetch_holds_the_prefetch_and_gives_back_what_was_not_handed_out() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default()).await;
    let q = "batch";
    broker.declare(q).await.unwrap();
    let sent: Vec<_> = (0..20).map(|_| msg()).collect();
    let batch: Vec<_> = sent
        .iter()
        .map(|m| (m.clone(), PublishOptions::default()))
        .collect();
    broker.publish_batch(q, &batch).await.unwrap();
    let queues = [q.to_owned()];

    let mut c = broker
        .consume(&queues, ConsumeOptions::new(8))
        .await
        .unwrap();
    let first = next_within(&mut c, WAIT).await;
    assert_eq!(first.message.as_ref().unwrap().id(), sent[0].id());
    let stats = broker.stats(q).await.unwrap();
    assert_eq!(
        (stats.ready, stats.unacked),
        (12, 8),
        "one fetch leases the whole free prefetch"
    );
    first.ack().await.unwrap();
    drop(c);

    // The 7 buffered come back at once (the visibility timeout is an hour), with the 12 never
    // fetched. (Their order against the others is not kept: they are given back one by one.)
    let mut c = broker
        .consume(&queues, ConsumeOptions::new(4))
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 1..sent.len() {
        let d = next_within(&mut c, WAIT).await;
        got.push(d.message.as_ref().unwrap().id().to_owned());
        assert_eq!(
            d.redeliveries, 0,
            "a message given back unseen is no redelivery"
        );
        d.ack().await.unwrap();
    }
    got.sort();
    let mut want: Vec<String> = sent[1..].iter().map(|m| m.id().to_owned()).collect();
    want.sort();
    assert_eq!(got, want);
    let stats = broker.stats(q).await.unwrap();
    assert_eq!((stats.ready, stats.unacked), (0, 0));
}

/// Publishing announces the message on the queue's wake-up channel (what idle consumers wait
/// on instead of polling); a delayed publish does not, until it is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_wakes_the_queue_channel() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default()).await;
    let q = "wake";
    let client = redis::Client::open(util::URL).unwrap();
    let mut sub = client.get_async_pubsub().await.unwrap();
    sub.subscribe(format!("{p}celeriac.wake.0.{q}"))
        .await
        .unwrap();
    let mut stream = sub.on_message();

    broker
        .publish(q, &msg(), PublishOptions::default())
        .await
        .unwrap();
    let note = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("a wake-up in time")
        .expect("subscribed");
    assert_eq!(note.get_channel_name(), format!("{p}celeriac.wake.0.{q}"));

    let batch = vec![(msg(), PublishOptions::default()); 3];
    broker.publish_batch(q, &batch).await.unwrap();
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("a wake-up for the batch")
        .expect("subscribed");
}

/// An idle consumer, subscribed to its wake-up channel, takes a message pushed afterwards
/// (published with the wake-up) and one pushed by a client that does not announce it, like
/// Python's (found by the slow fallback poll).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_consumer_takes_announced_and_unannounced_messages() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default()).await;
    let q = "idle";
    let queues = [q.to_owned()];
    let mut c = broker
        .consume(&queues, ConsumeOptions::new(4))
        .await
        .unwrap();
    let pending = tokio::spawn(async move {
        let d = next_within(&mut c, WAIT).await;
        let id = d.message.as_ref().unwrap().id().to_owned();
        d.ack().await.unwrap();
        let d = next_within(&mut c, WAIT).await;
        let id2 = d.message.as_ref().unwrap().id().to_owned();
        d.ack().await.unwrap();
        (id, id2)
    });
    // Let the consumer go idle first (not an assertion on timing: either way it must work).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = msg();
    broker
        .publish(q, &m, PublishOptions::default())
        .await
        .unwrap();
    // An envelope pushed directly, with no wake-up.
    let (silent, env) = unannounced_envelopes(&p, q, 1).await.remove(0);
    let mut r = raw().await;
    let _: () = r.lpush(format!("{p}{q}\x06\x169"), env).await.unwrap();
    let (a, b) = pending.await.unwrap();
    assert_eq!(a, m.id());
    assert_eq!(b, silent);
}

/// Envelopes as our publisher writes them, taken out again before anyone consumes them: what
/// a client that pushes without a wake-up (Python's kombu) would push.
async fn unannounced_envelopes(p: &str, q: &str, n: usize) -> Vec<(String, String)> {
    let staging = broker_with(&format!("{p}staging:"), RedisOptions::default()).await;
    let mut r = raw().await;
    let mut out = Vec::new();
    for _ in 0..n {
        let m = msg();
        staging
            .publish(q, &m, PublishOptions::default())
            .await
            .unwrap();
        let env: Vec<u8> = r.rpop(format!("{p}staging:{q}"), None).await.unwrap();
        out.push((m.id().to_owned(), String::from_utf8(env).unwrap()));
    }
    out
}

/// An idle consumer is woken by a push that no wake-up announces as soon as it lands, in its
/// bare list or another priority list (the server's key tracking tells it), rather than by its
/// fallback poll a second after its first, empty fetch. Each round has a new consumer that has
/// fetched nothing yet (servers before 7.2 would otherwise track its lists because of its
/// earlier fetches), and pushes at most 0.4 s after that fetch: the poll cannot find it within
/// 150 ms. One slow round is forgiven, for a busy machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unannounced_pushes_wake_an_idle_consumer_at_once() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default()).await;
    let q = "watched";
    broker.declare(q).await.unwrap();
    let envelopes = unannounced_envelopes(&p, q, 6).await;
    let mut r = raw().await;
    let mut took = Vec::new();
    for (i, (id, env)) in envelopes.into_iter().enumerate() {
        let mut c = broker
            .consume(&[q.to_owned()], ConsumeOptions::new(4))
            .await
            .unwrap();
        let waiting = tokio::spawn(async move {
            let d = next_within(&mut c, WAIT).await;
            let at = std::time::Instant::now();
            let id = d.message.as_ref().unwrap().id().to_owned();
            d.ack().await.unwrap();
            (id, at)
        });
        // The consumer goes idle, and the pushes land at different points of its poll.
        tokio::time::sleep(Duration::from_millis(60 + 53 * i as u64)).await;
        let list = if i % 2 == 0 {
            format!("{p}{q}")
        } else {
            format!("{p}{q}\x06\x166")
        };
        let pushed = std::time::Instant::now();
        let _: () = r.lpush(&list, env).await.unwrap();
        let (got, at) = waiting.await.unwrap();
        assert_eq!(got, id);
        took.push(at.duration_since(pushed));
    }
    let prompt = took
        .iter()
        .filter(|t| **t < Duration::from_millis(150))
        .count();
    assert!(prompt >= 5, "woken by the push, not the poll: {took:?}");
}

/// A server that refuses key tracking (here: an ACL user without `CLIENT`) still serves
/// consumers: announced messages by the wake-up channel, unannounced ones by the poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_refusing_key_tracking_still_serves_consumers() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let user = format!("celeriac-test-notrack-{}", std::process::id());
    let mut r = raw().await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(">secret")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .arg("-client")
        .query_async(&mut r)
        .await
        .unwrap();
    let url = format!("redis://{user}:secret@127.0.0.1:6379/0");
    let broker = celeriac_redis::RedisBroker::connect_with(
        &url,
        RedisOptions::default().global_keyprefix(&p),
    )
    .await
    .unwrap();
    let q = "untracked";
    broker.declare(q).await.unwrap();
    let mut c = broker
        .consume(&[q.to_owned()], ConsumeOptions::new(4))
        .await
        .unwrap();
    let m = msg();
    broker
        .publish(q, &m, PublishOptions::default())
        .await
        .unwrap();
    let d = next_within(&mut c, WAIT).await;
    assert_eq!(d.message.as_ref().unwrap().id(), m.id());
    d.ack().await.unwrap();
    let (id, env) = unannounced_envelopes(&p, q, 1).await.remove(0);
    let _: () = r.lpush(format!("{p}{q}"), env).await.unwrap();
    let d = next_within(&mut c, WAIT).await;
    assert_eq!(d.message.as_ref().unwrap().id(), id);
    d.ack().await.unwrap();
    let _: () = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut r)
        .await
        .unwrap();
}

/// A message whose envelope names no routing key is recorded under the queue it was taken
/// from, whichever of a consumer's queues and lists that is (kombu restores it there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_messages_are_recorded_under_their_own_queue() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default()).await;
    let queues = ["first", "second"];
    let mut r = raw().await;
    let mut pushed = 0;
    for q in queues {
        broker.declare(q).await.unwrap();
        // The bare list (kombu's priority 0) and the lowest priority list.
        for list in [format!("{p}{q}"), format!("{p}{q}\x06\x169")] {
            let _: () = r
                .lpush(&list, format!("not json, from {list}"))
                .await
                .unwrap();
            pushed += 1;
        }
    }
    let mut c = broker
        .consume(&queues.map(str::to_owned), ConsumeOptions::new(8))
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..pushed {
        held.push(next_within(&mut c, WAIT).await);
    }
    let entries: Vec<(String, String)> = r.hgetall(format!("{p}unacked")).await.unwrap();
    assert_eq!(entries.len(), pushed, "{entries:?}");
    for (_, entry) in &entries {
        let v: serde_json::Value = serde_json::from_str(entry).unwrap();
        let from = v[0]
            .as_str()
            .unwrap()
            .strip_prefix("not json, from ")
            .unwrap();
        let queue = from.strip_prefix(&p).unwrap().split('\x06').next().unwrap();
        assert_eq!(v[2], queue, "{entry}");
    }
    for d in held {
        d.ack().await.unwrap();
    }
}

/// The fetch script reads kombu envelopes without decoding them when it can, and falls back to
/// decoding (or to storing the bytes as a JSON string) otherwise: every `unacked` entry it
/// writes is kombu's `[envelope, exchange, routing_key]`, valid JSON, whatever was queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_unacked_entry_is_valid_json_whatever_was_queued() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default()).await;
    let q = "shapes";
    broker
        .publish(q, &msg(), PublishOptions::default())
        .await
        .unwrap();
    let mut r = raw().await;
    let list = format!("{p}{q}\x06\x169");
    for odd in [
        r#"not json at all"#,
        r#"{"properties": {"delivery_tag": "t\"1", "delivery_info": {"exchange": "", "routing_key": "shapes"}}}"#,
        r#"{"properties": {"delivery_tag": "t2", "delivery_info": {"exchange": "ex", "routing_key": "rk"}}"#,
        r#"{"headers": {"x": "\"properties\": {\"delivery_tag\": \"fake\""}, "properties": {"delivery_tag": "t3", "delivery_info": {"exchange": "", "routing_key": "shapes"}}}"#,
    ] {
        let _: () = r.lpush(&list, odd).await.unwrap();
    }
    let mut c = broker
        .consume(&[q.to_owned()], ConsumeOptions::new(8))
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(next_within(&mut c, WAIT).await);
    }
    let entries: Vec<(String, String)> = r.hgetall(format!("{p}unacked")).await.unwrap();
    assert_eq!(entries.len(), 5, "{entries:?}");
    let tags: std::collections::HashSet<&str> = entries.iter().map(|(t, _)| t.as_str()).collect();
    for want in ["t\"1", "t3"] {
        assert!(tags.contains(want), "{want} in {tags:?}");
    }
    for (tag, entry) in &entries {
        let v: serde_json::Value = serde_json::from_str(entry)
            .unwrap_or_else(|e| panic!("entry of {tag} is not JSON ({e}): {entry}"));
        let a = v.as_array().expect("an array");
        assert_eq!(a.len(), 3, "{entry}");
        assert_eq!(a[1], "", "{entry}");
        assert_eq!(a[2], q, "{entry}");
    }
    for d in held {
        d.ack().await.unwrap();
    }
}

/// The fetch script's string search records what decoding records (kombu's reading:
/// `properties.delivery_tag`, `properties.delivery_info.{exchange,routing_key}`), whatever
/// else the envelope holds: keys of the same names in `headers`, keys present only in
/// `headers`, escaped characters, characters that cjson escapes. Each case is compared with
/// what kombu would record: the tag, and `[envelope, exchange, routing_key]` as JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn searched_and_decoded_envelopes_record_what_kombu_reads() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default()).await;
    let q = "lookalike";
    broker.declare(q).await.unwrap();
    // A real envelope as our publisher writes it, as the template.
    let (_, template) = unannounced_envelopes(&p, q, 1).await.remove(0);
    let template: serde_json::Value = serde_json::from_str(&template).unwrap();
    let mut r = raw().await;
    let variant = |case: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = template.clone();
        v["headers"]["case"] = case.into();
        edit(&mut v);
        v
    };
    let props = |v: &mut serde_json::Value, tag: &str, ex: &str, rk: &str| {
        v["properties"]["delivery_tag"] = tag.into();
        v["properties"]["delivery_info"]["exchange"] = ex.into();
        v["properties"]["delivery_info"]["routing_key"] = rk.into();
    };
    // (case, envelope, the tag kombu reads or None for "none: a fresh one", exchange, rk)
    let cases: Vec<(&str, serde_json::Value, Option<&str>, &str, &str)> = vec![
        (
            "plain",
            variant("plain", &|v| props(v, "tag-plain", "", q)),
            Some("tag-plain"),
            "",
            q,
        ),
        (
            "twins in headers",
            variant("twins in headers", &|v| {
                props(v, "tag-twins", "ex", "rk");
                v["headers"]["delivery_tag"] = "header-tag".into();
                v["headers"]["exchange"] = "header-ex".into();
                v["headers"]["routing_key"] = "header-rk".into();
            }),
            Some("tag-twins"),
            "ex",
            "rk",
        ),
        (
            "only in headers",
            variant("only in headers", &|v| {
                let pr = v["properties"].as_object_mut().unwrap();
                pr.remove("delivery_tag");
                pr["delivery_info"]
                    .as_object_mut()
                    .unwrap()
                    .remove("exchange");
                v["headers"]["delivery_tag"] = "header-only-tag".into();
                v["headers"]["exchange"] = "header-only-ex".into();
            }),
            None,
            "",
            q,
        ),
        (
            "escaped tag",
            variant("escaped tag", &|v| props(v, "t\"é\\2", "", q)),
            Some("t\"é\\2"),
            "",
            q,
        ),
        (
            "slash",
            variant("slash", &|v| props(v, "tag-slash", "a/b", "c/d")),
            Some("tag-slash"),
            "a/b",
            "c/d",
        ),
        (
            "properties is an array",
            variant("properties is an array", &|v| {
                v["headers"]["delivery_tag"] = "array-tag".into();
                v["headers"]["delivery_info"] =
                    serde_json::json!({"exchange": "", "routing_key": "x"});
                v["properties"] = serde_json::json!([0, 9]);
            }),
            None,
            "",
            q,
        ),
    ];
    let list = format!("{p}{q}\x06\x169");
    let mut pushed = std::collections::HashMap::new();
    for (case, env, ..) in &cases {
        let bytes = serde_json::to_vec(env).unwrap();
        let _: () = r.lpush(&list, &bytes).await.unwrap();
        pushed.insert(case.to_string(), bytes);
    }
    let mut c = broker
        .consume(&[q.to_owned()], ConsumeOptions::new(8))
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..cases.len() {
        held.push(next_within(&mut c, WAIT).await);
    }
    let entries: Vec<(String, Vec<u8>)> = r.hgetall(format!("{p}unacked")).await.unwrap();
    let index: Vec<String> = r.zrange(format!("{p}unacked_index"), 0, -1).await.unwrap();
    assert_eq!(entries.len(), cases.len(), "one entry per message");
    assert_eq!(index.len(), cases.len(), "one index member per message");
    let mut tags = std::collections::HashSet::new();
    for (tag, entry) in &entries {
        assert!(index.contains(tag), "{tag} is indexed");
        tags.insert(tag.clone());
        let v: serde_json::Value = serde_json::from_slice(entry)
            .unwrap_or_else(|e| panic!("entry of {tag} is not JSON ({e})"));
        let case = v[0]["headers"]["case"].as_str().unwrap().to_owned();
        let (_, env, want_tag, ex, rk) = cases.iter().find(|c| c.0 == case).unwrap();
        assert_eq!(v, serde_json::json!([env, ex, rk]), "{case}");
        match want_tag {
            Some(t) => assert_eq!(tag, t, "{case}"),
            None => assert!(
                !tag.starts_with("header") && !tag.starts_with("array"),
                "{case}: a fresh tag, not {tag}"
            ),
        }
        // The envelope is embedded byte for byte, as kombu's reader finds it.
        let bytes = &pushed[&case];
        assert!(
            entry.windows(bytes.len()).any(|w| w == bytes.as_slice()),
            "{case}: envelope embedded verbatim"
        );
    }
    // Each delivery settles under the tag that was recorded.
    for d in held {
        d.ack().await.unwrap();
    }
    let left: i64 = r.hlen(format!("{p}unacked")).await.unwrap();
    let left_index: i64 = r.zcard(format!("{p}unacked_index")).await.unwrap();
    assert_eq!(
        (left, left_index),
        (0, 0),
        "every ack found its entry: {tags:?}"
    );
}

/// Acks share one script call; in a batch, an ack from a consumer whose lease ran out (the
/// message was restored and handed to another) leaves the new holder's delivery alone, while
/// an ack of a delivery still held settles it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_acks_settles_held_deliveries_and_spares_lost_leases() {
    if !util::redis_up() {
        return;
    }
    let p = util::prefix();
    let broker = broker_with(&p, RedisOptions::default()).await;
    let (qa, qb) = ("lost-lease", "held-lease");
    for q in [qa, qb] {
        broker.declare(q).await.unwrap();
        broker
            .publish(q, &msg(), PublishOptions::default())
            .await
            .unwrap();
    }
    let mut short = broker
        .consume(
            &[qa.to_owned()],
            ConsumeOptions::new(1).lease(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    let mut long = broker
        .consume(&[qb.to_owned()], ConsumeOptions::new(1))
        .await
        .unwrap();
    let lost = next_within(&mut short, WAIT).await;
    let held = next_within(&mut long, WAIT).await;
    // Another consumer restores the expired one and takes it.
    let mut other = broker
        .consume(&[qa.to_owned()], ConsumeOptions::new(1))
        .await
        .unwrap();
    let again = next_within(&mut other, WAIT).await;
    assert_eq!(again.redeliveries, 1);

    let (r1, r2) = tokio::join!(lost.ack(), held.ack());
    r1.unwrap();
    r2.unwrap();
    let mut r = raw().await;
    let tags: Vec<String> = r.hkeys(format!("{p}unacked")).await.unwrap();
    let index: Vec<String> = r.zrange(format!("{p}unacked_index"), 0, -1).await.unwrap();
    assert_eq!(tags.len(), 1, "only the redelivered one is held: {tags:?}");
    assert_eq!(index, tags);
    let counter = format!("{p}celeriac.redelivered.{}", tags[0]);
    let count: i64 = r.get(&counter).await.unwrap();
    assert_eq!(count, 1, "the holder's redelivery counter stays");

    again.ack().await.unwrap();
    let left: i64 = r.hlen(format!("{p}unacked")).await.unwrap();
    assert_eq!(left, 0);
    let exists: bool = r.exists(&counter).await.unwrap();
    assert!(!exists, "the holder's ack deletes the counter");
    drop((short, long, other));
}
