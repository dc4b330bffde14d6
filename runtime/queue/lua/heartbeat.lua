-- Renews the lease of a running attempt. ARGV[4..]: attempt, consumer, entry_id
-- Returns 0 when the attempt is no longer the job's current run (superseded, finished, gone),
-- 1 when renewed, 2 when renewed and the client asked to cancel.
local refused = guard()
if refused then return refused end
local h = redis.call('HMGET', JOB, 'state', 'attempt', 'cancel')
if h[1] ~= 'RUNNING' or h[2] ~= ARGV[4] then
  return 0
end
-- XCLAIM to ourselves with min-idle 0 resets the entry's idle time, which is what XAUTOCLAIM reads.
redis.call('XCLAIM', QUEUE, GROUP, ARGV[5], 0, ARGV[6], 'JUSTID')
if h[3] == '1' then return 2 end
return 1
