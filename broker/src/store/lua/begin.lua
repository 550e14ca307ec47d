-- KEYS: task creds cexp cgr deadlines revlog revoked
-- ARGV: now rec ttl_offset max_offset retention task_id cap maxlen, credentials from 9
local now = clock()
local f = fields(KEYS[1])
if f[1] then return reply('existing', f, now) end
local max = now + tonumber(ARGV[4])
local deadline = math.min(now + tonumber(ARGV[3]), max)
redis.call('HSET', KEYS[1], 'rec', ARGV[2], 'state', 'active', 'deadline', n(deadline), 'max', n(max), 'renewed', n(now))
local rotated = {}
add_credentials(KEYS[2], KEYS[3], KEYS[4], KEYS[6], KEYS[7], 9, tonumber(ARGV[7]), now, ARGV[8], rotated)
redis.call('ZADD', KEYS[5], n(deadline), ARGV[6])
local at = n(max + tonumber(ARGV[5]))
for k = 1, 4 do redis.call('PEXPIREAT', KEYS[k], at) end
return reply('created', {ARGV[2], 'active', n(deadline), false, false, n(max)}, now)
