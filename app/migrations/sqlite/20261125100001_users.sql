-- Users of the reference app (the library itself owns no users). Versions of the app's
-- migrations start at ...100001 so they never collide with the library's.
create table app_users (
    id integer primary key autoincrement,
    username text not null unique,
    -- argon2id PHC string
    password_hash text not null,
    is_admin boolean not null default false,
    created_us integer not null
);
