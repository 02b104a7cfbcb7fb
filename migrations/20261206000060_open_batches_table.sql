-- Which batches have stock left moves from a partial index on `batches`
-- (20261206000050) to a narrow table of their ids, kept by triggers.
--
-- Why: the partial index's predicate names `allocated_quantity`, which the
-- triggers on `allocations` update for every batch a transaction allocates
-- from or frees. An update of an indexed column is never HOT: each one
-- wrote a new entry in every index of `batches` (0 HOT updates of 1,021,196
-- in a 90-minute soak), and the transaction's write cost 1.23 ms a call
-- against 0.93 before the index (BENCHMARKS.md). Without it no index of
-- `batches` names the sums, so their updates can be HOT again: the row's
-- new version stays on its page and no index is written. The fill factor
-- leaves the room on new pages that a HOT update needs.
--
-- A batch is in `open_batches` exactly when purchased_quantity >
-- allocated_quantity. The triggers below keep it so whoever writes
-- `batches`: this version, an older one during a rolling upgrade (which
-- reads `batches` as before: its load's predicate still holds, read
-- through `batches_sku`), or a person in psql. They fire only when a batch
-- crosses between having stock and not, which is rare beside the updates
-- that do not cross.
--
-- Additive: a new table and triggers, an index dropped (nothing reads it by
-- name), a storage parameter. Not CONCURRENTLY: see
-- 20261129000006_processed_messages_by_age.sql.
CREATE TABLE open_batches (
    sku      TEXT   NOT NULL,
    batch_id BIGINT NOT NULL,
    PRIMARY KEY (sku, batch_id)
);

CREATE FUNCTION batch_opened() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO open_batches (sku, batch_id) VALUES (NEW.sku, NEW.id)
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

CREATE FUNCTION batch_crossed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM open_batches WHERE sku = OLD.sku AND batch_id = OLD.id;
    IF NEW.purchased_quantity > NEW.allocated_quantity THEN
        INSERT INTO open_batches (sku, batch_id) VALUES (NEW.sku, NEW.id)
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION batch_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM open_batches WHERE sku = OLD.sku AND batch_id = OLD.id;
    RETURN NULL;
END
$$;

-- Under the same lock as the rows they follow: a writer of a batch holds
-- its row lock until it commits, and these write in its transaction.
LOCK TABLE batches IN SHARE ROW EXCLUSIVE MODE;

INSERT INTO open_batches (sku, batch_id)
SELECT sku, id FROM batches WHERE purchased_quantity > allocated_quantity;

CREATE TRIGGER batch_opened AFTER INSERT ON batches
    FOR EACH ROW WHEN (NEW.purchased_quantity > NEW.allocated_quantity)
    EXECUTE FUNCTION batch_opened();
CREATE TRIGGER batch_crossed AFTER UPDATE ON batches
    FOR EACH ROW WHEN (
        (OLD.purchased_quantity > OLD.allocated_quantity)
            IS DISTINCT FROM (NEW.purchased_quantity > NEW.allocated_quantity)
        OR OLD.sku IS DISTINCT FROM NEW.sku
        OR OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE FUNCTION batch_crossed();
CREATE TRIGGER batch_removed AFTER DELETE ON batches
    FOR EACH ROW EXECUTE FUNCTION batch_removed();

DROP INDEX IF EXISTS batches_open;

ALTER TABLE batches SET (fillfactor = 90);
