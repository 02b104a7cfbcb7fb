-- A BatchCreated for a reference that exists is a no-op when it carries the
-- data of the message that created the batch, even after the batch's
-- quantity was changed since; anything else is a duplicate-batch. The
-- quantity the batch was created with is kept for that comparison.
--
-- Rows written before this migration get their current quantity: what they
-- were created with was not stored. A batch whose quantity had been changed
-- before the upgrade is then compared with its changed quantity, as the
-- previous version did. The column stays nullable, read as
-- COALESCE(created_quantity, purchased_quantity), so that an instance of the
-- previous version still running during a rolling upgrade can insert batches.
ALTER TABLE batches ADD COLUMN created_quantity BIGINT
    CONSTRAINT batches_created_quantity_check CHECK (created_quantity >= 0);
UPDATE batches SET created_quantity = purchased_quantity;
