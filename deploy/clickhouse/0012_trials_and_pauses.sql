-- The lifecycle of the rating contract's version 2 for analysts: trials and pauses.

-- subscriptions: status is also `trialing` (created on a plan version with trial_days,
-- its trial not over: trial_ends_at, the creation + trial_days) and `paused` (its last
-- pause or resume is a pause); events of an account (credit.granted, customer.updated:
-- no subscription) are not subscriptions
CREATE OR REPLACE VIEW subscriptions AS
WITH
    plan_versions AS (
        SELECT plan_id, arraySort(groupArray((version, published_at, trial_days))) AS versions
        FROM plans FINAL GROUP BY plan_id
    ),
    events AS (
        SELECT
            subscription_id,
            any(account_id) AS account_id,
            argMinIf(plan_id, (timestamp, _offset), type = 'subscription.created') AS created_plan,
            argMaxIf(plan_id, (timestamp, _offset), plan_id IS NOT NULL) AS last_plan,
            minIf(timestamp, type = 'subscription.created') AS created_at,
            countIf(type = 'subscription.cancelled' AND mode = 'immediate') > 0 AS ended,
            countIf(type = 'subscription.cancelled') > 0 AS cancelling,
            argMaxIf(type, (timestamp, _offset),
                     type IN ('subscription.paused', 'subscription.resumed')) AS paused_or_not,
            minIfOrNull(timestamp, type = 'subscription.cancelled') AS cancelled_at,
            argMaxIf(payment_method, (timestamp, _offset), payment_method IS NOT NULL)
                AS payment_method,
            max(timestamp) AS updated_at
        FROM subscription_events FINAL
        WHERE subscription_id != ''
          AND (_partition, _offset) NOT IN (
            SELECT source_partition, source_offset FROM dead_letters FINAL
            WHERE source_topic LIKE '%billing.subscriptions' AND processor = 'rating'
        )
        GROUP BY subscription_id
    ),
    trials AS (
        SELECT e.subscription_id AS subscription_id,
               ifNull(arrayLast(v -> v.2 <= e.created_at, p.versions).3, 0) AS trial_days
        FROM events AS e
        LEFT JOIN plan_versions AS p ON p.plan_id = e.created_plan
    )
SELECT
    e.subscription_id AS subscription_id,
    e.account_id AS account_id,
    e.last_plan AS plan_id,
    e.created_at AS created_at,
    multiIf(
        e.ended, 'cancelled',
        e.paused_or_not = 'subscription.paused', 'paused',
        e.cancelling, 'cancelling',
        t.trial_days > 0 AND now64(6) < e.created_at + toIntervalDay(t.trial_days), 'trialing',
        'active'
    ) AS status,
    e.cancelled_at AS cancelled_at,
    e.payment_method AS payment_method,
    e.updated_at AS updated_at,
    if(t.trial_days > 0, e.created_at + toIntervalDay(t.trial_days), NULL) AS trial_ends_at
FROM events AS e
LEFT JOIN trials AS t ON t.subscription_id = e.subscription_id
SETTINGS join_use_nulls = 0;

-- mrr_changes (0011) with trials and pauses: a trial is not recurring revenue yet (a
-- trialing subscription has no invoice; its `trial_ended` invoice is its start, `new`);
-- a pause takes its MRR away (`contraction`) and a resume gives it back (`expansion`)
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
               ifNull(last_value(if(reason IN ('created', 'plan_changed', 'trial_ended'),
                                    mrr_at_issue, NULL))
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
        WHERE reason IN ('created', 'plan_changed', 'trial_ended')
    )
SELECT subscription_id, account_id, currency, at,
       if(reason IN ('created', 'trial_ended'), 'new',
          if(delta >= 0, 'expansion', 'contraction')) AS movement,
       delta
FROM starts
WHERE delta != 0 OR reason IN ('created', 'trial_ended')
UNION ALL
SELECT subscription_id, account_id, currency, at,
       multiIf(reason = 'paused', 'contraction', reason = 'resumed', 'expansion', 'churn')
           AS movement,
       if(reason = 'resumed', mrr, -mrr) AS delta
FROM priced
WHERE reason IN ('cancelled', 'paused', 'resumed')
   OR (reason = 'period_end' AND recurring_total = 0 AND mrr > 0);
