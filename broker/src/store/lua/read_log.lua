-- KEYS: every shard's revocation log; ARGV: the cursor's id in each, then the
-- most entries to read per log. The gap check and the read are one step.
--
-- Returns {'gap'} if any history after the cursor may be gone, which is so
-- when the entry at the cursor is no longer in its log: it was trimmed (and
-- maybe entries after it), or the server restarted, or a replica was
-- promoted, with less history (the cursor is ahead of what it holds); or when
-- a reader from the start ('0-0') finds entries already removed. Trimming does
-- not move `max-deleted-entry-id`, so the cursor's own entry is the witness.
-- Otherwise {'ok', <entries of log 1>, <entries of log 2>, ...}, each as XRANGE.
local count = ARGV[#KEYS + 1]
local out = {'ok'}
for k = 1, #KEYS do
  local after = ARGV[k]
  if redis.call('EXISTS', KEYS[k]) == 0 then
    if after ~= '0-0' then return {'gap'} end
    out[k + 1] = {}
  else
    if after == '0-0' then
      local info = redis.call('XINFO', 'STREAM', KEYS[k])
      local added, length = 0, 0
      for i = 1, #info, 2 do
        if info[i] == 'entries-added' then added = info[i + 1] end
        if info[i] == 'length' then length = info[i + 1] end
      end
      if added > length then return {'gap'} end
    elseif #redis.call('XRANGE', KEYS[k], after, after) == 0 then
      return {'gap'}
    end
    out[k + 1] = redis.call('XRANGE', KEYS[k], '(' .. after, '+', 'COUNT', count)
  end
end
return out
