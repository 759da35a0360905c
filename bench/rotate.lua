-- wrk script for the many-users workloads: each request carries the next user's cookies,
-- read from the file named by the first script argument (one Cookie header value per line).
local cookies = {}
local next_user = 0

function init(args)
  for line in io.lines(args[1]) do
    if line ~= "" then cookies[#cookies + 1] = line end
  end
  assert(#cookies > 0, "no cookies in " .. args[1])
  -- threads start at different users
  next_user = math.random(#cookies) - 1
end

function request()
  next_user = next_user % #cookies + 1
  return wrk.format(nil, nil, { Cookie = cookies[next_user] })
end
