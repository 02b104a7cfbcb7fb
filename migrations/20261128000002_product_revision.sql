-- A fresh random number written with every change of a product. The worker
-- keeps products in memory between transactions and uses its copy only while
-- the row still carries the revision it wrote: unlike version_number, a
-- revision cannot be reached again by someone else's change, nor by a
-- transaction that rolled back.
ALTER TABLE products ADD COLUMN revision BIGINT NOT NULL DEFAULT 0;
