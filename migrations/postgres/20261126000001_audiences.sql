-- Broadcast audiences: a message sent to a run of consecutive user ids (at least
-- `audience_min_run` of them, 256 by default) is stored once per run instead of once per
-- user, which is what makes a broadcast to a million users one small insert. A covered
-- user's own state lives in sm_deliveries only once it exists: a row there (a read marker,
-- or a message stored again) takes precedence over the run. A covered user without a row
-- has the message unread in the inbox (until it expires) and in the archive.

create table sm_audiences (
    message_id bigint not null,
    -- first_user >> 16: a run never crosses a bucket, so the runs covering a user are
    -- found within the user's bucket instead of among every run ever sent.
    bucket bigint not null,
    first_user bigint not null,
    last_user bigint not null,
    -- Copy of the message's date, as in sm_deliveries.
    date_us bigint not null,
    -- Set by cleanup once the message is too old for inboxes, so expired inbox entries are
    -- counted once.
    expired boolean not null default false,
    primary key (bucket, first_user, message_id)
);

-- Listing a user's inbox or archive walks the runs of the user's bucket in date order and
-- stops after one page of runs that cover the user; the index carries the run's bounds, so
-- runs that do not cover the user are skipped without reading the table.
create index sm_audiences_by_date on sm_audiences (bucket, date_us, message_id, first_user, last_user);

-- Deleting, counting and expiring go by message.
create index sm_audiences_message on sm_audiences (message_id);
