-- KEYS: task; ARGV: now decision ('approved' | 'denied') by reason validity_ms task_id
local now = clock()
local f = fields(KEYS[1])
if not f[1] then return {'missing'} end
local t = decoded(f[1])
if f[2] ~= 'active' or tonumber(f[3]) <= now or f[7] ~= 'pending' then return reply('notpending', f, now) end
if tonumber(f[8] or '0') <= now then
  if unaudited(t) then return reply('notpending', f, now) end
  redis.call('HSET', KEYS[1], 'appr', 'expired')
  audit(now, ARGV[6], t, 'approval.expired', {})
  f[7] = 'expired'
  return reply('notpending', f, now)
end
local u = unaudited(t)
if u then return u end
local dl = f[8]
if ARGV[2] == 'approved' then dl = n(now + tonumber(ARGV[5])) end
redis.call('HSET', KEYS[1], 'appr', ARGV[2], 'appr_dl', dl, 'appr_by', ARGV[3], 'appr_why', ARGV[4], 'appr_at', n(now))
audit(now, ARGV[6], t, 'approval.' .. ARGV[2], {'by', ARGV[3], 'reason', ARGV[4], 'valid_until', dl})
f[7] = ARGV[2]; f[8] = dl; f[9] = ARGV[3]; f[10] = ARGV[4]; f[11] = n(now)
return reply('decided', f, now)
