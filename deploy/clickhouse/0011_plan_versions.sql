-- plans becomes the catalog's version history: one row per (plan, version), every version
-- kept, landed from billing.catalog (streams/catalog_history.py: one record per plan, each
-- carrying the plan's whole history). A record re-lands every version of its plan; the rows
-- of the newest record win (ReplacingMergeTree by updated_at, the history's last change: a
-- publication or the retirement, never earlier in a later record), so re-landing a record
-- changes nothing. The sink also writes, at its start, the catalog file's plans that
-- billing.catalog does not have, as their version 1 in effect since always (the version
-- the rating processor prices with; _partition and _offset NULL): a record of the plan
-- landed later replaces that row. The former plans table (one row per plan of the catalog
-- file, loaded at the sink's start) goes, and the two views that read it are replaced.
DROP TABLE IF EXISTS plans;

CREATE TABLE IF NOT EXISTS plans
(
    plan_id       String,
    version       UInt32 DEFAULT 1,
    published_at  DateTime64(6, 'UTC') DEFAULT toDateTime64(0, 6, 'UTC'),  -- takes effect
    existing      LowCardinality(String) DEFAULT 'keep',  -- keep | next_period
    currency      LowCardinality(String),
    interval      LowCardinality(String),
    trial_days    UInt32 DEFAULT 0,
    flat_amount   Decimal(38, 9),  -- recurring charges per period
    mrr           Decimal(38, 9),  -- the same per month (yearly / 12)
    charges       String DEFAULT '[]',  -- the version's charges as JSON
    plan          String DEFAULT '',    -- the whole version as the catalog file writes it
    retired_at    Nullable(DateTime64(6, 'UTC')),  -- the plan's (on every version's row)
    updated_at    DateTime64(6, 'UTC') DEFAULT published_at,
    _partition    Nullable(UInt16),
    _offset       Nullable(UInt64),
    _landed_at    DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (plan_id, version);

-- each plan as it is now: its latest version (`version` is also how many it has)
CREATE VIEW IF NOT EXISTS plans_current AS
SELECT plan_id, version, published_at, existing, currency, interval, trial_days,
       flat_amount, mrr, charges, plan, retired_at
FROM plans FINAL
ORDER BY plan_id, version DESC
LIMIT 1 BY plan_id;

-- as in 0002 (mrr_monthly reads it), with plan versions: a creation or a plan change
-- starts at the MRR of the plan's version in effect when it was invoiced (the latest
-- published at or before it); a churn takes away the MRR of the subscription's last start
-- (a subscription keeps its version when a newer one is published with existing = keep)
CREATE OR REPLACE VIEW mrr_changes AS
WITH
    plan_versions AS (
        SELECT plan_id, arraySort(groupArray((version, published_at, mrr))) AS versions
        FROM plans FINAL GROUP BY plan_id
    ),
    issued AS (
        SELECT i.subscription_id AS subscription_id, i.account_id AS account_id,
               i.currency AS currency, i.issued_at AS at, i.reason AS reason,
               i.recurring_total AS recurring_total,
               arrayLast(v -> v.2 <= i.issued_at, p.versions).3 AS mrr_at_issue
        FROM invoices AS i FINAL
        LEFT JOIN plan_versions AS p ON p.plan_id = i.plan_id
    ),
    priced AS (
        SELECT subscription_id, account_id, currency, at, reason, recurring_total,
               ifNull(last_value(if(reason IN ('created', 'plan_changed'), mrr_at_issue, NULL))
                   OVER (PARTITION BY subscription_id ORDER BY at, reason
                         ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW),
                      toDecimal128(0, 9)) AS mrr
        FROM issued
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

-- as in 0009, with plan versions: a subscription is billed the flat amount of the version
-- it took with its plan (the latest published at or before its creation or last plan
-- change, as invoiced), or, from the first period end after a newer version was published
-- with existing = next_period, of the latest such version published before that end
CREATE OR REPLACE VIEW upcoming_invoices AS
WITH
    now64(6, 'UTC') AS t0,
    plan AS (
        SELECT plan_id, any(currency) AS currency, any(interval) AS interval,
               arraySort(groupArray((version, published_at, existing, flat_amount)))
                   AS versions
        FROM plans FINAL GROUP BY plan_id
    ),
    taken AS (
        SELECT subscription_id,
               maxIf(issued_at, reason IN ('created', 'plan_changed')) AS plan_since
        FROM invoices FINAL GROUP BY subscription_id
    ),
    live AS (
        SELECT s.subscription_id AS subscription_id, s.account_id AS account_id,
               s.plan_id AS plan_id, s.status AS status, s.cancelled_at AS cancelled_at,
               s.payment_method AS payment_method, p.currency AS currency,
               p.versions AS versions,
               greatest(s.created_at, t.plan_since) AS since,
               arrayMap(k -> if(p.interval = 'year', addYears(s.created_at, k),
                                addMonths(s.created_at, k)),
                        range(1, toUInt32(if(p.interval = 'year',
                                             dateDiff('year', s.created_at, t0) + 4,
                                             dateDiff('month', s.created_at, t0) + 26)))) AS ends
        FROM subscriptions AS s
        INNER JOIN plan AS p ON p.plan_id = s.plan_id
        LEFT JOIN taken AS t ON t.subscription_id = s.subscription_id
        WHERE s.status IN ('active', 'cancelling')
    )
SELECT subscription_id, account_id, plan_id, currency, due_at,
       -- the last version taken (published at or before since) or moved to (published
       -- with next_period after since and before this end): versions are in order
       if(status = 'cancelling', toDecimal128(0, 9),
          arrayLast(v -> v.2 <= since
                         OR (v.3 = 'next_period' AND v.2 > since AND v.2 < due_at),
                    versions).4) AS recurring_amount,
       payment_method IS NOT NULL AS has_payment_method,
       if(status = 'cancelling', 'cancelled', 'period_end') AS reason
FROM live
ARRAY JOIN arrayFilter(e -> e > t0 AND e <= t0 + INTERVAL 731 DAY,
                       if(status = 'cancelling',
                          arraySlice(arrayFilter(e -> e > cancelled_at, ends), 1, 1),
                          ends)) AS due_at;
