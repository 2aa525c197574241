-- Landing tables for the Kafka topics. Every row carries a deterministic id and is
-- de-duplicated by ReplacingMergeTree on it (a redelivered batch collapses into one row;
-- read with FINAL or through the views for exact counts at any moment), plus the source
-- Kafka partition/offset for lineage and for resuming the sink from the warehouse itself.

CREATE TABLE IF NOT EXISTS invoices
(
    invoice_id      String,
    account_id      String,
    subscription_id String,
    plan_id         LowCardinality(String),
    currency        LowCardinality(String),
    issued_at       DateTime64(6, 'UTC'),
    reason          LowCardinality(String),
    total           Decimal(38, 9),
    line_count      UInt16,
    payment_method  Nullable(String),
    _partition      UInt16,
    _offset         UInt64,
    _landed_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(issued_at)
ORDER BY (account_id, invoice_id);

CREATE TABLE IF NOT EXISTS invoice_lines
(
    invoice_id      String,
    line_no         UInt16,
    account_id      String,
    subscription_id String,
    currency        LowCardinality(String),
    issued_at       DateTime64(6, 'UTC'),
    charge_id       LowCardinality(String),
    kind            LowCardinality(String),
    period_start    DateTime64(6, 'UTC'),
    period_end      DateTime64(6, 'UTC'),
    quantity        Decimal(38, 9),
    amount          Decimal(38, 9)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(issued_at)
ORDER BY (invoice_id, line_no);

CREATE TABLE IF NOT EXISTS dead_letters
(
    dead_letter_id   String,
    source_topic     LowCardinality(String),
    source_partition UInt16,
    source_offset    UInt64,
    reason           LowCardinality(String),
    detail           String,
    processor        LowCardinality(String),
    failed_at        DateTime64(6, 'UTC'),
    key              Nullable(String),
    value            Nullable(String),
    _partition       UInt16,
    _offset          UInt64,
    _landed_at       DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (dead_letter_id);
