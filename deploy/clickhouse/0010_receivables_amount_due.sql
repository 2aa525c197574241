-- receivables_aging counts what is owed: the amount due (the total less the credit the
-- invoice took), not the total; an invoice paid by credit (nothing due) is not owed
DROP VIEW IF EXISTS receivables_aging;

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
    sum(amount_due) AS amount_due,
    countIf(declines > 0) AS in_dunning
FROM (
    SELECT i.currency AS currency, i.amount_due AS amount_due, s.declines AS declines,
           dateDiff('day', i.issued_at, now64(6, 'UTC')) AS age_days
    FROM invoices AS i FINAL
    LEFT JOIN settled AS s ON s.invoice_id = i.invoice_id
    WHERE i.amount_due > 0 AND NOT s.closed
)
GROUP BY currency, age_bucket;
