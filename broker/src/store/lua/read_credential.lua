-- KEYS: task creds; ARGV: now credential_id
local now = clock()
local f = fields(KEYS[1])
if not f[1] then return {'missing'} end
local c = redis.call('HGET', KEYS[2], ARGV[2])
if not c then return {'missing'} end
local out = reply('found', f, now)
table.insert(out, c)
return out
