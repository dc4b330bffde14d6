-- Writes a running attempt's final state once. ARGV[4..]: job_id, attempt, state, event_type,
-- event_data, result_json ('' for none), error_json ('' for none), ack ('1' to retire the entry now),
-- then any number of (event_type, event_data) pairs: the run's last events, written before the final one
-- Returns the final event id, or false when the attempt is stale or the job already final.
local refused = guard()
if refused then return refused end
local h = redis.call('HMGET', JOB, 'state', 'attempt', 'entry')
if h[1] ~= 'RUNNING' or h[2] ~= ARGV[5] then
  return false
end
if ARGV[9] ~= '' then redis.call('HSET', JOB, 'result', ARGV[9]) end
if ARGV[10] ~= '' then
  redis.call('HSET', JOB, 'error', ARGV[10])
else
  redis.call('HDEL', JOB, 'error')
end
for i = 12, #ARGV - 1, 2 do emit(ARGV[i], ARGV[i + 1]) end
return finalize(ARGV[4], h[3], ARGV[6], ARGV[7], ARGV[8], ARGV[11] == '1')
