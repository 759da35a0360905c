-- `inbox_list` and `archive_list`: one page of a sorted set with each message's fields, as
-- a flat list of `id, level, message, extra_tags, url, date_us`. A member whose hash is gone
-- (a concurrent cleanup) is left out.
--
-- KEYS: the sorted set. ARGV: prefix, ZRANGEBYLEX or ZREVRANGEBYLEX, its two bounds, limit.
local members = redis.call(ARGV[2], KEYS[1], ARGV[3], ARGV[4], 'LIMIT', 0, ARGV[5])
local out = {}
for _, member in ipairs(members) do
  local id = string.match(member, ':0*(%d+)$')
  if id then
    local f = redis.call('HMGET', ARGV[1] .. 'message:' .. id,
      'level', 'message', 'extra_tags', 'url', 'date_us')
    if f[1] then
      out[#out + 1] = id
      for j = 1, 5 do out[#out + 1] = f[j] end
    end
  end
end
return out
