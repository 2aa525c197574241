-- upcoming_invoices (and so `streambill calendar`) with trials: a trialing subscription's
-- first invoice is issued when its trial ends (reason trial_ended, the flat charges of
-- its first period), and every period of a subscription that had a trial is anchored at
-- the trial's end, as the rating contract's rule 12 says; a trial cancelled at its end
-- issues nothing; a paused subscription issues nothing until it resumes (not listed).
-- Otherwise as in 0011.
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
               s.trial_ends_at AS trial_ends_at,
               ifNull(s.trial_ends_at, s.created_at) AS anchor,
               -- period k ends at anchor + k intervals; a trial's end (k = 0) issues too
               arrayMap(k -> if(p.interval = 'year', addYears(anchor, k), addMonths(anchor, k)),
                        range(toUInt32(s.trial_ends_at > t0 AND s.status = 'trialing' ? 0 : 1),
                              toUInt32(greatest(if(p.interval = 'year',
                                                   dateDiff('year', anchor, t0) + 4,
                                                   dateDiff('month', anchor, t0) + 26), 1))))
                   AS ends
        FROM subscriptions AS s
        INNER JOIN plan AS p ON p.plan_id = s.plan_id
        LEFT JOIN taken AS t ON t.subscription_id = s.subscription_id
        WHERE s.status IN ('active', 'cancelling', 'trialing')
    )
SELECT subscription_id, account_id, plan_id, currency, due_at,
       if(status = 'cancelling', toDecimal128(0, 9),
          arrayLast(v -> v.2 <= since
                         OR (v.3 = 'next_period' AND v.2 > since AND v.2 < due_at),
                    versions).4) AS recurring_amount,
       payment_method IS NOT NULL AS has_payment_method,
       multiIf(status = 'cancelling', 'cancelled',
               due_at = trial_ends_at, 'trial_ended',
               'period_end') AS reason
FROM live
ARRAY JOIN arrayFilter(e -> e > t0 AND e <= t0 + INTERVAL 731 DAY,
                       if(status = 'cancelling',
                          -- cancelled during its trial: it ends there, with no invoice
                          arrayFilter(e -> e > cancelled_at AND NOT ifNull(trial_ends_at > t0, 0),
                                      arraySlice(arrayFilter(e -> e > cancelled_at, ends), 1, 1)),
                          ends)) AS due_at;
