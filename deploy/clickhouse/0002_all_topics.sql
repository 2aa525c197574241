-- Every topic lands, plus the catalog as a dimension. Raw event tables are keyed by
-- their Kafka coordinates (_partition, _offset) last in ORDER BY, so a re-landed batch
-- collapses into one row per message under ReplacingMergeTree (read with FINAL or the
-- views below), while the leading ORDER BY columns serve the analysts' filters.
--
-- The sink's progress moves from max(_offset) of one table per topic to sink_offsets,
-- written after every table of a batch: a batch spanning several PARTITION BY parts is
-- not inserted atomically, so a table's max(_offset) could run ahead of rows not landed.

CREATE TABLE IF NOT EXISTS sink_offsets
(
    topic        LowCardinality(String),  -- base name, without the namespace prefix
    partition    UInt16,
    next_offset  UInt64,
    landed_at    DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(next_offset)
ORDER BY (topic, partition);

-- warehouses from before sink_offsets resume where their landing tables say
INSERT INTO sink_offsets (topic, partition, next_offset)
SELECT 'billing.invoices', _partition, max(_offset) + 1 FROM invoices GROUP BY _partition;

INSERT INTO sink_offsets (topic, partition, next_offset)
SELECT 'billing.dead-letter', _partition, max(_offset) + 1 FROM dead_letters GROUP BY _partition;

-- recurring (flat, in advance) and usage (in arrears) parts of the total; proration
-- lines count as recurring
ALTER TABLE invoices
    ADD COLUMN IF NOT EXISTS recurring_total Decimal(38, 9) DEFAULT 0 AFTER total,
    ADD COLUMN IF NOT EXISTS usage_total Decimal(38, 9) DEFAULT 0 AFTER recurring_total;

CREATE TABLE IF NOT EXISTS subscription_events
(
    event_id        String,
    type            LowCardinality(String),
    timestamp       DateTime64(6, 'UTC'),
    account_id      String,
    subscription_id String,
    plan_id         LowCardinality(Nullable(String)),
    mode            LowCardinality(Nullable(String)),
    payment_method  Nullable(String),  -- a gateway token, never card data
    _partition      UInt16,
    _offset         UInt64,
    _landed_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (account_id, subscription_id, timestamp, _partition, _offset);

CREATE TABLE IF NOT EXISTS usage_events
(
    event_id        String,
    timestamp       DateTime64(6, 'UTC'),
    account_id      String,
    subscription_id String,
    metric          LowCardinality(String),
    quantity        Decimal(38, 9),
    _partition      UInt16,
    _offset         UInt64,
    _landed_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (subscription_id, metric, timestamp, _partition, _offset);

CREATE TABLE IF NOT EXISTS payment_attempts
(
    payment_id        String,
    invoice_id        String,
    account_id        String,
    attempt           UInt16,
    status            LowCardinality(String),
    amount            Decimal(38, 9),
    currency          LowCardinality(String),
    gateway_account   LowCardinality(String),
    gateway_reference Nullable(String),
    decline_code      LowCardinality(Nullable(String)),
    latency_ms        Float64,
    completed_at      DateTime64(6, 'UTC'),
    _partition        UInt16,
    _offset           UInt64,
    _landed_at        DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(completed_at)
ORDER BY (invoice_id, payment_id);

CREATE TABLE IF NOT EXISTS refunds
(
    refund_id         String,
    invoice_id        String,
    account_id        String,
    status            LowCardinality(String),
    amount            Decimal(38, 9),
    currency          LowCardinality(String),
    reason            Nullable(String),
    gateway_reference Nullable(String),
    requested_at      DateTime64(6, 'UTC'),
    completed_at      DateTime64(6, 'UTC'),
    _partition        UInt16,
    _offset           UInt64,
    _landed_at        DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(requested_at)
ORDER BY (invoice_id, refund_id);

CREATE TABLE IF NOT EXISTS entitlements
(
    entitlement_id  String,
    account_id      String,
    subscription_id String,
    action          LowCardinality(String),
    cause           String,
    timestamp       DateTime64(6, 'UTC'),
    _partition      UInt16,
    _offset         UInt64,
    _landed_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (account_id, subscription_id, entitlement_id);

-- the catalog the rating processor prices with, loaded by the sink at start
CREATE TABLE IF NOT EXISTS plans
(
    plan_id       String,
    currency      LowCardinality(String),
    interval      LowCardinality(String),
    flat_amount   Decimal(38, 9),  -- recurring charges per period
    mrr           Decimal(38, 9),  -- the same per month (yearly / 12)
    charges       String,          -- the plan's charges as JSON
    loaded_at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(loaded_at)
ORDER BY plan_id;

-- --- views for analysts -------------------------------------------------------------

-- current state of every subscription, from its accepted lifecycle events (events the
-- rating processor dead-lettered are left out)
CREATE VIEW IF NOT EXISTS subscriptions AS
SELECT
    subscription_id,
    any(account_id) AS account_id,
    argMaxIf(plan_id, (timestamp, _offset), plan_id IS NOT NULL) AS plan_id,
    minIf(timestamp, type = 'subscription.created') AS created_at,
    multiIf(
        countIf(type = 'subscription.cancelled' AND mode = 'immediate') > 0, 'cancelled',
        countIf(type = 'subscription.cancelled') > 0, 'cancelling',
        'active'
    ) AS status,
    minIf(timestamp, type = 'subscription.cancelled') AS cancelled_at,
    argMaxIf(payment_method, (timestamp, _offset), payment_method IS NOT NULL) AS payment_method,
    max(timestamp) AS updated_at
FROM subscription_events FINAL
WHERE (_partition, _offset) NOT IN (
    SELECT source_partition, source_offset FROM dead_letters FINAL
    WHERE source_topic LIKE '%billing.subscriptions' AND processor = 'rating'
)
GROUP BY subscription_id;

CREATE VIEW IF NOT EXISTS revenue_daily AS
SELECT
    toDate(issued_at) AS day,
    currency,
    plan_id,
    count() AS invoices,
    sum(total) AS revenue,
    sum(recurring_total) AS recurring,
    sum(usage_total) AS usage
FROM invoices FINAL
GROUP BY day, currency, plan_id;

-- one row per MRR change: a subscription created (new), moved to a dearer or cheaper
-- plan (expansion, contraction), or ended (churn: immediate cancellation, or the last
-- invoice of an end-of-period cancellation, the one that bills no recurring charge).
-- Derived from invoices, i.e. from what the rating processor accepted.
CREATE VIEW IF NOT EXISTS mrr_changes AS
WITH
    plan_mrr AS (SELECT plan_id, argMax(mrr, loaded_at) AS mrr FROM plans GROUP BY plan_id),
    priced AS (
        SELECT i.subscription_id AS subscription_id, i.account_id AS account_id,
               i.currency AS currency, i.issued_at AS at, i.reason AS reason,
               i.recurring_total AS recurring_total, p.mrr AS mrr
        FROM invoices AS i FINAL
        LEFT JOIN plan_mrr AS p ON p.plan_id = i.plan_id
    ),
    starts AS (
        SELECT subscription_id, account_id, currency, at, reason,
               mrr - lagInFrame(mrr, 1, toDecimal128(0, 9)) OVER (
                   PARTITION BY subscription_id ORDER BY at, reason
                   ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
               ) AS delta
        FROM priced
        WHERE reason IN ('created', 'plan_changed')
    )
SELECT subscription_id, account_id, currency, at,
       if(reason = 'created', 'new', if(delta >= 0, 'expansion', 'contraction')) AS movement,
       delta
FROM starts
WHERE delta != 0 OR reason = 'created'
UNION ALL
SELECT subscription_id, account_id, currency, at, 'churn' AS movement, -mrr AS delta
FROM priced
WHERE reason = 'cancelled' OR (reason = 'period_end' AND recurring_total = 0 AND mrr > 0);

CREATE VIEW IF NOT EXISTS mrr_monthly AS
SELECT
    month,
    currency,
    sum(net) OVER (PARTITION BY currency ORDER BY month
                   ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS mrr,
    new, expansion, contraction, churn, net
FROM (
    SELECT toStartOfMonth(at) AS month, currency,
           sumIf(delta, movement = 'new') AS new,
           sumIf(delta, movement = 'expansion') AS expansion,
           sumIf(delta, movement = 'contraction') AS contraction,
           sumIf(delta, movement = 'churn') AS churn,
           sum(delta) AS net
    FROM mrr_changes
    GROUP BY month, currency
);

CREATE VIEW IF NOT EXISTS payment_success_daily AS
SELECT
    toDate(completed_at) AS day,
    gateway_account,
    count() AS attempts,
    countIf(status = 'succeeded') AS succeeded,
    countIf(status = 'declined') AS declined,
    countIf(status = 'failed') AS failed,
    round(succeeded / attempts, 4) AS success_rate
FROM payment_attempts FINAL
WHERE status != 'uncollectible'  -- a dunning verdict, not a gateway call
GROUP BY day, gateway_account;

-- invoices with an amount due that no successful payment has settled and that dunning
-- has not written off, by age
CREATE VIEW IF NOT EXISTS receivables_aging AS
WITH settled AS (
    SELECT invoice_id,
           countIf(status IN ('succeeded', 'uncollectible')) > 0 AS closed,
           countIf(status = 'declined') AS declines
    FROM payment_attempts FINAL
    GROUP BY invoice_id
)
SELECT
    currency,
    multiIf(age_days <= 30, '0-30', age_days <= 60, '31-60', age_days <= 90, '61-90', '90+')
        AS age_bucket,
    count() AS invoices,
    sum(total) AS amount_due,
    countIf(declines > 0) AS in_dunning
FROM (
    SELECT i.currency AS currency, i.total AS total, s.declines AS declines,
           dateDiff('day', i.issued_at, now64(6, 'UTC')) AS age_days
    FROM invoices AS i FINAL
    LEFT JOIN settled AS s ON s.invoice_id = i.invoice_id
    WHERE i.total > 0 AND NOT s.closed
)
GROUP BY currency, age_bucket;

CREATE VIEW IF NOT EXISTS usage_daily AS
SELECT
    toDate(timestamp) AS day,
    metric,
    count() AS events,
    uniqExact(subscription_id) AS subscriptions,
    sum(quantity) AS quantity
FROM (
    -- a retried event (same subscription and event_id) counts once: the first landed,
    -- as the rating processor counts it
    SELECT subscription_id, event_id,
           argMin(metric, (_partition, _offset)) AS metric,
           argMin(timestamp, (_partition, _offset)) AS timestamp,
           argMin(quantity, (_partition, _offset)) AS quantity
    FROM usage_events FINAL
    GROUP BY subscription_id, event_id
)
GROUP BY day, metric;

CREATE VIEW IF NOT EXISTS dead_letters_hourly AS
SELECT
    toStartOfHour(failed_at) AS hour,
    reason,
    processor,
    count() AS dead_letters
FROM dead_letters FINAL
GROUP BY hour, reason, processor;
