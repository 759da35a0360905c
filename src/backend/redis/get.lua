-- `inbox_get`: the fields `level, message, extra_tags, url, date_us` of a message that is in
-- the inbox and not expired, or nil.
--
-- Whether the member is at or above the expiry bound is asked of `ZLEXCOUNT` (the range
-- from the bound to the member is empty when the member is below it) rather than compared
-- in Lua, whose string comparison follows the server's locale.
--
-- KEYS: message hash, inbox. ARGV: the inbox's inclusive lower bound (`[member`).
local f = redis.call('HMGET', KEYS[1], 'member', 'level', 'message', 'extra_tags', 'url', 'date_us')
local member = f[1]
if not member or not redis.call('ZSCORE', KEYS[2], member)
   or redis.call('ZLEXCOUNT', KEYS[2], ARGV[1], '[' .. member) == 0 then
  return nil
end
return {f[2], f[3], f[4], f[5], f[6]}
