-- Appends one event that records no state change of its own (a refusal).
-- KEYS: any key of the shard's slot (not read: it routes the script in a
-- cluster); ARGV: now, AUD (taken out by the prelude), index ('' or the
-- task id to index it under), then the event's field-value pairs.
local now = clock()
if AUD.off then return {'recorded', n(now)} end
local t = {}
for i = 3, #ARGV, 2 do if ARGV[i] == 'tenant' then t.tenant = ARGV[i + 1] end end
local key = stream_of(t)
local u = unaudited_key(key)
if u then return u end
trim(key)
local args = {'XADD', key, 'MAXLEN', '~', AUD.m, '*'}
for i = 3, #ARGV do table.insert(args, ARGV[i]) end
local entry = redis.call(unpack(args)) .. ' ' .. tenant_of(t)
if ARGV[2] ~= '' then
  local ik = AUD.b .. 'tev:' .. ARGV[2]
  redis.pcall('RPUSH', ik, entry)
  redis.pcall('PEXPIRE', ik, AUD.age)
end
return {'recorded', n(now)}
