-- One page of a task's story. KEYS: the task's event index
-- ARGV: key base, first position, count. Reply: {index length, entries...},
-- each entry {id, {field, value, ...}}; events trimmed away are left out.
local items = redis.call('LRANGE', KEYS[1], ARGV[2], tonumber(ARGV[2]) + tonumber(ARGV[3]) - 1)
local out = {redis.call('LLEN', KEYS[1])}
for _, it in ipairs(items) do
  local sp = string.find(it, ' ', 1, true)
  if sp then
    local r = redis.call('XRANGE', ARGV[1] .. 'audit:' .. string.sub(it, sp + 1), string.sub(it, 1, sp - 1), string.sub(it, 1, sp - 1))
    if r[1] then table.insert(out, r[1]) end
  end
end
return out
