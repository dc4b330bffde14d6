-- Writes one chunk of finished spans for TraceStoreProcessor (runtime/tracing/store.py): one call
-- per chunk, because packing a handful of commands per span was most of the writer thread's CPU.
-- The trace store needs one Redis, not a cluster (as the queue's scripts do): the keys span slots.
--
-- KEYS: every key the script writes (recent, spans, job and recent:model keys), declared for Redis;
--   the script builds the same names from the prefix.
-- ARGV: prefix, trim bound ('(' .. seconds, exclusive), then per span seven values: trace id, span
--   id, span JSON, expire-at ms, start seconds, job id or '', model or ''.
local prefix, horizon = ARGV[1], ARGV[2]
local recent = prefix .. ':recent'

-- Expire-at and start values are kept as the strings Python sent, so Redis parses what Python wrote.
local function later(best, key, at)
  local prev = best[key]
  if prev == nil or tonumber(at) > tonumber(prev) then best[key] = at end
end

local function earlier(index, trace_id, start)
  local prev = index[trace_id]
  if prev == nil or tonumber(start) < tonumber(prev) then index[trace_id] = start end
end

-- NX gives a fresh key its expiry and GT only ever extends it, so spans may arrive in any order and
-- in any batch. Called once per key, with the latest expire-at among the chunk's spans of that key.
local function expire(key, at)
  redis.call('PEXPIREAT', key, at, 'NX')
  redis.call('PEXPIREAT', key, at, 'GT')
end

local fields, spans_at = {}, {}  -- spans key -> {span id, JSON, ...}; spans key -> expire-at
local jobs, jobs_at = {}, {}     -- job key -> trace id; job key -> expire-at
local firsts = {[recent] = {}}   -- index key -> trace id -> earliest start

for i = 3, #ARGV, 7 do
  local trace_id, at, start, job, model = ARGV[i], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]
  local key = prefix .. ':spans:' .. trace_id
  local f = fields[key]
  if f == nil then
    f = {}
    fields[key] = f
  end
  f[#f + 1] = ARGV[i + 1]
  f[#f + 1] = ARGV[i + 2]
  later(spans_at, key, at)
  if job ~= '' then
    local job_key = prefix .. ':job:' .. job
    jobs[job_key] = trace_id  -- the batch's last span wins, as one SET per span in order did
    later(jobs_at, job_key, at)
  end
  earlier(firsts[recent], trace_id, start)
  if model ~= '' then
    local index = prefix .. ':recent:' .. model
    if firsts[index] == nil then firsts[index] = {} end
    earlier(firsts[index], trace_id, start)
  end
end

for key, f in pairs(fields) do
  redis.call('HSET', key, unpack(f))
  expire(key, spans_at[key])
end
for key, trace_id in pairs(jobs) do
  -- KEEPTTL: a plain SET would drop the expiry, letting a later batch's earlier end shorten it.
  redis.call('SET', key, trace_id, 'KEEPTTL')
  expire(key, jobs_at[key])
end
for index, starts in pairs(firsts) do
  -- LT: a trace is indexed by its earliest span, whichever order its spans arrive in.
  local args = {'ZADD', index, 'LT'}
  for trace_id, start in pairs(starts) do
    args[#args + 1] = start
    args[#args + 1] = trace_id
  end
  if #args > 3 then redis.call(unpack(args)) end
  redis.call('ZREMRANGEBYSCORE', index, '-inf', horizon)
end
