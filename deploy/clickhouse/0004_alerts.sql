-- Alert notifications (billing.alerts): one row per firing and per resolution.
CREATE TABLE IF NOT EXISTS alerts
(
    alert_id   String,
    rule       LowCardinality(String),
    state      LowCardinality(String),
    severity   LowCardinality(String),
    value      Nullable(Decimal(38, 9)),
    threshold  Decimal(38, 9),
    summary    String,
    at         DateTime64(6, 'UTC'),
    _partition UInt16,
    _offset    UInt64,
    _landed_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (rule, at, alert_id);
