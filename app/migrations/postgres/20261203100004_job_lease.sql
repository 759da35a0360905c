-- Several instances share the jobs: one works on a job at a time, holding a lease that it
-- renews after every chunk; a lease that expired (its instance died) is taken over.
alter table app_broadcast_jobs add column lease_owner text;
alter table app_broadcast_jobs add column lease_until_us bigint;
