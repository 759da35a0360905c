-- Stored messages: each message once in sm_messages, one sm_deliveries row per recipient.
-- A delivery row is the recipient's archive entry; in_inbox marks it unread. Dates are
-- integer microseconds since the Unix epoch, as in the PostgreSQL schema.

create table sm_messages (
    -- autoincrement: ids are never reused, even after the newest message is deleted, so a
    -- client's cursor or a stale "mark read" can never hit a different message.
    id integer primary key autoincrement,
    level integer not null,
    message text not null,
    extra_tags text not null default '',
    url text,
    date_us integer not null
);

-- Cleanup finds expired messages by date.
create index sm_messages_date on sm_messages (date_us);

create table sm_deliveries (
    user_id integer not null,
    -- Copy of the message's date: the key below then orders a user's archive by date.
    date_us integer not null,
    message_id integer not null,
    in_inbox boolean not null,
    read_us integer,
    -- A message has one date, so this key is unique per (user, message) and is the archive
    -- listing order; without rowid, the table is stored in that order.
    primary key (user_id, date_us, message_id)
) without rowid;

-- The inbox: only unread rows, so listing it costs what is unread, not the whole archive.
create index sm_deliveries_inbox on sm_deliveries (user_id, date_us, message_id) where in_inbox;

-- Deleting or expiring a message, and counting its recipients, go by message.
create index sm_deliveries_message on sm_deliveries (message_id);
