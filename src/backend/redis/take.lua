-- `inbox_purge` and the inbox step of cleanup: removes the members of an inbox in a lex
-- range and lowers each one's message `unread` count. Returns how many members were in the
-- counted range (which may be narrower than the removed one).
--
-- KEYS: inbox. ARGV: prefix, removed range (min, max), counted range (min, max).
local counted = redis.call('ZLEXCOUNT', KEYS[1], ARGV[4], ARGV[5])
local members = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[2], ARGV[3])
for _, member in ipairs(members) do
  local id = string.match(member, ':0*(%d+)$')
  if id then
    local key = ARGV[1] .. 'message:' .. id
    if redis.call('EXISTS', key) == 1 then redis.call('HINCRBY', key, 'unread', -1) end
  end
end
if #members > 0 then
  redis.call('ZREMRANGEBYLEX', KEYS[1], ARGV[2], ARGV[3])
  redis.call('PUBLISH', ARGV[1] .. 'changes', string.match(KEYS[1], 'user:(%-?%d+):notifications$') or '*')
end
return counted
