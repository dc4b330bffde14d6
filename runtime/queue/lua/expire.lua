-- Expires a queued job whose deadline has passed, before any replica takes it. ARGV[4..]: job_id
-- Returns 1 when the job ended EXPIRED, 0 otherwise (it started, ended, or is not due yet).
local refused = guard()
if refused then return refused end
local h = redis.call('HMGET', JOB, 'state', 'deadline', 'entry')
if h[1] ~= 'QUEUED' then
  redis.call('ZREM', DEADLINES, ARGV[4])
  return 0
end
if not h[2] or h[2] == '' or tonumber(NOW) <= tonumber(h[2]) then
  return 0
end
finalize(ARGV[4], h[3], 'EXPIRED', 'expired', cjson.encode({deadline = tonumber(h[2])}), true)
return 1
