-- Two analysts' views, corrected.

-- subscriptions: cancelled_at is NULL while a subscription has no cancellation (minIf
-- over no row gave 1970-01-01)
CREATE OR REPLACE VIEW subscriptions AS
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
    minIfOrNull(timestamp, type = 'subscription.cancelled') AS cancelled_at,
    argMaxIf(payment_method, (timestamp, _offset), payment_method IS NOT NULL) AS payment_method,
    max(timestamp) AS updated_at
FROM subscription_events FINAL
WHERE (_partition, _offset) NOT IN (
    SELECT source_partition, source_offset FROM dead_letters FINAL
    WHERE source_topic LIKE '%billing.subscriptions' AND processor = 'rating'
)
GROUP BY subscription_id;

-- mrr_monthly: every month, from a currency's first MRR movement to the last movement of
-- any currency; a month without movement carries the MRR over with zero movements
CREATE OR REPLACE VIEW mrr_monthly AS
WITH
    movements AS (
        SELECT toStartOfMonth(at) AS month, currency,
               sumIf(delta, movement = 'new') AS new,
               sumIf(delta, movement = 'expansion') AS expansion,
               sumIf(delta, movement = 'contraction') AS contraction,
               sumIf(delta, movement = 'churn') AS churn,
               sum(delta) AS net
        FROM mrr_changes
        GROUP BY month, currency
    ),
    months AS (
        SELECT currency,
               arrayJoin(arrayMap(i -> addMonths(first, i),
                                  range(toUInt32(dateDiff('month', first, last) + 1)))) AS month
        FROM (
            SELECT currency, min(month) AS first, (SELECT max(month) FROM movements) AS last
            FROM movements
            GROUP BY currency
        )
    )
SELECT
    month,
    currency,
    sum(net) OVER (PARTITION BY currency ORDER BY month
                   ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS mrr,
    new, expansion, contraction, churn, net
FROM months
LEFT JOIN movements USING (month, currency)
SETTINGS join_use_nulls = 0;
