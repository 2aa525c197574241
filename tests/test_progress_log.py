"""The progress line a processor logs every STREAMBILL_PROGRESS_SECONDS: its figures."""

from __future__ import annotations

from structlog.testing import capture_logs

from streams.logging import ProgressLog
from streams.metrics import CONSUMER_LAG, PAYMENTS, RECORDS, progress_figures


def test_a_progress_line_has_totals_and_what_changed_since_the_last() -> None:
    progress = ProgressLog("payments", 10, progress_figures)
    records = RECORDS.labels("payments", "progress-test")
    succeeded, declined = PAYMENTS.labels("succeeded"), PAYMENTS.labels("declined")
    with capture_logs() as logs:
        records.inc(5)
        succeeded.inc(3)
        progress.log_once()
        records.inc(90)
        succeeded.inc(80)
        declined.inc(10)
        CONSUMER_LAG.labels("payments", "progress-test", "0").set(7)
        progress.log_once()
    CONSUMER_LAG.remove("payments", "progress-test", "0")
    first, second = logs
    assert second["event"] == "progress" and second["processor"] == "payments"
    for figure, added in (("records", 90), ("charges_succeeded", 80), ("charges_declined", 10)):
        assert second["totals"][figure] - first["totals"].get(figure, 0) == added
        assert second["since_last"][figure] == added
    assert second["totals"]["lag"] - first["totals"].get("lag", 0) == 7
    assert "lag" not in second["since_last"]  # a level, not a count
