-- Where each inbound partition is to be read again from, as the database
-- knows it: written in every batch's transaction, with the changes the batch
-- made. Every message before `next_offset` had its effects (or its dead
-- letter) committed before that transaction, so after a restore of the
-- database to an earlier point, the consumer group is rewound to these
-- offsets (`allocation-worker rewind-offsets`) instead of skipping what came
-- after the backup; the idempotency keys, restored with the same snapshot,
-- keep what is read twice from applying twice. Additive: older releases
-- neither read nor write it.
CREATE TABLE partition_positions (
    topic       TEXT        NOT NULL,
    partition   INTEGER     NOT NULL,
    next_offset BIGINT      NOT NULL CHECK (next_offset >= 0),
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);
