-- Redis Cluster only: one quota subject's live-task set and token bucket, in
-- a slot of their own (on one node the begin script checks quotas itself).
-- KEYS: live rate; ARGV: now op task_id max_offset limit burst refill_ms
--   conc_kind rate_kind conc_retry_ms
-- op 'reserve': counts the task (scored by its max lifetime) and spends a
-- token, or answers {'exhausted', kind, retry_after_ms, now}; a task already
-- counted (a retried begin) is answered 'ok' and spends nothing.
-- op 'refund': undoes a reservation of a begin that was then refused: the
-- task no longer counts and, with a bucket (burst, refill_ms), its token
-- comes back, so a refused begin spends nothing.
local now = clock()
local function refilled(burst, refill)
  local b = redis.call('HMGET', KEYS[2], 't', 'ts')
  local t, ts = tonumber(b[1]), tonumber(b[2])
  if not t or not ts then return nil end
  if now > ts then t = math.min(burst, t + (now - ts) / refill) end
  return t
end
if ARGV[2] == 'refund' then
  redis.call('ZREM', KEYS[1], ARGV[3])
  if ARGV[6] ~= '' then
    local burst, refill = tonumber(ARGV[6]), tonumber(ARGV[7])
    local t = refilled(burst, refill)
    if t then redis.call('HSET', KEYS[2], 't', string.format('%.17g', math.min(burst, t + 1)), 'ts', n(now)) end
  end
  return {'ok', n(now)}
end
local limit = ARGV[5]
if limit ~= '' then
  if redis.call('ZSCORE', KEYS[1], ARGV[3]) then return {'ok', n(now)} end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', n(now))
  if redis.call('ZCARD', KEYS[1]) >= tonumber(limit) then
    return {'exhausted', ARGV[8], ARGV[10], n(now)}
  end
end
if ARGV[6] ~= '' then
  local burst, refill = tonumber(ARGV[6]), tonumber(ARGV[7])
  local t = refilled(burst, refill) or burst
  if t < 1 then
    return {'exhausted', ARGV[9], n(math.max(1, math.ceil((1 - t) * refill))), n(now)}
  end
  redis.call('HSET', KEYS[2], 't', string.format('%.17g', t - 1), 'ts', n(now))
  -- A bucket left alone refills to full: expiring it then changes nothing.
  redis.call('PEXPIRE', KEYS[2], math.ceil(refill * burst) + 1000)
end
if limit ~= '' then redis.call('ZADD', KEYS[1], n(now + tonumber(ARGV[4])), ARGV[3]) end
return {'ok', n(now)}
