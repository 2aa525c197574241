-- The load calendar's source: every invoice the current subscriptions will be issued at
-- their coming period ends (the next two years), with the recurring amount it will bill
-- in advance (usage comes on top: unknown yet). Periods are anchored at creation as the
-- rating contract says: addMonths/addYears from the anchor keep its time of day and clamp
-- to a month's last day (Jan 31 -> Feb 28 -> Mar 31). A subscription cancelled at the end
-- of its period has one invoice left, at that end, with no recurring charge; one
-- cancelled at once has none.
CREATE VIEW IF NOT EXISTS upcoming_invoices AS
WITH
    now64(6, 'UTC') AS t0,
    plan AS (
        SELECT plan_id, argMax(currency, loaded_at) AS currency,
               argMax(interval, loaded_at) AS interval,
               argMax(flat_amount, loaded_at) AS flat_amount
        FROM plans GROUP BY plan_id
    ),
    live AS (
        SELECT s.subscription_id AS subscription_id, s.account_id AS account_id,
               s.plan_id AS plan_id, s.status AS status, s.cancelled_at AS cancelled_at,
               s.payment_method AS payment_method, p.currency AS currency,
               p.flat_amount AS flat_amount,
               arrayMap(k -> if(p.interval = 'year', addYears(s.created_at, k),
                                addMonths(s.created_at, k)),
                        range(1, toUInt32(if(p.interval = 'year',
                                             dateDiff('year', s.created_at, t0) + 4,
                                             dateDiff('month', s.created_at, t0) + 26)))) AS ends
        FROM subscriptions AS s
        INNER JOIN plan AS p ON p.plan_id = s.plan_id
        WHERE s.status IN ('active', 'cancelling')
    )
SELECT subscription_id, account_id, plan_id, currency, due_at,
       if(status = 'cancelling', toDecimal128(0, 9), flat_amount) AS recurring_amount,
       payment_method IS NOT NULL AS has_payment_method,
       if(status = 'cancelling', 'cancelled', 'period_end') AS reason
FROM live
ARRAY JOIN arrayFilter(e -> e > t0 AND e <= t0 + INTERVAL 731 DAY,
                       if(status = 'cancelling',
                          arraySlice(arrayFilter(e -> e > cancelled_at, ends), 1, 1),
                          ends)) AS due_at;
