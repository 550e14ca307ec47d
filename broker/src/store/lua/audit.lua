-- The audit trail, written in the same script as the change it records.
-- ARGV[2] of an auditing script is its audit context AUD (JSON), taken out
-- before anything else so the script's own ARGV keep their places:
--   b: the shard's key base '{prefix:sN}:'   tr: the caller's trace id
--   m: a stream's approximate max length      age: retention in ms
--   by: who asked ('' if nobody did)          sum: a completion's summary
--   off: true when the trail is turned off (`[audit] streams = false`)
-- Events go to the stream `<b>audit:<tenant>` ('_' for no tenant), one per
-- tenant and shard; each is indexed under its task and every ancestor
-- (`<b>tev:<id>`, a list of '<entry id> <tenant>'), so a task's story,
-- descendants included, is one list read.
local TRIMMED = {}
local EXPIRY_SET = {}
local ANCESTORS = {}
local function decoded(rec)
  local ok, t = pcall(cjson.decode, rec or '')
  if ok and type(t) == 'table' then return t end
  return {}
end
local function str(v)
  if type(v) == 'string' then return v end
  if type(v) == 'number' then return n(v) end
  return ''
end
local function tenant_of(t)
  local x = str(t.tenant)
  if x == '' then return '_' end
  return x
end
local function stream_of(t) return AUD.b .. 'audit:' .. tenant_of(t) end
-- A refusal if the stream an event of `t` goes to cannot be written: checked
-- before any change, so a damaged key refuses the step rather than leave a
-- change without its record.
local function unaudited_key(key)
  if AUD.off then return nil end
  local ty = redis.call('TYPE', key)['ok']
  if ty ~= 'none' and ty ~= 'stream' then return {'unaudited', key, ty} end
  return nil
end
local function unaudited(t) return unaudited_key(stream_of(t)) end
-- The ids of a task's ancestors, nearest first (all in this shard).
local function ancestors_of(id, t)
  if ANCESTORS[id] then return ANCESTORS[id] end
  local out = {}
  local p = t.parent
  while type(p) == 'string' and #out < __MAXDEPTH__ do
    table.insert(out, p)
    p = decoded(redis.call('HGET', AUD.b .. 'task:' .. p, 'rec')).parent
  end
  ANCESTORS[id] = out
  return out
end
-- Retention by age: entries older than `age` (by Redis's clock, which names
-- the entries) leave each stream once per script.
local function trim(key)
  if TRIMMED[key] then return end
  TRIMMED[key] = true
  redis.call('XTRIM', key, 'MINID', '~', n(redis_ms() - tonumber(AUD.age)))
end
-- Appends one event about task `id` (record `t`, decoded) with the `extra`
-- field-value pairs, and indexes it.
local function audit(now, id, t, event, extra)
  if AUD.off then return end
  local key = stream_of(t)
  trim(key)
  local actors = ''
  if type(t.actors) == 'table' then actors = table.concat(t.actors, ',') end
  local args = {'XADD', key, 'MAXLEN', '~', AUD.m, '*', 'event', event, 'at', n(now), 'task', id,
    'parent', str(t.parent), 'root', str(t.root), 'identity', str(t.owner), 'actors', actors,
    'class', str(t.class), 'tenant', str(t.tenant), 'template', str(t.template),
    'version', str(t.template_version), 'intent', str(t.intent), 'trace', AUD.tr}
  for i = 1, #extra do table.insert(args, extra[i]) end
  local entry = redis.call(unpack(args)) .. ' ' .. tenant_of(t)
  local ids = {id}
  for _, a in ipairs(ancestors_of(id, t)) do table.insert(ids, a) end
  for _, tid in ipairs(ids) do
    local ik = AUD.b .. 'tev:' .. tid
    -- The index only speeds up a trace: a damaged one must not undo the event.
    redis.pcall('RPUSH', ik, entry)
    -- Its expiry is set once per script: later events of the same script
    -- would move it by microseconds only.
    if not EXPIRY_SET[ik] then
      EXPIRY_SET[ik] = true
      redis.pcall('PEXPIRE', ik, AUD.age)
    end
  end
end
-- Live counts, per shard and template, in `<b>live` (fields 't|<template>'
-- for live tasks, 'c|<template>' for their credentials held): changed by the
-- same scripts that begin, issue, rotate and end, so the sum over shards is
-- exact at any instant.
local function live_add(t, tasks, creds)
  local key = AUD.b .. 'live'
  local tpl = str(t.template)
  if tasks ~= 0 then redis.call('HINCRBY', key, 't|' .. tpl, tasks) end
  if creds ~= 0 then redis.call('HINCRBY', key, 'c|' .. tpl, creds) end
end
-- An event about no task (kill switches): in `tenant`'s stream, not indexed.
local function audit_plain(now, tenant, event, extra)
  if AUD.off then return end
  local key = stream_of({tenant = tenant})
  trim(key)
  if tenant == '_' then tenant = '' end
  local args = {'XADD', key, 'MAXLEN', '~', AUD.m, '*', 'event', event, 'at', n(now), 'task', '',
    'tenant', tenant, 'trace', AUD.tr}
  for i = 1, #extra do table.insert(args, extra[i]) end
  redis.call(unpack(args))
end
-- One `credential.issued` event a credential record (JSON).
local function audit_issued(now, id, t, json)
  local c = decoded(json)
  local scopes = ''
  if type(c.scopes) == 'table' then scopes = table.concat(c.scopes, ' ') end
  local bound = 'false'
  if type(c.cnf_x5t_s256) == 'string' then bound = 'true' end
  audit(now, id, t, 'credential.issued', {'credential', str(c.id), 'grant', str(c.grant),
    'audience', str(c.audience), 'scopes', scopes, 'expires_at', str(c.expires_at_ms), 'bound', bound})
end
-- One `credential.revoked` event each of `ids`.
local function audit_revoked(now, id, t, ids, reason, by)
  for _, c in ipairs(ids) do
    audit(now, id, t, 'credential.revoked', {'credential', c, 'reason', reason, 'by', by})
  end
end
-- The event a task's end is recorded as, by reason.
local END_EVENT = {completion = 'task.completed', expiry = 'lease.expired',
  cascade = 'task.revoked', kill_switch = 'task.revoked'}
-- The events of a task's end: the task's, then each revoked credential's.
local function audit_end(now, id, t, reason, state, outcome, by, revoked, summary)
  local ids = {}
  for i, c in ipairs(revoked) do ids[i] = c end
  table.sort(ids)
  local extra = {'state', state, 'outcome', outcome, 'reason', reason, 'by', by,
    'credentials', table.concat(ids, ' ')}
  if summary and summary ~= '' then table.insert(extra, 'summary'); table.insert(extra, summary) end
  audit(now, id, t, END_EVENT[reason] or 'task.ended', extra)
  audit_revoked(now, id, t, ids, reason, by)
end
