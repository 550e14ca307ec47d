-- KEYS: task creds cexp cgr deadlines revlog revoked
-- ARGV: now handle_sha256 new_rec cap maxlen task_id, credentials from 7
local now = clock()
local f = fields(KEYS[1])
if not f[1] then return {'missing'} end
if f[2] ~= 'active' or tonumber(f[3]) <= now or not parent_live(KEYS[1], f[1], now) then return reply('inactive', f, now) end
local h = redis.call('HGET', KEYS[1], 'handle')
if not h or h ~= ARGV[2] then return {'badhandle', n(now)} end
local t = decoded(ARGV[3])
local u = unaudited(t)
if u then return u end
redis.call('HDEL', KEYS[1], 'handle')
audit(now, ARGV[6], t, 'delegation.redeemed', {'by', str(t.owner)})
redis.call('HSET', KEYS[1], 'rec', ARGV[3], 'renewed', n(now))
f[1] = ARGV[3]
local rotated = {}
add_credentials(KEYS[2], KEYS[3], KEYS[4], KEYS[6], KEYS[7], 7, tonumber(ARGV[4]), now, ARGV[5], rotated, ARGV[6], t)
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then for i = 2, 4 do redis.call('PEXPIRE', KEYS[i], ttl) end end
return reply('redeemed', f, now)
