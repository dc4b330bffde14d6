-- Shared by every queue script (prepended by runtime/queue.py). Every script gets the same keys and
-- the same first three arguments, so these helpers mean the same thing everywhere.
local JOB, EVENTS, QUEUE, QUEUED, DEAD, DEADLINES = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local NOW, RETENTION, GROUP = ARGV[1], tonumber(ARGV[2]), ARGV[3]

local function emit(kind, data)
  return redis.call('XADD', EVENTS, '*', 'type', kind, 'data', data, 'ts', NOW)
end

-- The entry leaves the model stream once its job is final: acknowledged and deleted, so the stream
-- only ever holds work still to do and no trim can drop an entry that is pending.
local function retire(entry)
  if entry and entry ~= '' then
    redis.call('XACK', QUEUE, GROUP, entry)
    redis.call('XDEL', QUEUE, entry)
  end
end

local function finalize(job_id, entry, state, kind, data, ack)
  redis.call('HSET', JOB, 'state', state, 'finished_at', NOW)
  redis.call('ZREM', QUEUED, job_id)
  redis.call('ZREM', DEADLINES, job_id)
  local id = emit(kind, data)
  if ack then retire(entry) end
  if RETENTION > 0 then
    redis.call('EXPIRE', JOB, RETENTION)
    redis.call('EXPIRE', EVENTS, RETENTION)
  end
  return id
end

-- Redis runs a script's writes one by one and keeps those done before an error, so a script that
-- hits a key of the wrong type halfway leaves a half-written job. Every script therefore checks the
-- type of each key it may write before its first write; `wrong_types` names the first misfit.
local EXPECTED = {{JOB, 'hash'}, {EVENTS, 'stream'}, {QUEUE, 'stream'}, {QUEUED, 'zset'}, {DEAD, 'stream'},
  {DEADLINES, 'zset'}}
local function wrong_types(first, last)
  for i = first or 1, last or #EXPECTED do
    local key, want = EXPECTED[i][1], EXPECTED[i][2]
    local have = redis.call('TYPE', key)['ok']
    if have ~= 'none' and have ~= want then
      return 'key ' .. key .. ' holds a ' .. have .. ', not a ' .. want
    end
  end
  return nil
end

-- For scripts that must not write at all when a key is foreign: an error reply before any write.
local function guard()
  local misfit = wrong_types()
  if misfit then
    return redis.error_reply('BPKEYTYPE ' .. misfit .. '; nothing was written')
  end
  return nil
end

local FINAL = {SUCCEEDED = true, FAILED = true, CANCELLED = true, EXPIRED = true, DEAD_LETTERED = true}
