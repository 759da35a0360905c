-- Flash messages that did not fit their cookie wait here under a random key (the browser
-- keeps only the key) until they are shown or expire.
create table sm_flash_spill (
    key text primary key,
    payload text not null,
    expires_us bigint not null
);
