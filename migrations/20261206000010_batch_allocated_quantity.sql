-- How much of each batch is allocated, kept in the batch's row, so that
-- loading a product reads its batches and not every line it ever had (the
-- cost of a message must not grow with the history behind it).
--
-- Statement-level triggers keep the column equal to the sum of the batch's
-- allocation rows, whoever writes them: this version, which writes only the
-- lines that changed, an older version still running during a rolling
-- upgrade (which knows nothing of the column), or a person in psql. The
-- sum is then a fact of the database, like the unique (orderid, sku).
-- Nothing is dropped or renamed: an older version reads and writes the
-- allocations as before.
ALTER TABLE batches ADD COLUMN allocated_quantity BIGINT NOT NULL DEFAULT 0;

UPDATE batches b SET allocated_quantity = s.total
FROM (SELECT batch_id, sum(qty) AS total FROM allocations GROUP BY batch_id) s
WHERE b.id = s.batch_id;

CREATE FUNCTION allocations_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE batches b SET allocated_quantity = b.allocated_quantity + s.total
    FROM (SELECT batch_id, sum(qty) AS total FROM added GROUP BY batch_id) s
    WHERE b.id = s.batch_id;
    RETURN NULL;
END
$$;

CREATE FUNCTION allocations_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE batches b SET allocated_quantity = b.allocated_quantity - s.total
    FROM (SELECT batch_id, sum(qty) AS total FROM removed GROUP BY batch_id) s
    WHERE b.id = s.batch_id;
    RETURN NULL;
END
$$;

CREATE FUNCTION allocations_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE batches b SET allocated_quantity = b.allocated_quantity + s.total
    FROM (SELECT batch_id, sum(q) AS total
          FROM (SELECT batch_id, qty AS q FROM added
                UNION ALL SELECT batch_id, -qty FROM removed) d
          GROUP BY batch_id) s
    WHERE b.id = s.batch_id AND s.total <> 0;
    RETURN NULL;
END
$$;

CREATE TRIGGER allocations_added AFTER INSERT ON allocations
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION allocations_added();
CREATE TRIGGER allocations_removed AFTER DELETE ON allocations
    REFERENCING OLD TABLE AS removed
    FOR EACH STATEMENT EXECUTE FUNCTION allocations_removed();
CREATE TRIGGER allocations_changed AFTER UPDATE ON allocations
    REFERENCING OLD TABLE AS removed NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION allocations_changed();

-- A quantity drop frees a batch's most recent lines first: this index reads
-- them newest first, as many as are freed, without touching the others.
-- (Not CONCURRENTLY: see 20261129000006_processed_messages_by_age.sql.)
CREATE INDEX allocations_batch_order ON allocations (batch_id, id);
