-- KEYS: every shard's revocation log. Returns each log's last id ('0-0' if it
-- was never written): a cursor that reads only what is logged from now on.
local out = {}
for k = 1, #KEYS do
  local last = '0-0'
  if redis.call('EXISTS', KEYS[k]) == 1 then
    local info = redis.call('XINFO', 'STREAM', KEYS[k])
    for i = 1, #info, 2 do if info[i] == 'last-generated-id' then last = info[i + 1] end end
  end
  out[k] = last
end
return out
