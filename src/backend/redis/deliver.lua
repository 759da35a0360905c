-- `deliver`: writes the message hash and its index entry, then adds the member to the
-- archive and inbox of every user. The users are distinct, so every add is new.
--
-- KEYS: message hash, date index. ARGV: prefix, member, n, n hash field/value strings,
-- user ids.
local prefix, member, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
redis.call('HSET', KEYS[1], unpack(ARGV, 4, 3 + n))
redis.call('ZADD', KEYS[2], 0, member)
for i = 4 + n, #ARGV do
  local user = prefix .. 'user:' .. ARGV[i]
  redis.call('ZADD', user .. ':archive', 0, member)
  redis.call('ZADD', user .. ':notifications', 0, member)
end
local users = #ARGV - 3 - n
redis.call('HSET', KEYS[1], 'recipients', users, 'unread', users)
if users > 0 then
  -- The users by name, MANY_USERS to a message (`Change::payloads`), or `*` for very many.
  if users > LISTED_USERS then
    redis.call('PUBLISH', prefix .. 'changes', '*')
  else
    for i = 4 + n, #ARGV, MANY_USERS do
      redis.call('PUBLISH', prefix .. 'changes', table.concat(ARGV, ',', i, math.min(i + MANY_USERS - 1, #ARGV)))
    end
  end
end
return 0
