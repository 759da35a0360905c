-- `archive_store`, `inbox_store` and `deliver_once`: adds an existing message to each
-- user's archive and, in `inbox` mode, inbox; in `once` mode, to the inbox of only the users
-- whose archive did not have it yet. Returns how many archives (or inboxes) gained it, or
-- -1 when the message does not exist. The member comes from the hash, so the sets always
-- agree with the stored date.
--
-- KEYS: message hash. ARGV: prefix, 'archive', 'inbox' or 'once', user ids.
local member = redis.call('HGET', KEYS[1], 'member')
if not member then return -1 end
local prefix, mode = ARGV[1], ARGV[2]
local archived, unread = 0, 0
for i = 3, #ARGV do
  local user = prefix .. 'user:' .. ARGV[i]
  local new = redis.call('ZADD', user .. ':archive', 0, member)
  archived = archived + new
  if mode == 'inbox' or (mode == 'once' and new == 1) then
    unread = unread + redis.call('ZADD', user .. ':notifications', 0, member)
  end
end
redis.call('HINCRBY', KEYS[1], 'recipients', archived)
redis.call('HINCRBY', KEYS[1], 'unread', unread)
if unread > 0 then
  -- The users by name, MANY_USERS to a message (`Change::payloads`), or `*` for very many.
  if #ARGV - 2 > LISTED_USERS then
    redis.call('PUBLISH', prefix .. 'changes', '*')
  else
    for i = 3, #ARGV, MANY_USERS do
      redis.call('PUBLISH', prefix .. 'changes', table.concat(ARGV, ',', i, math.min(i + MANY_USERS - 1, #ARGV)))
    end
  end
end
if mode == 'archive' then return archived end
return unread
