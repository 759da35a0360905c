-- `inbox_delete_many`: removes each message from the inbox when it is there and not
-- expired; returns the ids removed. The bound check is the one `GET` makes.
--
-- KEYS: inbox. ARGV: prefix, the inbox's inclusive lower bound, message ids.
local removed = {}
for i = 3, #ARGV do
  local member = redis.call('HGET', ARGV[1] .. 'message:' .. ARGV[i], 'member')
  if member and redis.call('ZLEXCOUNT', KEYS[1], ARGV[2], '[' .. member) > 0
     and redis.call('ZREM', KEYS[1], member) == 1 then
    redis.call('HINCRBY', ARGV[1] .. 'message:' .. ARGV[i], 'unread', -1)
    removed[#removed + 1] = ARGV[i]
  end
end
if #removed > 0 then
  redis.call('PUBLISH', ARGV[1] .. 'changes', string.match(KEYS[1], 'user:(%-?%d+):notifications$') or '*')
end
return removed
