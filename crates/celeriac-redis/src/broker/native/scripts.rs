//! The native layout's Lua scripts. Each runs atomically; none re-encodes a message.
//!
//! An entry of a queue's stream has the fields `m` (kombu's JSON envelope, as the list layout
//! stores it), `i` (the task id, for the result probe; may be empty) and, for a message
//! delivered before, `r` (how many times). Consumers are named `c.<id>.<lease in ms>`: the
//! name carries the lease, so that any consumer's sweep knows when another's deliveries are
//! due back.

use std::sync::LazyLock;

use redis::Script;

/// Lua shared by the scripts that read entries: `fields(f)` returns the `m`, `i` and `r` of
/// an entry's flat field list.
const FIELDS: &str = r#"
local function fields(f)
  local m, i, r = '', '', 0
  if type(f) ~= 'table' then return nil end
  for j = 1, #f, 2 do
    local k = f[j]
    if k == 'm' then m = f[j + 1] elseif k == 'i' then i = f[j + 1]
    elseif k == 'r' then r = tonumber(f[j + 1]) or 0 end
  end
  return m, i, r
end
"#;

/// Takes up to `want` entries: first those whose lease ran out (any consumer's, claimed for
/// this one with `XCLAIM`, which counts a delivery), then new ones (`XREADGROUP >`), stream by
/// stream in the order given (priority-major), creating the group where it is missing.
///
/// KEYS: the streams. ARGV: group, this consumer's name, want, the result key prefix (empty:
/// no probe), `1` to sweep expired leases first (else `0`), the sweep's batch limit.
/// Returns a flat array of `{stream index (1-based), entry id, message, redeliveries before,
/// delivery count, task id, stored result}` per entry.
///
/// **The sweep.** For each stream, `XINFO CONSUMERS` lists the group's consumers; for each
/// with pending entries, the lease in its name gives `XPENDING … IDLE <lease>` the entries
/// idle longer than that, and `XCLAIM … <lease>` takes them (the same minimum idle time, so
/// an entry whose lease was just extended stays). An entry deleted meanwhile is dropped from
/// the pending list by `XCLAIM` itself. A consumer with nothing pending and idle for a minute
/// is deleted, so dead consumers do not pile up. The redeliveries of a claimed entry are its
/// `r` plus its delivery count before the claim.
pub(crate) static FETCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{FIELDS}{}",
        r#"
local group, me, want, probe = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local out, pkeys, pat = {}, {}, {}
local got = 0
local function emit(k, id, f, before, count)
  local m, i, r = fields(f)
  if not m then return end
  got = got + 1
  out[#out + 1] = k
  out[#out + 1] = id
  out[#out + 1] = m
  out[#out + 1] = r + before
  out[#out + 1] = count
  out[#out + 1] = i
  out[#out + 1] = false
  if probe ~= '' and i ~= '' then
    pkeys[#pkeys + 1] = probe .. i
    pat[#pat + 1] = got
  end
end
if ARGV[5] == '1' then
  local limit = math.min(want, tonumber(ARGV[6]))
  for k = 1, #KEYS do
    if got >= limit then break end
    local cs = redis.pcall('XINFO', 'CONSUMERS', KEYS[k], group)
    if type(cs) == 'table' and not cs.err then
      for _, c in ipairs(cs) do
        if got >= limit then break end
        local name, pending, idle = nil, 0, 0
        for j = 1, #c, 2 do
          if c[j] == 'name' then name = c[j + 1]
          elseif c[j] == 'pending' then pending = c[j + 1]
          elseif c[j] == 'idle' then idle = c[j + 1] end
        end
        local lease = name and tonumber(string.match(name, '%.(%d+)$'))
        if pending == 0 then
          if name and name ~= me and idle > 60000 then
            redis.call('XGROUP', 'DELCONSUMER', KEYS[k], group, name)
          end
        elseif lease then
          local p = redis.call('XPENDING', KEYS[k], group, 'IDLE', lease, '-', '+', limit - got, name)
          if #p > 0 then
            local ids, counts = {}, {}
            for _, e in ipairs(p) do
              ids[#ids + 1] = e[1]
              counts[e[1]] = e[4]
            end
            local claimed = redis.call('XCLAIM', KEYS[k], group, me, lease, unpack(ids))
            for _, e in ipairs(claimed) do
              if type(e) == 'table' and counts[e[1]] then
                emit(k, e[1], e[2], counts[e[1]], counts[e[1]] + 1)
              end
            end
          end
        end
      end
    end
  end
end
for k = 1, #KEYS do
  if got >= want then break end
  -- An empty stream (most priority streams, most of the time) costs an XLEN, not a read.
  local r = false
  if redis.call('XLEN', KEYS[k]) > 0 then
    r = redis.pcall('XREADGROUP', 'GROUP', group, me, 'COUNT', want - got, 'STREAMS', KEYS[k], '>')
    if type(r) == 'table' and r.err then
      if not string.find(r.err, 'NOGROUP', 1, true) then return redis.error_reply(r.err) end
      redis.call('XGROUP', 'CREATE', KEYS[k], group, '0', 'MKSTREAM')
      r = redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', want - got, 'STREAMS', KEYS[k], '>')
    end
  elseif redis.call('EXISTS', KEYS[k]) == 0 then
    -- Deleted behind our back: the blocking read needs the stream and its group.
    redis.call('XGROUP', 'CREATE', KEYS[k], group, '0', 'MKSTREAM')
  end
  if r then
    for _, e in ipairs(r[1][2]) do emit(k, e[1], e[2], 0, 1) end
  end
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

/// Lua shared by the fenced scripts: `held()` is true while the entry ARGV[2] of stream
/// KEYS[1] is pending for a consumer whose name starts with ARGV[3] and has the delivery
/// count ARGV[4], that is while this consumer still holds the delivery it fetched.
const HELD: &str = r#"
local function held()
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
  if #p == 0 then return false end
  local owner, count = p[1][2], p[1][4]
  return string.sub(owner, 1, #ARGV[3]) == ARGV[3] and count == tonumber(ARGV[4])
end
"#;

/// Settles one delivery this consumer still holds: drops it, or puts it back.
///
/// KEYS: the entry's stream, the target (a stream for `xadd`, the delayed set for `zadd`).
/// ARGV: group, entry id, the consumer's name prefix `c.<id>.`, the delivery count fetched,
/// mode (`drop`, `xadd`, `zadd`), message, task id, redeliveries to record, due time (Unix
/// ms, for `zadd`). Returns 1, or 0 when the lease was lost (nothing done).
///
/// `xadd` appends a copy (at the back, as kombu's requeue) carrying the redeliveries; `zadd`
/// parks it in the delayed set as `<redeliveries>|<message>`, which the promotion reads.
pub(crate) static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{HELD}{}",
        r#"
if not held() then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if ARGV[5] == 'xadd' then
  if ARGV[8] == '0' then
    redis.call('XADD', KEYS[2], '*', 'm', ARGV[6], 'i', ARGV[7])
  else
    redis.call('XADD', KEYS[2], '*', 'm', ARGV[6], 'i', ARGV[7], 'r', ARGV[8])
  end
elseif ARGV[5] == 'zadd' then
  redis.call('ZADD', KEYS[2], ARGV[9], ARGV[8] .. '|' .. ARGV[6])
end
return 1
"#
    ))
});

/// Extends the lease of a delivery this consumer still holds, by moving the entry to this
/// consumer's name for the new lease with its idle time reset (`XCLAIM … JUSTID`, which
/// counts no delivery).
///
/// KEYS: the entry's stream. ARGV: group, entry id, name prefix, delivery count, the new
/// name (`c.<id>.<lease ms>`). Returns 1, or 0 when the lease was lost.
pub(crate) static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{HELD}{}",
        r#"
if not held() then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[5], 0, ARGV[2], 'JUSTID')
return 1
"#
    ))
});

/// Moves due delayed messages of a native queue into its streams.
///
/// KEYS: the delayed set, then the four streams (steps 0, 3, 6, 9). ARGV: now (Unix ms),
/// limit. A member is a message, or `<redeliveries>|<message>` for a requeued one. The stream
/// is chosen by the envelope's `properties.priority` as the list layout chooses its list.
/// Returns `{moved, next due score or false}`.
pub(crate) static PROMOTE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
  local m, r = member, '0'
  local bar = string.find(member, '|', 1, true)
  if string.sub(member, 1, 1) ~= '{' and bar then
    r = string.sub(member, 1, bar - 1)
    m = string.sub(member, bar + 1)
  end
  local p, id = 0, ''
  local ok, env = pcall(cjson.decode, m)
  if ok and type(env) == 'table' and type(env.properties) == 'table' then
    p = tonumber(env.properties.priority) or 0
    if type(env.properties.correlation_id) == 'string' then id = env.properties.correlation_id end
  end
  local k = 2
  if p >= 9 then k = 5 elseif p >= 6 then k = 4 elseif p >= 3 then k = 3 end
  if r == '0' then
    redis.call('XADD', KEYS[k], '*', 'm', m, 'i', id)
  else
    redis.call('XADD', KEYS[k], '*', 'm', m, 'i', id, 'r', r)
  end
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#due, nxt[2] or false}
"#,
    )
});

/// Counts a native queue: `{ready, unacked}` over its streams, where ready is the length
/// less the pending entries (acked entries are deleted).
///
/// KEYS: the streams. ARGV: group.
pub(crate) static COUNT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local ready, unacked = 0, 0
for k = 1, #KEYS do
  local n = redis.call('XLEN', KEYS[k])
  if n > 0 then
    local p = redis.pcall('XPENDING', KEYS[k], ARGV[1])
    local pending = 0
    if type(p) == 'table' and not p.err then pending = tonumber(p[1]) or 0 end
    unacked = unacked + pending
    ready = ready + math.max(0, n - pending)
  end
end
return {ready, unacked}
"#,
    )
});

/// Deletes the ready entries of a native queue (those after the group's last delivered id;
/// every entry when there is no group yet) and its delayed set; returns how many.
///
/// KEYS: the delayed set, then the streams. ARGV: group.
pub(crate) static PURGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = redis.call('ZCARD', KEYS[1])
redis.call('DEL', KEYS[1])
for k = 2, #KEYS do
  local last = '0-0'
  local gs = redis.pcall('XINFO', 'GROUPS', KEYS[k])
  if type(gs) == 'table' and not gs.err then
    for _, g in ipairs(gs) do
      local name, id = nil, nil
      for j = 1, #g, 2 do
        if g[j] == 'name' then name = g[j + 1] elseif g[j] == 'last-delivered-id' then id = g[j + 1] end
      end
      if name == ARGV[1] and id then last = id end
    end
  end
  while true do
    local es = redis.call('XRANGE', KEYS[k], '(' .. last, '+', 'COUNT', 1000)
    if #es == 0 then break end
    local ids = {}
    for _, e in ipairs(es) do ids[#ids + 1] = e[1] end
    redis.call('XDEL', KEYS[k], unpack(ids))
    n = n + #ids
    last = ids[#ids]
  end
end
return n
"#,
    )
});

/// Creates the consumer group of each stream (and the stream) where missing.
///
/// KEYS: the streams. ARGV: group.
pub(crate) static ENSURE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
for k = 1, #KEYS do
  redis.pcall('XGROUP', 'CREATE', KEYS[k], ARGV[1], '0', 'MKSTREAM')
end
return #KEYS
"#,
    )
});
