-- Retention (README "Retention") deletes idempotency records oldest first, a
-- thousand at a time: this index finds them without reading the table. The
-- outbox needs none: its rows are taken in id order, which is their order of
-- creation, from the primary key.
--
-- Not CONCURRENTLY, although a plain build holds writes to the table while
-- it runs (seconds for millions of rows): the migrator holds an advisory
-- lock for the whole run, and a concurrent build waits for every other
-- session's snapshot, including that of a second instance waiting for the
-- same lock in `SELECT pg_advisory_lock(…)`. Two instances starting at once
-- then deadlock (seen in the two-instance fault test).
CREATE INDEX IF NOT EXISTS processed_messages_processed_at
    ON processed_messages (processed_at);
