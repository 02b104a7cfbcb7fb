-- A product is loaded as its batches with stock left: those a decision can
-- choose (contract §6.9: the cost of a message does not grow with its
-- history). A popular SKU restocked every day gains a batch a day, nearly
-- all of them taken in full within days; reading them all on every load
-- made a load cost more each week. This index holds only the batches with
-- something available, so a load reads those rows and no other. A batch
-- taken in full leaves it when its last unit is allocated; a quantity raise
-- or a freed line brings it back. A message that names a batch taken in
-- full (a quantity change, a creation delivered again, a line allocated to
-- it) reads that batch by reference.
--
-- Additive: an older binary during a rolling upgrade reads every batch by
-- `batches_sku`, as before. Not CONCURRENTLY: see
-- 20261129000006_processed_messages_by_age.sql.
CREATE INDEX IF NOT EXISTS batches_open ON batches (sku, id)
    WHERE purchased_quantity > allocated_quantity;
