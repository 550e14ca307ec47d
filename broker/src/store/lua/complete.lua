-- KEYS: task creds cexp cgr deadlines revlog revoked
-- ARGV: now outcome task_id maxlen retention qbase (quota key base, see unlive) key_base
-- Reply: {'done', fields..., now, {revoked ids}, cascade entries...}
local now = clock()
local f = fields(KEYS[1])
if not f[1] then return {'missing'} end
if f[2] ~= 'active' then return reply('ended', f, now) end
local t = decoded(f[1])
local u = unaudited(t)
if u then return u end
local state, outcome, reason = 'completed', ARGV[2], 'completion'
if tonumber(f[3]) <= now then state = 'expired'; outcome = ''; reason = 'expiry' end
redis.call('HSET', KEYS[1], 'state', state, 'ended', n(now), 'outcome', outcome)
redis.call('ZREM', KEYS[5], ARGV[3])
unlive(ARGV[6], f[1], ARGV[3])
forget_descendant(ARGV[7], f[1])
f[2] = state; f[4] = n(now); f[5] = outcome
local out = reply('done', f, now)
local ids = {}
local due = now
if reason == 'expiry' then due = tonumber(f[3]) end
end_task(KEYS[2], KEYS[3], KEYS[4], KEYS[6], KEYS[7], now, due, reason, ARGV[4], ids, t)
table.insert(out, ids)
local by = str(t.owner)
if reason == 'expiry' then by = '' end
audit_end(now, ARGV[3], t, reason, state, outcome, by, ids, AUD.sum)
local ctx = {deadlines = KEYS[5], revlog = KEYS[6], revoked = KEYS[7], maxlen = ARGV[4], retention = ARGV[5], qbase = ARGV[6]}
end_descendants(ARGV[7], ARGV[3], now, ctx, out)
-- The task record alone stays, for the retention period from now.
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return out
