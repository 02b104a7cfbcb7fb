-- no-transaction
-- Retention (README "Retention") deletes idempotency records oldest first, a
-- thousand at a time: this index finds them without reading the table. The
-- outbox needs none: its rows are taken in id order, which is their order of
-- creation, from the primary key.
--
-- CONCURRENTLY, so that a table of millions of rows (every message ever
-- processed, before retention existed) keeps taking writes while the index
-- builds. That cannot run inside a transaction, hence the first line, and
-- must be the file's only statement. Should the build fail half-way, it
-- leaves an invalid index that IF NOT EXISTS would keep: drop it
-- (DROP INDEX CONCURRENTLY processed_messages_processed_at) and migrate again.
CREATE INDEX CONCURRENTLY IF NOT EXISTS processed_messages_processed_at
    ON processed_messages (processed_at);
