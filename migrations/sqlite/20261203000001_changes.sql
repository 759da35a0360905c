-- The change log: SQLite cannot notify other processes, so every write that changes inboxes
-- adds one row here, in its own transaction, naming the users whose inbox changed ('1,2,3',
-- or '*' for everyone). Each process's change feed reads the rows after the last one it saw,
-- which tells its inbox cache (and live pages) what changed, in commit order: SQLite has one
-- writer at a time, and `autoincrement` never reuses a number, so rows appear in `seq`
-- order with no gaps. The feeds prune rows older than a few minutes, keeping the newest.
create table sm_changes (
    seq integer primary key autoincrement,
    users text not null,
    date_us integer not null
);
