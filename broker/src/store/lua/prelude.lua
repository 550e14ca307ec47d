-- Shared by every Leash write script. ARGV[1] is the caller's time in ms, or
-- '' to decide with Redis's own clock (one clock for every broker replica).
local function clock()
  if ARGV[1] ~= '' then return tonumber(ARGV[1]) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Integers as plain decimal text (Lua would print large numbers as 1e+12).
local function n(x) return string.format('%.0f', x) end
local FIELDS = {'rec', 'state', 'deadline', 'ended', 'outcome', 'max'}
local function fields(key) return redis.call('HMGET', key, unpack(FIELDS)) end
-- status, the six task fields, the time decided at, then extras.
local function reply(status, f, now)
  local out = {status}
  for i = 1, 6 do out[i + 1] = f[i] end
  out[8] = n(now)
  return out
end
local GRACE = __GRACE__
local PAGE = __PAGE__
-- Logs one revoked credential for watchers: a stream entry and a revoked-set
-- member `<id> <audience> <tenant>` scored by its expiry (neither audience nor
-- tenant holds whitespace; members written before tenants have two parts).
local function log_one(creds, revlog, revoked, id, exp, now, reason, maxlen)
  local aud, tenant = '', ''
  local cj = redis.call('HGET', creds, id)
  if cj then
    -- A damaged record must not abort the step that revokes it.
    local ok, c = pcall(cjson.decode, cj)
    if ok and type(c) == 'table' then
      if type(c.audience) == 'string' then aud = c.audience end
      if type(c.tenant) == 'string' then tenant = c.tenant end
    end
  end
  redis.call('XADD', revlog, 'MAXLEN', '~', maxlen, '*', 'c', id, 'e', exp, 'a', n(now), 'r', reason, 'u', aud, 't', tenant)
  redis.call('ZADD', revoked, exp, id .. ' ' .. aud .. ' ' .. tenant)
end
-- Drops an ending task from its owner's and class's live-task sets (quotas).
-- The set keys are named from `qbase` and carry no hash tag: fine on one Redis
-- node, but Redis Cluster (issue 11) needs them moved to a slot of their own
-- and declared in KEYS. A task whose record cannot be read stays in the sets
-- until its max lifetime, when the next begin drops it: nothing can lock an
-- identity out for longer.
local function unlive(qbase, rec, task_id)
  if not rec or qbase == nil or qbase == '' then return end
  local ok, t = pcall(cjson.decode, rec)
  if not ok or type(t) ~= 'table' then return end
  if type(t.owner) == 'string' then redis.call('ZREM', qbase .. 'id:' .. t.owner, task_id) end
  if type(t.class) == 'string' then redis.call('ZREM', qbase .. 'class:' .. t.class, task_id) end
end
-- Drops revoked-set entries past their expiry plus the grace, a page at a time.
local function prune_revoked(revoked, now)
  local k = redis.call('ZCOUNT', revoked, '-inf', '(' .. n(now - GRACE))
  if k > 0 then redis.call('ZREMRANGEBYRANK', revoked, 0, math.min(k, PAGE) - 1) end
end
-- Revokes every unexpired credential of an ending task (appending their ids to
-- out) and deletes its credential keys. Bounded: a task holds at most
-- MAX_GRANTS x MAX_LIVE_CREDENTIALS_PER_GRANT live credentials.
local function end_task(creds, cexp, cgr, revlog, revoked, now, reason, maxlen, out)
  local live = redis.call('ZRANGEBYSCORE', cexp, '(' .. n(now), '+inf', 'WITHSCORES')
  for i = 1, #live, 2 do
    log_one(creds, revlog, revoked, live[i], live[i + 1], now, reason, maxlen)
    table.insert(out, live[i])
  end
  prune_revoked(revoked, now)
  redis.call('DEL', creds, cexp, cgr)
end
-- Adds the credentials in ARGV from `first` on, four values each (id, record
-- JSON, expiry, grant). A grant past `cap` live credentials loses its oldest:
-- revoked (reason rotation) and deleted; their ids go to `rotated`.
local function add_credentials(creds, cexp, cgr, revlog, revoked, first, cap, now, maxlen, rotated)
  for i = first, #ARGV, 4 do
    local id, json, exp, grant = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    redis.call('HSET', creds, id, json)
    redis.call('ZADD', cexp, exp, id)
    local kept = {}
    local list = redis.call('HGET', cgr, grant)
    if list then
      for c in string.gmatch(list, '%S+') do
        if redis.call('HEXISTS', creds, c) == 1 then table.insert(kept, c) end
      end
    end
    table.insert(kept, id)
    while #kept > cap do
      local old = table.remove(kept, 1)
      local e = redis.call('ZSCORE', cexp, old)
      if e and tonumber(e) > now then log_one(creds, revlog, revoked, old, e, now, 'rotation', maxlen) end
      redis.call('HDEL', creds, old)
      redis.call('ZREM', cexp, old)
      table.insert(rotated, old)
    end
    redis.call('HSET', cgr, grant, table.concat(kept, ' '))
  end
end
