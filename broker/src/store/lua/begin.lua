-- KEYS: task creds cexp cgr deadlines revlog revoked, then the quota keys:
--   live_id live_class rate_id rate_class, then kill killpfx
-- ARGV: now rec ttl_offset max_offset retention task_id cap maxlen,
--   id_max class_max id_burst id_refill_ms class_burst class_refill_ms ('' = no limit),
--   approval validity ms ('' = no approval), owner template class tenant,
--   credentials from 20
-- The quota keys are declared but carry no hash tag (they are per identity and
-- per class, not per task): fine on one Redis node; Redis Cluster (issue 11)
-- needs them in a slot of their own, so the quota step moves out of this script.
local now = clock()
local f = fields(KEYS[1])
-- A replay is answered whatever the quotas: it begins nothing.
if f[1] then return reply('existing', f, now) end
local k = killed(KEYS[12], KEYS[13], ARGV[16], ARGV[17], ARGV[18], ARGV[19])
if k then return {'killed', k[1], k[2], n(now), k[3]} end
local max = now + tonumber(ARGV[4])
-- Live tasks: sets of task ids scored by max lifetime, pruned here, so a lost
-- removal frees its slot at the latest at that task's max lifetime.
local function full(key, limit)
  if limit == '' then return false end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', n(now))
  return redis.call('ZCARD', key) >= tonumber(limit)
end
if full(KEYS[8], ARGV[9]) then return {'exhausted', 'identity_tasks', '__CONC__', n(now)} end
if full(KEYS[9], ARGV[10]) then return {'exhausted', 'class_tasks', '__CONC__', n(now)} end
-- Token buckets: {t = tokens, ts = last update}; checked both before spending either.
local function tokens(key, burst, refill)
  if burst == '' then return nil end
  burst = tonumber(burst); refill = tonumber(refill)
  local b = redis.call('HMGET', key, 't', 'ts')
  local t, ts = tonumber(b[1]), tonumber(b[2])
  if not t or not ts then return burst end
  if now > ts then t = math.min(burst, t + (now - ts) / refill) end
  return t
end
local rate = {{KEYS[10], ARGV[11], ARGV[12], 'identity_rate'}, {KEYS[11], ARGV[13], ARGV[14], 'class_rate'}}
local spend = {}
for _, r in ipairs(rate) do
  local t = tokens(r[1], r[2], r[3])
  if t then
    if t < 1 then
      return {'exhausted', r[4], n(math.max(1, math.ceil((1 - t) * tonumber(r[3])))), n(now)}
    end
    table.insert(spend, {r[1], t - 1, r[2], r[3]})
  end
end
local t = decoded(ARGV[2])
local u = unaudited(t)
if u then return u end
for _, s in ipairs(spend) do
  redis.call('HSET', s[1], 't', string.format('%.17g', s[2]), 'ts', n(now))
  -- A bucket left alone refills to full: expiring it then changes nothing.
  redis.call('PEXPIRE', s[1], math.ceil(tonumber(s[3]) * tonumber(s[4])) + 1000)
end
if ARGV[9] ~= '' then redis.call('ZADD', KEYS[8], n(max), ARGV[6]) end
if ARGV[10] ~= '' then redis.call('ZADD', KEYS[9], n(max), ARGV[6]) end
local deadline = math.min(now + tonumber(ARGV[3]), max)
redis.call('HSET', KEYS[1], 'rec', ARGV[2], 'state', 'active', 'deadline', n(deadline), 'max', n(max), 'renewed', n(now))
live_add(t, 1, 0)
local appr, appr_dl = false, false
if ARGV[15] ~= '' then
  appr, appr_dl = 'pending', n(now + tonumber(ARGV[15]))
  redis.call('HSET', KEYS[1], 'appr', appr, 'appr_dl', appr_dl)
end
local id = ARGV[6]
local policies = ''
if type(t.policies) == 'table' then policies = table.concat(t.policies, ',') end
audit(now, id, t, 'task.declared', {'by', str(t.owner)})
audit(now, id, t, 'policy.decided', {'decision', 'allow', 'policies', policies})
audit(now, id, t, 'task.begun', {'deadline', n(deadline), 'max_deadline', n(max), 'approval', appr or ''})
if appr then
  local grants = ''
  if type(t.approval) == 'table' and type(t.approval.grants) == 'table' then grants = table.concat(t.approval.grants, ',') end
  audit(now, id, t, 'approval.requested', {'grants', grants, 'expires_at', appr_dl})
end
local rotated = {}
add_credentials(KEYS[2], KEYS[3], KEYS[4], KEYS[6], KEYS[7], 20, tonumber(ARGV[7]), now, ARGV[8], rotated, id, t)
redis.call('ZADD', KEYS[5], n(deadline), ARGV[6])
local at = n(max + tonumber(ARGV[5]))
for k = 1, 4 do redis.call('PEXPIREAT', KEYS[k], at) end
return reply('created', {ARGV[2], 'active', n(deadline), false, false, n(max), appr, appr_dl, false, false, false}, now)
