-- Broadcast jobs (large broadcasts run in the background, chunk by chunk, and resume after
-- a restart) and the audit trail of every broadcast.
create table app_broadcast_jobs (
    id integer primary key autoincrement,
    message_id integer not null,
    -- the message itself (JSON), so a resumed job needs no lookup
    message text not null,
    created_by integer not null,
    created_us integer not null,
    -- 'everyone': users with ids up to max_user_id (those that existed when it was sent);
    -- 'list': the ids in user_ids (a JSON array).
    audience text not null,
    max_user_id integer not null,
    user_ids text not null default '[]',
    total integer not null,
    delivered integer not null default 0,
    -- Last user id whose chunk is done; the job resumes after it.
    cursor integer not null default 0,
    -- 'running', 'done' or 'failed'
    status text not null,
    error text,
    finished_us integer
);

create table app_audit (
    id integer primary key autoincrement,
    actor_id integer not null,
    actor text not null,
    at_us integer not null,
    level integer not null,
    message text not null,
    audience text not null,
    audience_size integer not null,
    message_id integer not null,
    duration_ms integer,
    job_id integer
);

-- The audit page lists the newest first.
create index app_audit_at on app_audit (at_us);
