//! Restoring: kombu's `restore_visible`, which puts deliveries whose lease ran out back in
//! their lists.
//!
//! Any consumer runs it once a second (see [`super::consume`]); the format and the rule are
//! kombu's, so a Python worker restores what a dead celeriac worker held and the other way
//! round. A restored message is flagged `redelivered` and its redelivery counter incremented.

use celeriac_core::Result;
use celeriac_core::protocol::new_id;
use serde_json::Value;

use super::{BATCH_LIMIT, Info, Inner, mark_redelivered, now_secs};
use crate::keys::{SEP, step_for};
use crate::scripts;

/// kombu's `unacked_mutex_expire`, in ms.
const MUTEX_EXPIRE_MS: u64 = 300_000;

/// kombu's `restore_visible`: puts deliveries whose lease ran out back in their lists.
///
/// Looks first without the lock (cheap and usually empty); takes `unacked_mutex` only when
/// there is work, as kombu holds it while it restores.
pub(super) async fn restore_visible(broker: &Inner) -> Result<u64> {
    let keys = &broker.keys;
    let ceil = now_secs() - broker.visibility_timeout.as_secs_f64();
    let ceil_text = format!("{ceil:.6}");
    let expired: Vec<String> = broker
        .redis
        .run("look for expired redis deliveries", |mut c| {
            let ceil_text = &ceil_text;
            async move {
                redis::cmd("ZREVRANGEBYSCORE")
                    .arg(keys.unacked_index())
                    .arg(ceil_text)
                    .arg(0)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(BATCH_LIMIT)
                    .query_async(&mut c)
                    .await
            }
        })
        .await?;
    if expired.is_empty() {
        return Ok(0);
    }
    let token = new_id();
    let locked: bool = broker
        .redis
        .run("take the unacked_mutex", |mut c| {
            let token = &token;
            async move {
                let r: Option<String> = redis::cmd("SET")
                    .arg(keys.unacked_mutex())
                    .arg(token)
                    .arg("NX")
                    .arg("PX")
                    .arg(MUTEX_EXPIRE_MS)
                    .query_async(&mut c)
                    .await?;
                Ok(r.is_some())
            }
        })
        .await?;
    if !locked {
        return Ok(0);
    }
    let mut restored = 0;
    let mut result = Ok(());
    for tag in expired {
        match restore_by_tag(broker, &tag, &ceil_text).await {
            Ok(true) => restored += 1,
            Ok(false) => {}
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let _ = broker
        .redis
        .run("release the unacked_mutex", |mut c| {
            let token = &token;
            async move {
                scripts::UNLOCK
                    .key(keys.unacked_mutex())
                    .arg(token)
                    .invoke_async::<i64>(&mut c)
                    .await
            }
        })
        .await;
    if restored > 0 {
        tracing::info!(
            restored,
            "restored redis deliveries whose visibility timeout ran out"
        );
    }
    result.map(|()| restored)
}

async fn restore_by_tag(broker: &Inner, tag: &str, ceil: &str) -> Result<bool> {
    let keys = &broker.keys;
    let value: Option<Vec<u8>> = broker
        .redis
        .run("read an unacked redis delivery", |mut c| async move {
            redis::cmd("HGET")
                .arg(keys.unacked())
                .arg(tag)
                .query_async(&mut c)
                .await
        })
        .await?;
    let (target, queue, payload, value) = match value {
        None => (keys.list("", 0), String::new(), Vec::new(), Vec::new()),
        Some(v) => match serde_json::from_slice::<(Value, String, String)>(&v) {
            Ok((env, exchange, routing_key)) => {
                let raw = serde_json::to_vec(&env)?;
                let queue = lookup(broker, &exchange, &routing_key).await?;
                let info = Info::read(&raw);
                let target = keys.list(&queue, step_for(info.kombu_priority));
                (target, queue, mark_redelivered(&raw), v)
            }
            Err(e) => {
                tracing::warn!(tag, error = %e, "unacked redis entry is not [envelope, exchange, routing_key]; left in place");
                return Ok(false);
            }
        },
    };
    let (wake, counter) = (
        keys.wake(&queue),
        format!("{}{tag}", keys.redelivered_prefix()),
    );
    let done: i64 = broker
        .redis
        .run("restore an unacked redis delivery", |mut c| {
            let (target, payload, value) = (&target, &payload, &value);
            let (wake, counter) = (&wake, &counter);
            async move {
                scripts::RESTORE
                    .key(keys.unacked())
                    .key(keys.unacked_index())
                    .key(target)
                    .arg(tag)
                    .arg(value)
                    .arg(ceil)
                    .arg(payload)
                    .arg(wake)
                    .arg(counter)
                    .arg(broker.counter_ttl)
                    .invoke_async(&mut c)
                    .await
            }
        })
        .await?;
    Ok(done == 1)
}

/// kombu's `_lookup`: the queue a message published to `exchange` with `routing_key` goes to.
///
/// The anonymous exchange routes by queue name; a named one through its binding set (direct
/// match on the routing key), falling back to the routing key.
async fn lookup(broker: &Inner, exchange: &str, routing_key: &str) -> Result<String> {
    if exchange.is_empty() {
        return Ok(routing_key.to_owned());
    }
    let key = broker.keys.binding(exchange);
    let key = &key;
    let members: Vec<String> = broker
        .redis
        .run("read a kombu binding table", |mut c| async move {
            redis::cmd("SMEMBERS").arg(key).query_async(&mut c).await
        })
        .await?;
    for m in members {
        let parts: Vec<&str> = m.split(SEP).collect();
        if parts.len() == 3 && parts[0] == routing_key {
            return Ok(parts[2].to_owned());
        }
    }
    Ok(routing_key.to_owned())
}
