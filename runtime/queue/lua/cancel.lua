-- Cancels a job. ARGV[4..]: job_id
-- Returns {'missing'}, {'final', state}, {'cancelled'} (was queued: final now) or {'requested'}
-- (running: its replica stops it, or the next delivery does if the replica is gone).
local refused = guard()
if refused then return refused end
local h = redis.call('HMGET', JOB, 'state', 'entry')
if not h[1] then return {'missing', ''} end
if FINAL[h[1]] then return {'final', h[1]} end
redis.call('HSET', JOB, 'cancel', '1')
if h[1] == 'QUEUED' then
  finalize(ARGV[4], h[2], 'CANCELLED', 'cancelled', cjson.encode({reason = 'cancelled by the client'}), true)
  return {'cancelled', 'CANCELLED'}
end
return {'requested', h[1]}
