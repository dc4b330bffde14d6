-- Appends an event for a running attempt. ARGV[4..]: attempt, type, data
-- Returns the event id, or false when the attempt is stale.
local refused = guard()
if refused then return refused end
local h = redis.call('HMGET', JOB, 'state', 'attempt')
if h[1] ~= 'RUNNING' or h[2] ~= ARGV[4] then
  return false
end
return emit(ARGV[5], ARGV[6])
