-- A relay that scales out, and a row that cannot be published set aside
-- instead of wedging its SKU (docs/design.md, "Relay").
--
-- Additive only: an instance of the previous version keeps working beside
-- this one during a rolling upgrade. It inserts pending ids without a shard
-- (NULL, which the new relay reads through the outbox row's key), and its
-- relay takes the old single lock exclusively, which the new relays hold
-- shared while they run: the two generations never publish at once.

-- The shard of a message key: one of 32, from the first byte of its SHA-256,
-- so the same on every instance and every version. Rows of one key share a
-- shard, and one relay at a time publishes a shard: per-key order holds.
CREATE FUNCTION outbox_shard(message_key BYTEA) RETURNS SMALLINT
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (get_byte(sha256(COALESCE(message_key, ''::bytea)), 0) % 32)::smallint
$$;

-- Written with the pending id by the worker (src/adapters/postgres/writes.rs);
-- NULL when written by the previous version.
ALTER TABLE outbox_pending ADD COLUMN shard SMALLINT;

UPDATE outbox_pending p SET shard = outbox_shard(o.message_key)
FROM outbox o WHERE o.id = p.id;

-- A relay reads the pending ids of one shard in id order; the NULL ones too.
CREATE INDEX outbox_pending_shard ON outbox_pending (shard, id);

-- One row per shard: the fence of the relay that last sent its records. A
-- relay writes `in_flight_until` (now + more than the producer's delivery
-- timeout) before it hands records over, and clears it once every one of
-- them is settled. A relay that takes a shard over and finds the time in the
-- future, written by another `holder`, publishes nothing of that shard until
-- then: a copy still in flight from the previous holder (whose lock ended
-- with its session) cannot land after the new holder's.
CREATE TABLE outbox_relay_shards (
    shard           SMALLINT PRIMARY KEY,
    holder          BIGINT,
    in_flight_until TIMESTAMPTZ
);

INSERT INTO outbox_relay_shards (shard) SELECT generate_series(0, 31);

-- Outbox rows the relay could not publish after bounded attempts (too large,
-- refused by the broker, a kind this version does not know): a copy of the
-- row, why, and how often it was tried. Their ids are no longer pending, so
-- they hold up neither their SKU nor retention (which may delete the outbox
-- row: the copy here is what `outbox-quarantine retry` publishes again).
CREATE TABLE outbox_quarantine (
    id             BIGINT PRIMARY KEY, -- the outbox row's id
    kind           TEXT NOT NULL,
    message_key    BYTEA,
    payload        BYTEA,
    headers        BYTEA NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL,
    quarantined_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempts       INT NOT NULL,
    error          TEXT NOT NULL
);
