"""How far a payment run is, from the warehouse."""

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
