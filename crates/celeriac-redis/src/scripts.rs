//! The Lua scripts: each runs atomically on the server, so no other client sees half of it.
//!
//! They are loaded once per connection by `EVALSHA` (falling back to `EVAL` after a Redis
//! restart flushed the script cache). None of them re-encodes a message: envelopes are moved
//! byte for byte, and the only JSON they decode is to read a few fields (the fetch avoids even
//! that when a string search is enough; see [`FETCH`]).

use std::sync::LazyLock;

use redis::Script;

/// Moves due delayed messages into their queue's priority lists.
///
/// KEYS: delayed zset, then the four lists (steps 0, 3, 6, 9). ARGV: now (Unix ms), limit,
/// the queue's wake-up channel. Returns `{moved, next due score or false}`. The list is chosen
/// from the envelope's `properties.priority` exactly as kombu's `_put` chooses it; idle
/// consumers are woken when anything moved.
pub(crate) static PROMOTE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  redis.call('ZREM', KEYS[1], m)
  local p = 0
  local ok, env = pcall(cjson.decode, m)
  if ok and type(env) == 'table' and type(env.properties) == 'table' then
    p = tonumber(env.properties.priority) or 0
  end
  local k = 2
  if p >= 9 then k = 5 elseif p >= 6 then k = 4 elseif p >= 3 then k = 3 end
  redis.call('LPUSH', KEYS[k], m)
end
if #due > 0 then redis.call('PUBLISH', ARGV[3], '') end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#due, nxt[2] or false}
"#,
    )
});

/// Lua shared by [`FETCH`] and [`REPAIR`]: kombu's reading of an envelope, by decoding it.
///
/// `decoded(m, tag, rk)` returns the delivery tag and the `unacked` entry `[envelope,
/// exchange, routing_key]` that kombu would record for message `m`: the tag and routing are
/// `properties.delivery_tag` and `properties.delivery_info.{exchange,routing_key}` when they
/// are strings, else `tag` and (`""`, `rk`); the envelope is embedded as JSON when it decodes,
/// as a JSON string otherwise (so the entry is valid JSON whatever was queued).
const DECODED: &str = r#"
local function decoded(m, tag, rk)
  local ex = ''
  local ok, env = pcall(cjson.decode, m)
  if ok and type(env) == 'table' then
    local pr = env.properties
    if type(pr) == 'table' then
      if type(pr.delivery_tag) == 'string' then tag = pr.delivery_tag end
      local d = pr.delivery_info
      if type(d) == 'table' then
        if type(d.exchange) == 'string' then ex = d.exchange end
        if type(d.routing_key) == 'string' then rk = d.routing_key end
      end
    end
    return tag, '[' .. m .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']'
  end
  return tag, '[' .. cjson.encode(m) .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']'
end
"#;

/// Pops up to `want` messages and records each as unacked in the same atomic step, so a
/// consumer killed at any moment loses nothing: a message is either still in its list or in
/// `unacked`, where the visibility-timeout restore finds it. (kombu's BRPOP-then-record leaves
/// a window in which a killed consumer loses the message.)
///
/// Lists are taken priority-major; inside one priority step the queues take turns, one
/// message each, as kombu's round robin serves them. A consumer of one queue takes each
/// step's messages with one counted `RPOP` instead (a call per message costs the server far
/// more than the pop).
///
/// KEYS: unacked, unacked_index, then the lists, step-major (every queue's step-0 list, then
/// every queue's step-3 list, ...). ARGV: lease score, a fallback delivery tag prefix, `want`,
/// the number of queues, the redelivery counter key prefix, the result key prefix (empty: no
/// probe), `1` to watch the lists when all are empty (else `0`), then the queue name of each
/// list. Returns a flat array of `{list index (1-based),
/// message, tag, redelivery count, searched, probed task id, stored result}` per message,
/// empty when every list is empty. The unacked entry is kombu's `[envelope, exchange,
/// routing_key]`, the envelope embedded as JSON when it is JSON.
///
/// **The result probe.** With a result key prefix, the task id is taken from the message's
/// `correlation_id` (Celery sets it to the task id) by the same search, and the stored result
/// under the prefix is returned with the message (nil when there is none): the worker's
/// check for a duplicate or revoked task then needs no round trip of its own. The id is ''
/// when the search could not tell it; the worker compares it with the id it decodes, and
/// reads the state itself when they differ. A failing read (say, a user not allowed to read
/// the result keys) gives '' ids and the fetch goes on.
///
/// **Watching empty lists.** A script cannot block, and a client that pushes without a
/// wake-up (Python's kombu) would otherwise be noticed only by the consumer's next poll. So when
/// it took nothing and is asked to watch, the script reads every list (`EXISTS`): on a
/// connection with client-side key tracking on (RESP3, `CLIENT TRACKING ON NOLOOP`) the server
/// then sends this connection an invalidation as soon as any other client writes one of them.
///
/// **Reading redelivery counters.** Every path that counts a redelivery (our restore, requeue
/// and delayed requeue) also flags the envelope `redelivered` in its `delivery_info`. So a
/// message read by search whose text has no `"redelivered"` was never counted, and its counter
/// is not read (count 0): most messages are first deliveries, and the `MGET` cost the server
/// about 6 µs per fetch. A message read by search that turns out not to be kombu's shape has
/// its counter read by [`REPAIR`]; one read by decoding always has it read here.
///
/// **Reading by search.** Decoding an envelope (`cjson.decode`) was the largest part of this
/// script's time, and all it needs is three strings. So when the message has no backslash and
/// each of `"delivery_tag"`, `"exchange"` and `"routing_key"` occurs exactly once in it,
/// followed by `:` and a string, those strings are taken as kombu's tag and routing without
/// decoding (`searched` = 1), and the entry is built by concatenation (the exchange and
/// routing key must then be printable ASCII without `/`, which cjson would escape, so the
/// bytes are those of the decoding path). Without backslashes, a quoted text followed by `:`
/// can only be a key, and a key of the same name elsewhere (say in `headers`) makes the count
/// 2. What a search cannot tell is whether the message is valid JSON and whether the keys sit
/// in `properties` / `delivery_info`: the consumer checks exactly that when it parses the
/// envelope, as it does anyway (`ConsumerShared::pop`), and has any message that fails
/// re-recorded by the decoding path ([`REPAIR`]) before handing it out. Until then (one round
/// trip) the `unacked` entry of such a message may not be valid JSON; a consumer killed in
/// that instant leaves it for the restore to skip with a warning. No kombu or celeriac client
/// writes such messages.
///
/// **Duplicate tags.** kombu keys `unacked` by the envelope's `delivery_tag`, which every
/// publisher makes unique; a copied envelope (a client or tool that pushes the same text twice)
/// repeats it, and two deliveries under one tag would share one entry: the second `HSET`
/// overwrites the first message, and the first ack removes both, so a consumer killed then
/// loses one. So a message whose tag is taken, by an earlier message of the same fetch or by a
/// delivery held in `unacked`, is recorded under a fresh tag (the fallback prefix and a number
/// past `want`), written into its envelope too when the text shows the old one plainly (one
/// `"delivery_tag"` key, its value a string without escapes): the entry is then exactly what
/// kombu records for a message with that tag, and the copy keeps it when restored. This costs
/// no command in the common case: the index is written with `ZADD NX`, and only when that adds
/// fewer members than messages are the tags looked up (`HEXISTS`) one by one. (A Python worker
/// that takes both copies still loses one: kombu does not look.)
pub(crate) static FETCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{DECODED}{}",
        r#"
local want = tonumber(ARGV[3])
local nq = tonumber(ARGV[4])
local probe = ARGV[6]
local out, ckeys, cat, pkeys, pat = {}, {}, {}, {}, {}
-- Per message: its tag and unacked entry, the list it came from, and (read by search) its
-- exchange and routing key.
local tags, entries, ks, exs, rks = {}, {}, {}, {}, {}
local got = 0
local find = string.find
-- The string value of key `name` (quoted) when it occurs exactly once in m, else nil.
local function only(m, name)
  local i, j = find(m, name, 1, true)
  if not i or find(m, name, j + 1, true) then return nil end
  local _, _, v = find(m, '^%s*:%s*"([^"]*)"', j + 1)
  return v
end
-- m with the value `old` of its one "delivery_tag" key replaced by `new`; nil when the text
-- does not show it plainly (one such key, its value a string without escapes equal to old).
local function retagged(m, old, new)
  local _, j = find(m, '"delivery_tag"', 1, true)
  if not j or find(m, '"delivery_tag"', j + 1, true) then return nil end
  local _, e, v = find(m, '^%s*:%s*"([^"\\]*)"', j + 1)
  if v ~= old then return nil end
  return string.sub(m, 1, e - #v - 1) .. new .. string.sub(m, e)
end
local function record(k, m)
  local tag, entry, searched, id = nil, nil, 0, nil
  if not find(m, '\\', 1, true) then
    local ex, rk
    if probe ~= '' then id = only(m, '"correlation_id"') end
    tag = only(m, '"delivery_tag"')
    if tag then ex = only(m, '"exchange"') end
    if ex then rk = only(m, '"routing_key"') end
    if rk and not find(ex, '[%z\1-\31/\127-\255]') and not find(rk, '[%z\1-\31/\127-\255]') then
      entry = '[' .. m .. ',"' .. ex .. '","' .. rk .. '"]'
      searched = 1
      exs[got + 1], rks[got + 1] = ex, rk
    end
  end
  if not entry then
    -- ARGV[7 + i] names the queue of list KEYS[2 + i].
    tag, entry = decoded(m, ARGV[2] .. '.' .. got, ARGV[k + 5])
  end
  tags[got + 1], entries[got + 1], ks[got + 1] = tag, entry, k
  if searched == 0 or find(m, '"redelivered"', 1, true) then
    ckeys[#ckeys + 1] = ARGV[5] .. tag
    cat[#cat + 1] = got + 1
  end
  out[#out + 1] = k - 2
  out[#out + 1] = m
  out[#out + 1] = tag
  out[#out + 1] = 0
  out[#out + 1] = searched
  out[#out + 1] = ''
  out[#out + 1] = false
  got = got + 1
  if id and id ~= '' then
    pkeys[#pkeys + 1] = probe .. id
    pat[#pat + 1] = got
    out[got * 7 - 1] = id
  end
end
local nsteps = (#KEYS - 2) / nq
local counted = true
for s = 0, nsteps - 1 do
  local live = {}
  for q = 1, nq do live[#live + 1] = 2 + s * nq + q end
  if nq == 1 and counted then
    -- One queue: no turns to take, so one RPOP with a count (Redis 6.2+) takes the step's
    -- messages in one call; an older server answers with an error, and the loop below runs.
    local k = live[1]
    local ms = redis.pcall('RPOP', KEYS[k], want - got)
    if type(ms) == 'table' and ms.err then
      counted = false
    else
      if ms then
        for _, m in ipairs(ms) do record(k, m) end
      end
      live = {}
    end
  end
  while got < want and #live > 0 do
    local still = {}
    for _, k in ipairs(live) do
      if got >= want then break end
      local m = redis.call('RPOP', KEYS[k])
      if m then
        record(k, m)
        still[#still + 1] = k
      end
    end
    live = still
  end
  if got >= want then break end
end
if got > 0 then
  -- A tag already taken, in this batch or by a delivery someone holds, would share its
  -- entry: the later HSET overwrites the earlier message and one ack removes both. Such a
  -- delivery gets a fresh tag, written into its envelope too when the text shows the old one
  -- plainly (kombu keys entries by the envelope's tag). No extra command unless `ZADD NX`
  -- added fewer members than there are messages.
  local function retag(i)
    local new = ARGV[2] .. '.' .. (want + i)
    local m = retagged(out[i * 7 - 5], tags[i], new)
    if m then
      out[i * 7 - 5] = m
      if exs[i] then
        entries[i] = '[' .. m .. ',"' .. exs[i] .. '","' .. rks[i] .. '"]'
      else
        local _
        _, entries[i] = decoded(m, new, ARGV[ks[i] + 5])
      end
    end
    tags[i] = new
    out[i * 7 - 4] = new
  end
  local seen, zargs, hargs = {}, {}, {}
  for i = 1, got do
    if seen[tags[i]] then retag(i) end
    seen[tags[i]] = true
    zargs[2 * i - 1], zargs[2 * i] = ARGV[1], tags[i]
  end
  if redis.call('ZADD', KEYS[2], 'NX', unpack(zargs)) < got then
    for i = 1, got do
      -- Held by a live delivery: a fresh tag. Else the member was added just now, or is a
      -- stale one without an entry (kombu's `_restore` leaves those): it takes our lease.
      if redis.call('HEXISTS', KEYS[1], tags[i]) == 1 then retag(i) end
      redis.call('ZADD', KEYS[2], ARGV[1], tags[i])
    end
  end
  for i = 1, got do hargs[2 * i - 1], hargs[2 * i] = tags[i], entries[i] end
  redis.call('HSET', KEYS[1], unpack(hargs))
end
if #ckeys > 0 then
  local counts = redis.call('MGET', unpack(ckeys))
  for j, i in ipairs(cat) do out[i * 7 - 3] = tonumber(counts[j]) or 0 end
end
if got == 0 and ARGV[7] == '1' then
  redis.call('EXISTS', unpack(KEYS, 3))
end
if #pkeys > 0 then
  local docs = redis.pcall('MGET', unpack(pkeys))
  if type(docs) == 'table' and not docs.err then
    for j, i in ipairs(pat) do out[i * 7] = docs[j] end
  else
    for _, i in ipairs(pat) do out[i * 7 - 1] = '' end
  end
end
return out
"#
    ))
});

/// Re-records a delivery that [`FETCH`] read by search when its envelope turned out not to be
/// kombu's shape: replaces its `unacked` entry and index member by what the decoding path
/// records, under the tag that path chooses (the fallback tag when that one is held by another
/// delivery, as [`FETCH`] does for duplicate tags).
///
/// KEYS: unacked, unacked_index. ARGV: the searched tag, the lease token, the message, a
/// fallback tag, the queue name, the redelivery counter key prefix. Returns `{tag, redelivery
/// count}`, or false when this consumer no longer holds the delivery.
pub(crate) static REPAIR: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{DECODED}{}",
        r#"
local s = redis.call('ZSCORE', KEYS[2], ARGV[1])
if (not s) or tonumber(s) ~= tonumber(ARGV[2]) then return false end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
local tag, entry = decoded(ARGV[3], ARGV[4], ARGV[5])
if tag ~= ARGV[1] and redis.call('HEXISTS', KEYS[1], tag) == 1 then tag = ARGV[4] end
redis.call('ZADD', KEYS[2], ARGV[2], tag)
redis.call('HSET', KEYS[1], tag, entry)
return {tag, tonumber(redis.call('GET', ARGV[6] .. tag)) or 0}
"#
    ))
});

/// Acknowledges deliveries this consumer still holds, many in one call.
///
/// KEYS: unacked, unacked_index. ARGV: the redelivery counter key prefix, then `tag, lease
/// token, counted` triples, `counted` being `1` when the fetch found a redelivery counter for
/// the delivery (else `0`). Returns one 1 (settled) or 0 (the lease was lost) per triple. An
/// ack whose entry is already gone counts as settled, as kombu's does.
///
/// Every command inside a script costs the server several times what the command itself
/// does, so the batch makes at most four calls whatever its size: one `ZMSCORE` for the
/// leases (one `ZSCORE` per tag on a server older than 6.2, which lacks it), then one `ZREM`
/// and `HDEL` for the tags still held, and one `DEL` for their counters when any was found.
/// A counter that appears after the fetch (a restore of this very delivery, whose lease ran
/// out) is left for the restored copy's own ack or its expiry.
pub(crate) static ACK_MANY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = (#ARGV - 1) / 3
local tags = {}
for i = 1, n do tags[i] = ARGV[3 * i - 1] end
local scores = redis.pcall('ZMSCORE', KEYS[2], unpack(tags))
if type(scores) ~= 'table' or scores.err then
  scores = {}
  for i = 1, n do scores[i] = redis.call('ZSCORE', KEYS[2], tags[i]) end
end
local out, held, counters = {}, {}, {}
for i = 1, n do
  local s = scores[i]
  if s and tonumber(s) ~= tonumber(ARGV[3 * i]) then
    out[i] = 0
  else
    out[i] = 1
    held[#held + 1] = tags[i]
    if ARGV[3 * i + 1] == '1' then counters[#counters + 1] = ARGV[1] .. tags[i] end
  end
end
if #held > 0 then
  redis.call('ZREM', KEYS[2], unpack(held))
  redis.call('HDEL', KEYS[1], unpack(held))
end
if #counters > 0 then redis.call('DEL', unpack(counters)) end
return out
"#,
    )
});

/// Settles a delivery if this consumer still holds it.
///
/// KEYS: unacked, unacked_index, target (list or delayed zset; unused for `ack`).
/// ARGV: delivery tag, lease token (the index score this consumer wrote), mode (`ack`,
/// `lpush`, `rpush`, `zadd`), payload, zadd score, the queue's wake-up channel, the
/// delivery's redelivery counter key, its expiry in seconds. Returns 1 when settled, 0 when
/// the lease was lost (the message was restored and perhaps handed to another consumer).
///
/// `ack` deletes the redelivery counter; `lpush` (a requeue) and `zadd` (a delayed requeue)
/// increment it; `rpush` (a message given back unseen) leaves it alone.
pub(crate) static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local s = redis.call('ZSCORE', KEYS[2], ARGV[1])
if s and tonumber(s) ~= tonumber(ARGV[2]) then return 0 end
if (not s) and ARGV[3] ~= 'ack' then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
if ARGV[3] == 'ack' then
  redis.call('DEL', ARGV[7])
  return 1
end
if ARGV[3] == 'lpush' then redis.call('LPUSH', KEYS[3], ARGV[4])
elseif ARGV[3] == 'rpush' then redis.call('RPUSH', KEYS[3], ARGV[4])
elseif ARGV[3] == 'zadd' then redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4]) end
if ARGV[3] ~= 'rpush' then
  redis.call('INCR', ARGV[7])
  redis.call('EXPIRE', ARGV[7], ARGV[8])
end
if ARGV[3] ~= 'zadd' then redis.call('PUBLISH', ARGV[6], '') end
return 1
"#,
    )
});

/// Moves a lease's deadline if this consumer still holds it.
///
/// KEYS: unacked_index. ARGV: tag, old token, new score. Returns 1, or 0 when the lease was
/// lost.
pub(crate) static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not s) or tonumber(s) ~= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1])
return 1
"#,
    )
});

/// kombu's `restore_by_tag` as a compare-and-set: puts an expired delivery back at the
/// consuming end of its list (`RPUSH`), unless it changed since it was read.
///
/// KEYS: unacked, unacked_index, target list. ARGV: tag, the hash value read, ceiling score
/// (now - visibility timeout), payload with the redelivered flags, the queue's wake-up
/// channel, the delivery's redelivery counter key, its expiry in seconds. Returns 1 when
/// restored; the counter is incremented then.
pub(crate) static RESTORE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local s = redis.call('ZSCORE', KEYS[2], ARGV[1])
if s and tonumber(s) > tonumber(ARGV[3]) then return 0 end
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
if v ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[4])
redis.call('INCR', ARGV[6])
redis.call('EXPIRE', ARGV[6], ARGV[7])
redis.call('PUBLISH', ARGV[5], '')
return 1
"#,
    )
});

/// Releases the `unacked_mutex` if we still own it (redis-py's `Lock.release`).
///
/// KEYS: mutex. ARGV: token.
pub(crate) static UNLOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#,
    )
});

/// Stores task meta documents unless the stored state takes precedence, publishing each one
/// written on its key's channel (Celery's `SETEX` + `PUBLISH`, for a batch).
///
/// KEYS: the meta keys, one per document. ARGV: expiry in seconds (0: none), then per key its
/// document and the stored states that must not be replaced by it, as `|STATE|STATE|` (empty:
/// none). Returns one integer per key, 1 when written. A key named twice is checked against
/// what the batch wrote before it, as if the stores had run one by one.
pub(crate) static STORE_MANY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local secs = tonumber(ARGV[1])
local olds = redis.call('MGET', unpack(KEYS))
local written, out = {}, {}
for i = 1, #KEYS do
  local key, doc, blocking = KEYS[i], ARGV[2 * i], ARGV[2 * i + 1]
  local old = written[key] or olds[i]
  local keep = false
  if old and blocking ~= '' then
    local st
    local ok, d = pcall(cjson.decode, old)
    if ok and type(d) == 'table' then st = d.status end
    if type(st) ~= 'string' then st = string.match(old, '"status"%s*:%s*"([^"]*)"') end
    keep = st ~= nil and string.find(blocking, '|' .. st .. '|', 1, true) ~= nil
  end
  if keep then
    out[i] = 0
  else
    if secs > 0 then
      redis.call('SETEX', key, secs, doc)
    else
      redis.call('SET', key, doc)
    end
    redis.call('PUBLISH', key, doc)
    written[key] = doc
    out[i] = 1
  end
end
return out
"#,
    )
});

/// Binds a queue the way kombu 5.7 binds an expiring one (the pidbox, reply and event queues
/// are): adds the binding member to the exchange's table and pushes the exchange's deadline in
/// `_kombu.binding_deadlines` to a time from now by the server's clock, never earlier than it
/// was. kombu's sweep deletes a table whose deadline passed (unless a non-expiring queue is
/// bound to it), so a live binding must be refreshed before then.
///
/// KEYS: the binding table, `_kombu.binding_deadlines`. ARGV: the member, the exchange, the
/// time to live in ms. kombu moves the deadline with `ZADD GT` (Redis 6.2+); this compares
/// the score itself, so older servers work too.
pub(crate) static BIND_EXPIRING: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local now = redis.call('TIME')
local deadline = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[3])
redis.call('SADD', KEYS[1], ARGV[1])
local current = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[2]))
if current == nil or current < deadline then
  redis.call('ZADD', KEYS[2], deadline, ARGV[2])
end
return 1
"#,
    )
});

/// Cluster rate limits ([`celeriac_core::coord::gcra`], the same arithmetic), on the server's
/// clock. KEYS: the key's theoretical arrival time. ARGV: the interval in microseconds.
/// Returns, in microseconds, the admitted caller's delay to its slot (0 or more; the time
/// moved one interval past the slot), else minus the wait.
pub(crate) static COORD_THROTTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if now < tat - interval then return now - (tat - interval) end
local slot = math.max(tat, now)
redis.call('SET', KEYS[1], slot + interval, 'PX', math.ceil((slot + interval - now) / 1000) + 1000)
return slot - now
"#,
    )
});

/// Takes a lock unless another holder has it. KEYS: the lock. ARGV: holder, ttl (ms).
/// Returns the holder after the call.
pub(crate) static COORD_LOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local h = redis.call('GET', KEYS[1])
if h and h ~= ARGV[1] then return h end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
"#,
    )
});

/// Releases a lock its holder holds. KEYS: the lock. ARGV: holder. Returns 1 when released.
pub(crate) static COORD_UNLOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#,
    )
});

/// Takes one of `limit` leased slots: a sorted set of holders scored by lease end (server
/// time, ms). KEYS: the set. ARGV: holder, limit, ttl (ms). Returns 1 when taken or renewed.
pub(crate) static COORD_ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', KEYS[1], tonumber(last[2]))
  return 1
end
return 0
"#,
    )
});

/// Frees a holder's slot. KEYS: the set. ARGV: holder. Returns 1 when it had one.
pub(crate) static COORD_RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new("return redis.call('ZREM', KEYS[1], ARGV[1])"));
