-- Store-wide leases: which of several processes does a periodic task (cleanup) this time.
create table sm_leases (
    name text primary key,
    until_us bigint not null
);
