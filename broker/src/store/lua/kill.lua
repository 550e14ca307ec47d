-- KEYS: kill killpfx; ARGV: op ('set' | 'lift') kind value json
-- One step, so the prefix set never disagrees with the kill-switch hash.
local field = ARGV[2] .. ' ' .. ARGV[3]
if ARGV[1] == 'set' then
  if redis.call('HEXISTS', KEYS[1], field) == 0 and redis.call('HLEN', KEYS[1]) >= __MAXKILL__ then
    return 'full'
  end
  redis.call('HSET', KEYS[1], field, ARGV[4])
  if ARGV[2] == 'identity_prefix' then redis.call('SADD', KEYS[2], ARGV[3]) end
  return 'set'
end
local existed = redis.call('HDEL', KEYS[1], field)
if ARGV[2] == 'identity_prefix' then redis.call('SREM', KEYS[2], ARGV[3]) end
if existed == 1 then return 'lifted' end
return 'none'
