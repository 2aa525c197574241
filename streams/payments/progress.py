"""How far a payment run is, and what the coming days hold, from the warehouse."""

from __future__ import annotations

from datetime import datetime

from streams.config import Settings
from streams.domain.payments import parse_schedule


def payment_run_progress(settings: Settings, until: datetime) -> tuple[int, int]:
    """(invoices with their outcome up to `until`, invoices due up to `until`).

    Due: invoices with an amount due and a payment method issued at or before `until`.
    Settled for the run: paid, uncollectible, or declined with the next dunning attempt
    due after `until`."""
    from streams.warehouse import query

    delays = ", ".join(str(int(d.total_seconds())) for d in parse_schedule(settings.dunning))
    instant = until.strftime("%Y-%m-%d %H:%M:%S.%f")
    sql = f"""
        WITH [{delays}] AS delays, toDateTime64('{instant}', 6, 'UTC') AS until
        SELECT
            countIf(a.attempts > 0 AND (a.last_status IN ('succeeded', 'uncollectible')
                OR a.last_attempt > length(delays)
                OR a.last_completed + toIntervalSecond(delays[a.last_attempt]) > until)),
            count()
        FROM (
            SELECT invoice_id FROM invoices FINAL
            WHERE amount_due > 0 AND payment_method IS NOT NULL AND issued_at <= until
        ) AS i
        LEFT JOIN (
            SELECT invoice_id, count() AS attempts, max(attempt) AS last_attempt,
                   argMax(status, (attempt, status = 'uncollectible')) AS last_status,
                   argMax(completed_at, attempt) AS last_completed
            FROM payment_attempts FINAL GROUP BY invoice_id
        ) AS a ON a.invoice_id = i.invoice_id
    """
    done, due = query(settings, sql)["rows"][0]
    return int(done), int(due)


def calendar_sql(settings: Settings, days: int, by: str) -> str:
    """(bucket, currency, invoices, recurring amount, payments, of which dunning retries)
    for the next `days` days per `by` (hour | day): the invoices of upcoming_invoices, a
    payment for each with a recurring amount and a payment method (its usage is not known
    yet: the amount is the least it will ask), and each declined invoice's next attempt
    by today's dunning schedule (STREAMBILL_DUNNING)."""
    if by not in ("hour", "day"):
        raise ValueError(f"by hour or day, not {by!r}")
    delays = ", ".join(str(int(d.total_seconds())) for d in parse_schedule(settings.dunning))
    bucket = "toStartOfHour" if by == "hour" else "toStartOfDay"
    return f"""
        WITH [{delays}] AS delays, now64(6, 'UTC') AS t0, t0 + INTERVAL {int(days)} DAY AS t1
        SELECT bucket, currency, sum(invoices), sum(recurring), sum(payments), sum(retries)
        FROM (
            SELECT {bucket}(due_at) AS bucket, currency, 1 AS invoices,
                   recurring_amount AS recurring,
                   toUInt64(recurring_amount > 0 AND has_payment_method) AS payments,
                   toUInt64(0) AS retries
            FROM upcoming_invoices WHERE due_at <= t1
            UNION ALL
            SELECT {bucket}(next_at), currency, 0, toDecimal128(0, 9), 1, 1
            FROM (
                SELECT any(currency) AS currency, max(attempt) AS last_attempt,
                       argMax(status, (attempt, status = 'uncollectible')) AS last_status,
                       argMax(completed_at, attempt) AS last_completed,
                       last_completed + toIntervalSecond(delays[last_attempt]) AS next_at
                FROM payment_attempts FINAL GROUP BY invoice_id
            )
            WHERE last_status IN ('declined', 'failed') AND last_attempt <= length(delays)
              AND next_at > t0 AND next_at <= t1
        )
        GROUP BY bucket, currency
        ORDER BY bucket, currency
    """
