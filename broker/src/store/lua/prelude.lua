-- Shared by every Leash write script. ARGV[1] is the caller's time in ms, or
-- '' to decide with Redis's own clock (one clock for every broker replica).
-- Redis's clock in ms, once read in this script (the audit trim reuses it).
local REDIS_MS = nil
local function redis_ms()
  if not REDIS_MS then
    local t = redis.call('TIME')
    REDIS_MS = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return REDIS_MS
end
local function clock()
  if ARGV[1] ~= '' then return tonumber(ARGV[1]) end
  return redis_ms()
end
-- Integers as plain decimal text (Lua would print large numbers as 1e+12).
local function n(x) return string.format('%.0f', x) end
local FIELDS = {'rec', 'state', 'deadline', 'ended', 'outcome', 'max', 'appr', 'appr_dl', 'appr_by', 'appr_why', 'appr_at'}
local NF = #FIELDS
local function fields(key) return redis.call('HMGET', key, unpack(FIELDS)) end
-- status, the task fields, the time decided at, then extras.
local function reply(status, f, now)
  local out = {status}
  for i = 1, NF do out[i + 1] = f[i] end
  out[NF + 2] = n(now)
  return out
end
__AUDIT__
local GRACE = __GRACE__
local PAGE = __PAGE__
-- Logs one revoked credential for watchers: a stream entry and a revoked-set
-- member `<id> <audience> <tenant>` scored by its expiry (neither audience nor
-- tenant holds whitespace; members written before tenants have two parts).
-- `due` is when what revoked it happened (an expiry's lease deadline, else now):
-- readers measure the revocation lag from it.
local function log_one(creds, revlog, revoked, id, exp, now, due, reason, maxlen)
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
  redis.call('XADD', revlog, 'MAXLEN', '~', maxlen, '*', 'c', id, 'e', exp, 'a', n(now), 'd', n(due), 'r', reason, 'u', aud, 't', tenant)
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
-- Revokes every unexpired credential of an ending task (record `t`, decoded;
-- appending their ids to out), deletes its credential keys and takes the task
-- out of the live counts. Bounded: a task holds at most
-- MAX_GRANTS x MAX_LIVE_CREDENTIALS_PER_GRANT live credentials.
local function end_task(creds, cexp, cgr, revlog, revoked, now, due, reason, maxlen, out, t)
  live_add(t, -1, -redis.call('HLEN', creds))
  local live = redis.call('ZRANGEBYSCORE', cexp, '(' .. n(now), '+inf', 'WITHSCORES')
  for i = 1, #live, 2 do
    log_one(creds, revlog, revoked, live[i], live[i + 1], now, due, reason, maxlen)
    table.insert(out, live[i])
  end
  prune_revoked(revoked, now)
  redis.call('DEL', creds, cexp, cgr)
end
-- Adds the credentials in ARGV from `first` on, four values each (id, record
-- JSON, expiry, grant). A grant past `cap` live credentials loses its oldest:
-- revoked (reason rotation) and deleted; their ids go to `rotated`.
-- Each is recorded on task `tid` (record `t`, decoded) as issued, and each
-- rotated one as revoked.
local function add_credentials(creds, cexp, cgr, revlog, revoked, first, cap, now, maxlen, rotated, tid, t)
  for i = first, #ARGV, 4 do
    local id, json, exp, grant = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    audit_issued(now, tid, t, json)
    live_add(t, 0, redis.call('HSET', creds, id, json))
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
      if e and tonumber(e) > now then log_one(creds, revlog, revoked, old, e, now, now, 'rotation', maxlen) end
      audit_revoked(now, tid, t, {old}, 'rotation', '')
      live_add(t, 0, -redis.call('HDEL', creds, old))
      redis.call('ZREM', cexp, old)
      table.insert(rotated, old)
    end
    redis.call('HSET', cgr, grant, table.concat(kept, ' '))
  end
end

-- Kill switches: KEYS `kill` (hash "<kind> <value>" -> JSON) and `killpfx`
-- (set of identity prefixes). Answers the first kill switch refusing a task
-- of (owner, template, class, tenant), as {kind, value, json}, or nil.
local function killed(kill, killpfx, owner, template, class, tenant)
  local exact = {{'identity', owner}, {'template', template}, {'class', class}, {'tenant', tenant}}
  local fields = {}
  for i, e in ipairs(exact) do fields[i] = e[1] .. ' ' .. e[2] end
  local found = redis.call('HMGET', kill, unpack(fields))
  for i, e in ipairs(exact) do
    if found[i] then return {e[1], e[2], found[i]} end
  end
  for _, p in ipairs(redis.call('SMEMBERS', killpfx)) do
    if string.sub(owner, 1, #p) == p then
      return {'identity_prefix', p, redis.call('HGET', kill, 'identity_prefix ' .. p) or '{}'}
    end
  end
  return nil
end
-- A delegated task that ends no longer counts against its root's tree.
local function forget_descendant(base, rec)
  local ok, t = pcall(cjson.decode, rec or '')
  if ok and type(t) == 'table' and type(t.root) == 'string' then
    local rk = base .. 'task:' .. t.root
    if redis.call('EXISTS', rk) == 1 and tonumber(redis.call('HGET', rk, 'desc') or '0') > 0 then
      redis.call('HINCRBY', rk, 'desc', -1)
    end
  end
end
-- Ends one active task `id` of the shard at `base` (its fields in `f`): the
-- new state, out of the deadline index and the quotas, every unexpired
-- credential logged as revoked. Answers the entry {status, fields..., now,
-- revoked ids...}.
local function end_one(base, id, f, status, state, outcome, reason, now, ctx)
  local tk = base .. 'task:' .. id
  redis.call('HSET', tk, 'state', state, 'ended', n(now), 'outcome', outcome)
  redis.call('ZREM', ctx.deadlines, id)
  unlive(ctx.qbase, f[1], id)
  forget_descendant(base, f[1])
  f[2] = state; f[4] = n(now); f[5] = outcome
  local entry = reply(status, f, now)
  local ids = {}
  local t = decoded(f[1])
  end_task(base .. 'creds:' .. id, base .. 'cexp:' .. id, base .. 'cgr:' .. id, ctx.revlog, ctx.revoked, now, now, reason, ctx.maxlen, ids, t)
  for _, c in ipairs(ids) do table.insert(entry, c) end
  audit_end(now, id, t, reason, state, outcome, ctx.by or '', ids)
  redis.call('PEXPIRE', tk, ctx.retention)
  return entry
end
-- Ends every active delegated descendant of `id` (all in this shard),
-- breadth first, appending one 'cascade' entry each to `out`. Bounded: a tree
-- holds at most MAX_DESCENDANTS live tasks.
local function end_descendants(base, id, now, ctx, out)
  local queue = {id}
  local i = 1
  while i <= #queue and i <= __MAXDESC__ + 1 do
    local parent = queue[i]
    local kk = base .. 'kids:' .. parent
    for _, k in ipairs(redis.call('SMEMBERS', kk)) do
      local kf = fields(base .. 'task:' .. k)
      if kf[1] and kf[2] == 'active' then
        local cctx = {deadlines = ctx.deadlines, revlog = ctx.revlog, revoked = ctx.revoked, maxlen = ctx.maxlen, retention = ctx.retention, qbase = ctx.qbase, by = id}
        table.insert(out, end_one(base, k, kf, 'cascade', 'revoked', 'cascade: ancestor ' .. id .. ' ended', 'cascade', now, cctx))
        table.insert(queue, k)
      end
    end
    redis.call('DEL', kk)
    i = i + 1
  end
end
-- Whether a delegated task's parent (in the same shard: its key is the
-- task's with the id replaced) is still live; true for a task begun directly.
-- A child whose parent lapsed must not renew or redeem in the moment before
-- the reaper ends the tree.
local function parent_live(task_key, rec, now)
  local ok, t = pcall(cjson.decode, rec or '')
  if not ok or type(t) ~= 'table' or type(t.parent) ~= 'string' then return true end
  local pk = string.gsub(task_key, '[^:]*$', '') .. t.parent
  local p = redis.call('HMGET', pk, 'state', 'deadline')
  return p[1] == 'active' and tonumber(p[2] or '0') > now
end
