-- allocations_batch (batch_id) is a prefix of allocations_batch_order
-- (batch_id, id), which answers every lookup by batch the first did (the
-- foreign key's check when a batch row is deleted among them), so it only
-- cost a fourth index entry to write for every line allocated.
--
-- Additive for a rolling upgrade: no statement of any version names the
-- index. DROP INDEX takes an ACCESS EXCLUSIVE lock on allocations for an
-- instant (deploy/README.md, upgrade notes).
DROP INDEX IF EXISTS allocations_batch;
