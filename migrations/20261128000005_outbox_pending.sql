-- Which outbox rows are still to be published moves out of the rows
-- themselves. Marking a row sent by setting sent_at rewrote the whole row
-- and its primary-key entry (the partial index on sent_at rules out a HOT
-- update), and cost the relay more than the insert had cost the worker. Now
-- every outbox row is inserted with its id in outbox_pending, and the relay
-- deletes those ids once the broker has acknowledged the rows: an outbox row
-- is written once and never changed (bar a too-large dead letter's value).
--
-- Unsent rows:      SELECT o.* FROM outbox_pending p JOIN outbox o USING (id)
-- The last marking: SELECT marked_at FROM outbox_relay
--
-- Stop instances of the previous version before this runs: they read and
-- write sent_at, which is gone.
CREATE TABLE outbox_pending (
    id BIGINT PRIMARY KEY -- an outbox id; no foreign key, whose check would cost a lookup per row
);

INSERT INTO outbox_pending (id) SELECT id FROM outbox WHERE sent_at IS NULL;

-- One row: when the relay last marked rows sent (the database's clock).
CREATE TABLE outbox_relay (
    only_row  BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
    marked_at TIMESTAMPTZ
);

INSERT INTO outbox_relay (marked_at) SELECT max(sent_at) FROM outbox;

DROP INDEX outbox_unsent;
ALTER TABLE outbox DROP COLUMN sent_at;
