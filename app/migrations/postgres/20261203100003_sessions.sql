-- Server-side sessions: the session cookie holds only a random id; a session ends for good
-- (on every instance) when its row is gone or has expired.
create table app_sessions (
    id text primary key,
    user_id bigint not null references app_users (id) on delete cascade,
    created_us bigint not null,
    expires_us bigint not null
);
create index app_sessions_by_user on app_sessions (user_id);
