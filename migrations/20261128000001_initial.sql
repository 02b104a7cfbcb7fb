-- The allocation state, the read model, the idempotency records and the outbox.

-- One row per Product aggregate; version_number is the optimistic-concurrency guard.
CREATE TABLE products (
    sku            TEXT PRIMARY KEY,
    version_number BIGINT NOT NULL
);

-- id orders batches by creation, which breaks ties between equal ETAs.
CREATE TABLE batches (
    id                 BIGSERIAL PRIMARY KEY,
    reference          TEXT NOT NULL UNIQUE,
    sku                TEXT NOT NULL REFERENCES products (sku),
    purchased_quantity BIGINT NOT NULL CHECK (purchased_quantity >= 0),
    eta                DATE
);
CREATE INDEX batches_sku ON batches (sku);

-- id orders a batch's allocations by time, for LIFO deallocation. The unique
-- (orderid, sku) makes "a line is never allocated twice" a database fact too.
CREATE TABLE allocations (
    id       BIGSERIAL PRIMARY KEY,
    batch_id BIGINT NOT NULL REFERENCES batches (id),
    orderid  TEXT NOT NULL,
    sku      TEXT NOT NULL,
    qty      BIGINT NOT NULL CHECK (qty > 0),
    UNIQUE (orderid, sku)
);
CREATE INDEX allocations_batch ON allocations (batch_id);

-- The read model (CQRS): kept by event handlers in the same transaction.
CREATE TABLE allocations_view (
    orderid  TEXT NOT NULL,
    sku      TEXT NOT NULL,
    batchref TEXT NOT NULL,
    PRIMARY KEY (orderid, sku)
);

-- One row per inbound message applied or dead-lettered: a redelivery finds its
-- key here and changes nothing.
CREATE TABLE processed_messages (
    idempotency_key TEXT PRIMARY KEY,
    processed_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Transactional outbox: outbound events and dead letters, written with the
-- change that caused them and published in id order by the relay.
CREATE TABLE outbox (
    id            BIGSERIAL PRIMARY KEY,
    kind          TEXT NOT NULL,
    message_key   BYTEA,
    payload       BYTEA,
    header_names  TEXT[] NOT NULL,
    header_values BYTEA[] NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at       TIMESTAMPTZ
);
CREATE INDEX outbox_unsent ON outbox (id) WHERE sent_at IS NULL;
