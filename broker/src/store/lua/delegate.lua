-- KEYS: parent child parent_kids root deadlines kill killpfx
-- ARGV: now child_rec ttl_offset max_offset retention child_id handle_sha256
--   owner template class tenant parent_id
-- The child shares the parent's shard (and so its slot). It gets no
-- credential here: the subagent redeems the handle for them.
local now = clock()
local p = fields(KEYS[1])
if not p[1] then return {'missing'} end
if p[2] ~= 'active' or tonumber(p[3]) <= now then return reply('inactive', p, now) end
local k = killed(KEYS[6], KEYS[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11])
if k then return {'killed', k[1], k[2], n(now), k[3]} end
-- Live children only: ended ones leave the set here.
local live = 0
for _, c in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local s = redis.call('HGET', string.gsub(KEYS[1], '[^:]*$', '') .. c, 'state')
  if s == 'active' then live = live + 1 else redis.call('SREM', KEYS[3], c) end
end
if live >= __MAXKIDS__ then return {'toomany', 'children', n(now)} end
if tonumber(redis.call('HGET', KEYS[4], 'desc') or '0') >= __MAXDESC__ then
  return {'toomany', 'descendants', n(now)}
end
local t = decoded(ARGV[2])
local u = unaudited(t)
if u then return u end
local max = math.min(now + tonumber(ARGV[4]), tonumber(p[6]))
local deadline = math.min(now + tonumber(ARGV[3]), tonumber(p[3]), max)
redis.call('HSET', KEYS[2], 'rec', ARGV[2], 'state', 'active', 'deadline', n(deadline), 'max', n(max), 'renewed', n(now), 'handle', ARGV[7])
live_add(t, 1, 0)
audit(now, ARGV[6], t, 'task.delegated', {'by', str(decoded(p[1]).owner), 'depth', str(t.depth),
  'deadline', n(deadline), 'max_deadline', n(max)})
redis.call('SADD', KEYS[3], ARGV[6])
redis.call('HINCRBY', KEYS[4], 'desc', 1)
redis.call('ZADD', KEYS[5], n(deadline), ARGV[6])
redis.call('PEXPIREAT', KEYS[2], n(max + tonumber(ARGV[5])))
-- The parent's children set lives as long as the parent's record may.
redis.call('PEXPIREAT', KEYS[3], n(tonumber(p[6]) + tonumber(ARGV[5])))
return reply('created', {ARGV[2], 'active', n(deadline), false, false, n(max), false, false, false, false, false}, now)
