//! The AWS IoT Jobs executions in Redis: the Lua scripts that change them (a version check
//! and its write never interleave with another worker's) and the record they return.

use std::collections::HashMap;

use serde_json::{Value, json};

/// Lua shared by the scripts: the Redis clock, an execution read once into a table, and the
/// step-timer check that turns an IN_PROGRESS execution whose timer ran out into TIMED_OUT
/// before anything reads it. Each script reads an execution with one HGETALL and writes it
/// with one HSET: a call from Lua costs about as much as the command it runs, and these
/// scripts run several times a device.
pub(super) const PRELUDE: &str = r"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- The execution at `key` as a table, or nil when there is none.
local function load(key)
  local r = redis.call('HGETALL', key)
  if #r == 0 then return nil end
  local t = {}
  for i = 1, #r, 2 do t[r[i]] = r[i + 1] end
  return t
end
-- Sets fields of execution `e` (stored at `key`): `kv` alternates names and values.
local function put(key, e, kv)
  for i = 1, #kv, 2 do e[kv[i]] = kv[i + 1] end
  redis.call('HSET', key, unpack(kv))
end
-- The status of execution `e` of `job`, TIMED_OUT (and out of the thing's pending set
-- `zkey`) once its step timer ran out.
local function expire(e, key, zkey, job, now)
  if e.status == 'IN_PROGRESS' then
    local d = tonumber(e.step_deadline or '0')
    if d and d > 0 and now >= d then
      put(key, e, {'status', 'TIMED_OUT', 'updated', now, 'version', tonumber(e.version) + 1})
      redis.call('ZREM', zkey, job)
    end
  end
  return e.status
end
-- The jobs pending for a thing (sorted set `zkey`) with their execution keys, given, never
-- built: job ARGV[from + i] has its execution at KEYS[first + i]. A pending job without a
-- key makes it return nil and the pending jobs joined by ',' (call again with their keys).
local function execs(zkey, from, first)
  local known = {}
  local k = first
  for i = from, #ARGV do
    known[ARGV[i]] = KEYS[k]
    k = k + 1
  end
  local jobs = redis.call('ZRANGE', zkey, 0, -1)
  for _, j in ipairs(jobs) do
    if not known[j] then return nil, table.concat(jobs, ',') end
  end
  return jobs, known
end
-- Ends pending execution `e` of `job` (at `key`) with `status` (fleetbatch's doing, not the
-- device's): out of the thing's pending set `zkey`, kept `retention` seconds.
local function finish(e, key, zkey, job, status, now, retention)
  put(key, e, {'status', status, 'updated', now, 'version', tonumber(e.version) + 1})
  redis.call('ZREM', zkey, job)
  redis.call('EXPIRE', key, retention)
end
";

/// QUEUE: KEYS exec, pending; ARGV job, holder. Creates the execution (QUEUED, version 1)
/// or refreshes its holder; says which, and whether it is the thing's only pending one (its
/// notifications then need nothing more from storage).
pub(super) const QUEUE: &str = r"
local now = now_ms()
local created = false
local e = load(KEYS[1])
if not e then
  e = {}
  put(KEYS[1], e, {'status', 'QUEUED', 'queued', now, 'updated', now,
    'version', 1, 'number', 1, 'holder', ARGV[2]})
  redis.call('ZADD', KEYS[2], now, ARGV[1])
  created = true
else
  expire(e, KEYS[1], KEYS[2], ARGV[1], now)
  if e.holder ~= ARGV[2] then put(KEYS[1], e, {'holder', ARGV[2]}) end
end
local first = redis.call('ZRANGE', KEYS[2], 0, 1)
local alone = #first == 1 and first[1] == ARGV[1]
return cjson.encode({exec = e, now = now, created = created, alone = alone})
";

/// CLAIM: for each request, KEYS its name, ARGV how long the claim lasts (ms); 1 for each
/// request this call claimed, 0 for one claimed before.
pub(super) const CLAIM: &str = r"
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('SET', KEYS[i], '1', 'NX', 'PX', ARGV[i]) and 1 or 0
end
return out
";

/// CHECK: KEYS exec, pending; ARGV job.
pub(super) const CHECK: &str = r"
local now = now_ms()
local e = load(KEYS[1])
if not e then return cjson.encode({now = now}) end
expire(e, KEYS[1], KEYS[2], ARGV[1], now)
return cjson.encode({exec = e, now = now})
";

/// PENDING: KEYS pending, then the execution of each job in ARGV[3..]; ARGV the jobs
/// canceled or aborted (joined by ','), retention seconds, then the pending jobs the caller
/// knows. The thing's QUEUED and IN_PROGRESS executions in queue order, or `unknown` (the
/// pending jobs) when one was not given. QUEUED executions of canceled jobs are withdrawn
/// (CANCELED) first, as START_NEXT does: a device that asks after a cancel is never told of
/// the job.
pub(super) const PENDING: &str = r"
local now = now_ms()
local jobs, known = execs(KEYS[1], 3, 2)
if not jobs then return cjson.encode({unknown = known, now = now}) end
local stopped = {}
for j in string.gmatch(ARGV[1], '[^,]+') do stopped[j] = true end
local out = {}
for _, job in ipairs(jobs) do
  local key = known[job]
  local e = load(key)
  local st = e and expire(e, key, KEYS[1], job, now)
  if st == 'QUEUED' and stopped[job] then
    finish(e, key, KEYS[1], job, 'CANCELED', now, ARGV[2])
  elseif st == 'QUEUED' or st == 'IN_PROGRESS' then
    e.job = job
    table.insert(out, e)
  elseif not st then
    redis.call('ZREM', KEYS[1], job)
  end
end
return cjson.encode({list = out, now = now})
";

/// START_NEXT: KEYS pending, the thing's parked tasks and the due set (parking), then the
/// execution of each job in ARGV[6..]; ARGV details JSON or '', step minutes or '', the jobs
/// canceled or aborted (joined by ','), retention seconds, the caller's clock (ms), then the
/// pending jobs the caller knows (`unknown` as PENDING). QUEUED executions of canceled jobs
/// are withdrawn (CANCELED) before the next one is picked: a device that asks after a cancel
/// is never handed the job. The thing's parked tasks are woken when it has an execution
/// under way (the task of the one started looks again).
pub(super) const START_NEXT: &str = r"
local now = now_ms()
local jobs, known = execs(KEYS[1], 6, 4)
if not jobs then return cjson.encode({unknown = known, now = now}) end
local stopped = {}
for j in string.gmatch(ARGV[3], '[^,]+') do stopped[j] = true end
local ip, q
for _, job in ipairs(jobs) do
  local e = load(known[job])
  local st = e and expire(e, known[job], KEYS[1], job, now)
  if st == 'QUEUED' and stopped[job] then
    finish(e, known[job], KEYS[1], job, 'CANCELED', now, ARGV[4])
  elseif st == 'IN_PROGRESS' and not ip then ip = {job, e}
  elseif st == 'QUEUED' and not q then q = {job, e}
  elseif not st then redis.call('ZREM', KEYS[1], job) end
end
local next = ip or q
if not next then return cjson.encode({now = now}) end
local job, e = next[1], next[2]
if not ip then
  local kv = {'status', 'IN_PROGRESS', 'started', now, 'updated', now,
    'version', tonumber(e.version) + 1}
  if ARGV[1] ~= '' then table.insert(kv, 'details') table.insert(kv, ARGV[1]) end
  if ARGV[2] ~= '' then
    table.insert(kv, 'step_deadline')
    table.insert(kv, now + tonumber(ARGV[2]) * 60000)
  end
  put(known[job], e, kv)
end
e.job = job
wake_device(KEYS[2], KEYS[3], ARGV[5])
return cjson.encode({exec = e, now = now})
";

/// UPDATE: KEYS exec, pending, the thing's parked tasks and the due set (parking); ARGV job,
/// status, details JSON or '', expected version or '', step minutes or '', retention seconds,
/// the caller's clock (ms). A final status says whether the thing has nothing else pending
/// (`alone`). The thing's parked tasks are woken by any change (the task of this execution
/// looks again: it ended, or the device reported progress, perhaps with a new step timer).
pub(super) const UPDATE: &str = r"
local now = now_ms()
local e = load(KEYS[1])
if not e then
  return cjson.encode({code = 'ResourceNotFound', now = now})
end
local st = expire(e, KEYS[1], KEYS[2], ARGV[1], now)
if st ~= 'QUEUED' and st ~= 'IN_PROGRESS' then
  return cjson.encode({code = 'InvalidStateTransition', exec = e, now = now})
end
if ARGV[4] ~= '' and tonumber(ARGV[4]) ~= tonumber(e.version) then
  return cjson.encode({code = 'VersionMismatch', exec = e, now = now})
end
local new = ARGV[2]
wake_device(KEYS[3], KEYS[4], ARGV[7])
local kv = {'status', new, 'updated', now, 'version', tonumber(e.version) + 1}
if ARGV[3] ~= '' then table.insert(kv, 'details') table.insert(kv, ARGV[3]) end
if new == 'IN_PROGRESS' then
  if not e.started then table.insert(kv, 'started') table.insert(kv, now) end
  if ARGV[5] ~= '' then
    table.insert(kv, 'step_deadline')
    table.insert(kv, now + tonumber(ARGV[5]) * 60000)
  end
  put(KEYS[1], e, kv)
  return cjson.encode({exec = e, now = now})
end
put(KEYS[1], e, kv)
if e.step_deadline then
  redis.call('HDEL', KEYS[1], 'step_deadline')
  e.step_deadline = nil
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[6])
return cjson.encode({exec = e, now = now, alone = redis.call('ZCARD', KEYS[2]) == 0})
";

/// FINISH: KEYS exec, pending; ARGV job, status, retention seconds. Ends a pending execution
/// the device did not finish; returns whether it changed anything.
pub(super) const FINISH: &str = r"
local now = now_ms()
local e = load(KEYS[1])
if not e then return 0 end
local st = expire(e, KEYS[1], KEYS[2], ARGV[1], now)
if st ~= 'QUEUED' and st ~= 'IN_PROGRESS' then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return 0
end
finish(e, KEYS[1], KEYS[2], ARGV[1], ARGV[2], now, ARGV[3])
return 1
";

/// One execution as stored (every field a string, as Redis keeps them).
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub(crate) struct Record(pub(super) HashMap<String, Value>);

impl Record {
    pub(super) fn str(&self, k: &str) -> Option<&str> {
        self.0.get(k).and_then(Value::as_str)
    }
    pub(super) fn num(&self, k: &str) -> Option<u64> {
        match self.0.get(k)? {
            Value::String(s) => s.parse().ok(),
            Value::Number(n) => n.as_u64(),
            _ => None,
        }
    }
    pub(super) fn status(&self) -> &str {
        self.str("status").unwrap_or("QUEUED")
    }
    pub(super) fn details(&self) -> Value {
        self.str("details")
            .and_then(|d| serde_json::from_str(d).ok())
            .unwrap_or_else(|| json!({}))
    }
    pub(super) fn is_terminal(&self) -> bool {
        !matches!(self.status(), "QUEUED" | "IN_PROGRESS")
    }
}

/// What the scripts return.
#[derive(Debug, serde::Deserialize)]
pub(super) struct ScriptAnswer {
    #[serde(default)]
    pub(super) code: Option<String>,
    #[serde(default)]
    pub(super) exec: Option<Record>,
    /// cjson encodes an empty list as `{}`: read it as a value.
    #[serde(default)]
    pub(super) list: Value,
    pub(super) now: u64,
    /// QUEUE: the execution was created by this call.
    #[serde(default)]
    pub(super) created: bool,
    /// QUEUE: the execution is the thing's only pending one; UPDATE to a final status: the
    /// thing has no other pending execution. Its notifications are then known without a read.
    #[serde(default)]
    pub(super) alone: bool,
    /// PENDING, START_NEXT: the thing's pending jobs, when the call lacked the key of one.
    #[serde(default)]
    pub(super) unknown: Option<String>,
}
