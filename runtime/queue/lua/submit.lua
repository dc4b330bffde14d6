-- ARGV[4..]: job_id, spec_json, model, submitted_at, deadline ('' for none), max_queue, queued_data,
-- fingerprint (a hash of the request)
-- Returns {1, 'QUEUED'} when created, {0, state} when the id already exists with the same request,
-- {-2, state} when it exists with another request, {-1, depth} when full.
local refused = guard()
if refused then return refused end
local job_id = ARGV[4]
local existing = redis.call('HGET', JOB, 'state')
if existing then
  local known = redis.call('HGET', JOB, 'fingerprint')
  -- A job written before fingerprints existed has none: it is taken to be the same request.
  if known and known ~= ARGV[11] then return {-2, existing} end
  return {0, existing}
end
local depth = redis.call('ZCARD', QUEUED)
if depth >= tonumber(ARGV[9]) then
  return {-1, tostring(depth)}
end
if redis.call('EXISTS', QUEUE) == 0 then
  -- '0', not '$': a group made after the first XADD must still see it.
  redis.pcall('XGROUP', 'CREATE', QUEUE, GROUP, '0', 'MKSTREAM')
end
local entry = redis.call('XADD', QUEUE, '*', 'job', job_id)
redis.call('HSET', JOB, 'spec', ARGV[5], 'model', ARGV[6], 'state', 'QUEUED', 'attempt', 0,
  'deliveries', 0, 'submitted_at', ARGV[7], 'deadline', ARGV[8], 'entry', entry, 'fingerprint', ARGV[11])
redis.call('ZADD', QUEUED, ARGV[7], job_id)
if ARGV[8] ~= '' then redis.call('ZADD', DEADLINES, ARGV[8], job_id) end
emit('queued', ARGV[10])
return {1, 'QUEUED'}
