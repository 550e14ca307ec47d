-- KEYS: deadlines revlog revoked (one shard); ARGV: now limit maxlen retention key_base qbase
-- The task keys are named from key_base (`{prefix:shard}:`): they share the
-- shard's hash tag, so every key touched lies in this script's one slot.
local now = clock()
local limit = tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', n(now), 'LIMIT', 0, limit + 1)
local more = 0
if #due > limit then more = 1; table.remove(due) end
local out = {n(now), more}
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  local base = ARGV[5]
  local tk = base .. 'task:' .. id
  local f = fields(tk)
  local d = tonumber(f[3])
  if not f[1] then
    table.insert(out, {'skipped', id, 'task record gone'})
  elseif f[2] ~= 'active' then
    table.insert(out, {'skipped', id, 'already ' .. tostring(f[2])})
  elseif not d then
    table.insert(out, {'skipped', id, 'unreadable deadline'})
  elseif d > now then
    -- Renewed after it was indexed under an older deadline: index it again.
    redis.call('ZADD', KEYS[1], f[3], id)
  elseif unaudited(decoded(f[1])) then
    -- Its record cannot be written: it stays due, for a later sweep.
    redis.call('ZADD', KEYS[1], f[3], id)
    table.insert(out, {'skipped', id, 'audit stream unwritable'})
  else
    redis.call('HSET', tk, 'state', 'expired', 'ended', n(now), 'outcome', '')
    unlive(ARGV[6], f[1], id)
    forget_descendant(base, f[1])
    f[2] = 'expired'; f[4] = n(now); f[5] = ''
    local entry = reply('expired', f, now)
    -- Every credential ends with the lease: all are reported (for the audit
    -- trail); the unexpired ones are also logged for watchers.
    local creds = base .. 'creds:' .. id
    for _, c in ipairs(redis.call('HKEYS', creds)) do table.insert(entry, c) end
    local ids = {}
    local t = decoded(f[1])
    end_task(creds, base .. 'cexp:' .. id, base .. 'cgr:' .. id, KEYS[2], KEYS[3], now, d, 'expiry', ARGV[3], ids, t)
    audit_end(now, id, t, 'expiry', 'expired', '', '', ids)
    redis.call('PEXPIRE', tk, ARGV[4])
    table.insert(out, entry)
    local ctx = {deadlines = KEYS[1], revlog = KEYS[2], revoked = KEYS[3], maxlen = ARGV[3], retention = ARGV[4], qbase = ARGV[6]}
    end_descendants(base, id, now, ctx, out)
  end
end
return out
