-- KEYS: deadlines revlog revoked (one shard)
-- ARGV: now maxlen retention key_base qbase outcome kind value, task ids from 9
-- Ends each listed active task the target matches, with its descendants.
local now = clock()
local base = ARGV[4]
local ctx = {deadlines = KEYS[1], revlog = KEYS[2], revoked = KEYS[3], maxlen = ARGV[2], retention = ARGV[3], qbase = ARGV[5], by = AUD.by}
local kind, value = ARGV[7], ARGV[8]
local function matches(id, rec)
  if kind == 'task' then return id == value end
  local ok, t = pcall(cjson.decode, rec)
  if not ok or type(t) ~= 'table' then return false end
  if kind == 'identity' then return t.owner == value end
  if kind == 'identity_prefix' then return type(t.owner) == 'string' and string.sub(t.owner, 1, #value) == value end
  if kind == 'template' then return t.template == value end
  if kind == 'class' then return t.class == value end
  if kind == 'tenant' then return t.tenant == value end
  return false
end
local out = {n(now)}
for i = 9, #ARGV do
  local id = ARGV[i]
  local f = fields(base .. 'task:' .. id)
  -- A task whose record cannot be written stays live; the caller sees it unrevoked.
  if f[1] and f[2] == 'active' and matches(id, f[1]) and not unaudited(decoded(f[1])) then
    table.insert(out, end_one(base, id, f, 'revoked', 'revoked', ARGV[6], 'kill_switch', now, ctx))
    end_descendants(base, id, now, ctx, out)
  end
end
return out
