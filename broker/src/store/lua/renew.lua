-- KEYS: task creds cexp cgr deadlines revlog revoked
-- ARGV: now extend_by min_interval ('' for a begin replay) cap maxlen task_id
--   redeem ('1': the credentials include approved grants), credentials from 8
local now = clock()
local f = fields(KEYS[1])
if not f[1] then return {'missing'} end
if f[2] ~= 'active' or tonumber(f[3]) <= now or not parent_live(KEYS[1], f[1], now) then return reply('inactive', f, now) end
local t = decoded(f[1])
local u = unaudited(t)
if u then return u end
if ARGV[3] ~= '' then
  local last = tonumber(redis.call('HGET', KEYS[1], 'renewed') or '0') or 0
  local wait = last + tonumber(ARGV[3]) - now
  if wait > 0 then return {'toosoon', n(wait)} end
end
if ARGV[7] == '1' then
  local a = f[7]
  if a == 'approved' and tonumber(f[8] or '0') > now then
    redis.call('HSET', KEYS[1], 'appr', 'redeemed')
    f[7] = 'redeemed'
    audit(now, ARGV[6], t, 'approval.redeemed', {})
  elseif a ~= 'redeemed' then
    return reply('lapsed', f, now)
  end
end
local nd = math.min(math.max(now + tonumber(ARGV[2]), tonumber(f[3])), tonumber(f[6]))
f[3] = n(nd)
redis.call('HSET', KEYS[1], 'deadline', f[3])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'renewed', n(now)) end
redis.call('ZADD', KEYS[5], f[3], ARGV[6])
local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. n(now), 'LIMIT', 0, PAGE)
for _, c in ipairs(old) do
  live_add(t, 0, -redis.call('HDEL', KEYS[2], c))
  redis.call('ZREM', KEYS[3], c)
end
-- A begin replay (extend_by 0) re-issues; a renewal extends.
if tonumber(ARGV[2]) == 0 then
  audit(now, ARGV[6], t, 'task.replayed', {'deadline', f[3]})
else
  audit(now, ARGV[6], t, 'lease.renewed', {'deadline', f[3]})
end
local rotated = {}
add_credentials(KEYS[2], KEYS[3], KEYS[4], KEYS[6], KEYS[7], 8, tonumber(ARGV[4]), now, ARGV[5], rotated, ARGV[6], t)
-- Pruning may have emptied (deleted) the credential keys: give them the task's expiry again.
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then for k = 2, 4 do redis.call('PEXPIRE', KEYS[k], ttl) end end
local out = reply('renewed', f, now)
for _, c in ipairs(rotated) do table.insert(out, c) end
return out
