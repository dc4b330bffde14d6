-- A replica was just handed ARGV[5] (the stream entry of job ARGV[4]); decide what happens to it.
-- ARGV[4..]: job_id, entry_id, consumer, max_deliveries, reclaimed ('1' after a lease expired)
-- Returns {'run', attempt, deliveries, spec, last_error} or {outcome, state} for a job that does not run.
local job_id, entry, consumer = ARGV[4], ARGV[5], ARGV[6]
local max_deliveries, reclaimed = tonumber(ARGV[7]), ARGV[8] == '1'
local misfit = wrong_types(3, 6)
if misfit then
  return redis.error_reply('BPKEYTYPE ' .. misfit .. '; nothing was written')
end
misfit = wrong_types(1, 2)
if misfit then
  -- The job's own keys were written by something else: it can never run or be recorded, and a
  -- replica that errored here would meet the same entry again after every restart. Settle it in
  -- the dead-letter stream (the only place left to write) and retire its entry.
  redis.call('XADD', DEAD, 'MAXLEN', '~', '10000', '*', 'job', job_id, 'model', '', 'error',
    cjson.encode({code = 'INTERNAL', message = misfit}), 'deliveries', 0, 'ts', NOW)
  redis.call('ZREM', QUEUED, job_id)
  redis.call('ZREM', DEADLINES, job_id)
  retire(entry)
  return {'corrupt', ''}
end
local h = redis.call('HMGET', JOB, 'state', 'attempt', 'deliveries', 'cancel', 'deadline', 'entry',
  'replica', 'error', 'model')
local state, attempt, deliveries = h[1], tonumber(h[2]), tonumber(h[3])
if not state then
  retire(entry)  -- the record expired or was never written: nothing to run
  return {'gone', ''}
end
if h[6] ~= entry then
  retire(entry)  -- an older entry of a job id that has since been reused
  return {'stale', state}
end
if FINAL[state] then
  -- Written, then the writer died before the ack: the result stands, only the ack was missing.
  retire(entry)
  return {'final', state}
end
local last_error = h[8]
if state == 'RUNNING' and reclaimed then
  last_error = cjson.encode({code = 'WORKER_LOST', message = 'replica ' .. (h[7] or '?') ..
    ' stopped renewing its lease during attempt ' .. attempt})
  redis.call('HSET', JOB, 'error', last_error)
end
if h[4] == '1' then
  finalize(job_id, entry, 'CANCELLED', 'cancelled', cjson.encode({reason = 'cancelled by the client'}), true)
  return {'cancelled', 'CANCELLED'}
end
if deliveries >= max_deliveries then
  local err = last_error or cjson.encode({code = 'WORKER_LOST', message = 'no attempt finished'})
  local decoded = cjson.decode(err)
  decoded.message = decoded.message .. ' (dead-lettered after ' .. deliveries .. ' deliveries)'
  err = cjson.encode(decoded)
  redis.call('HSET', JOB, 'error', err)
  redis.call('XADD', DEAD, 'MAXLEN', '~', '10000', '*', 'job', job_id, 'model', h[9] or '',
    'error', err, 'deliveries', deliveries, 'ts', NOW)
  finalize(job_id, entry, 'DEAD_LETTERED', 'dead_lettered',
    cjson.encode({error = decoded, deliveries = deliveries}), true)
  return {'dead', 'DEAD_LETTERED'}
end
-- Checked after the delivery limit: a job that killed its replica on every attempt is dead-lettered
-- with that error even when its deadline has passed meanwhile, so the operator sees why it never ended.
-- A job that was running when its lease lapsed and is past its deadline ends EXPIRED here too.
if h[5] and h[5] ~= '' and tonumber(NOW) > tonumber(h[5]) then
  finalize(job_id, entry, 'EXPIRED', 'expired', cjson.encode({deadline = tonumber(h[5])}), true)
  return {'expired', 'EXPIRED'}
end
attempt, deliveries = attempt + 1, deliveries + 1
redis.call('HSET', JOB, 'state', 'RUNNING', 'attempt', attempt, 'deliveries', deliveries,
  'replica', consumer, 'started_at', NOW)
redis.call('ZREM', QUEUED, job_id)
redis.call('ZREM', DEADLINES, job_id)
emit('started', cjson.encode({attempt = attempt, replica = consumer}))
return {'run', attempt, deliveries, redis.call('HGET', JOB, 'spec'), last_error or ''}
