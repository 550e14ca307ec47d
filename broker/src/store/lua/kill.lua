-- KEYS: kill killpfx; ARGV: now op ('set' | 'lift') kind value json by reason
-- One step, so the prefix set never disagrees with the kill-switch hash. The
-- event goes to the tenant's stream for a tenant switch, else to '_'.
local now = clock()
local op, kind, value = ARGV[2], ARGV[3], ARGV[4]
local field = kind .. ' ' .. value
local tenant = '_'
if kind == 'tenant' then tenant = value end
local u = unaudited_key(AUD.b .. 'audit:' .. tenant)
if u then return u end
local extra = {'kind', kind, 'value', value, 'by', ARGV[6], 'reason', ARGV[7]}
if op == 'set' then
  if redis.call('HEXISTS', KEYS[1], field) == 0 and redis.call('HLEN', KEYS[1]) >= __MAXKILL__ then
    return {'full'}
  end
  redis.call('HSET', KEYS[1], field, ARGV[5])
  if kind == 'identity_prefix' then redis.call('SADD', KEYS[2], value) end
  audit_plain(now, tenant, 'kill_switch.set', extra)
  return {'set'}
end
local existed = redis.call('HDEL', KEYS[1], field)
if kind == 'identity_prefix' then redis.call('SREM', KEYS[2], value) end
if existed == 1 then
  audit_plain(now, tenant, 'kill_switch.lifted', extra)
  return {'lifted'}
end
return {'none'}
