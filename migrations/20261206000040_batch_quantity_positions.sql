-- Where the last quantity change applied to each batch stands in the order
-- of the partition it came from: its offset, or, for a change replayed from
-- the dead-letter topic, the offset it was first read at. A replayed change
-- older than the last one applied from its partition is not applied, so a
-- replay never overwrites a later change (contract §7). Written in the
-- batch's transaction. Offsets of different partitions are not comparable,
-- hence one row per batch and partition.
--
-- Additive only: an older binary neither reads nor writes it.
CREATE TABLE batch_quantity_positions (
    batch_ref      TEXT    NOT NULL,
    topic          TEXT    NOT NULL,
    partition      INTEGER NOT NULL,
    applied_offset BIGINT  NOT NULL,
    PRIMARY KEY (batch_ref, topic, partition)
);
