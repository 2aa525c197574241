"""Valid sample records of the topics the sink lands, for warehouse tests. Payment
results, refund results and entitlements stand in for the payments and refunds
processors' output where a test needs such records before those processors run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _lines(i: int) -> list[dict]:
    kinds = ["flat", "usage", "proration_credit", "proration_charge", "usage"]
    return [
        {"charge_id": f"c{k}", "kind": kinds[(i + k) % 5], "period_start": T0,
         "period_end": T0 + timedelta(days=31), "quantity": Decimal(f"{i + k}.000000001"),
         "amount": Decimal(f"{(i * 7 + k) % 100 - 50}.12")}
        for k in range(i % 4)  # 0..3 lines: an invoice may have none
    ]  # fmt: skip


def sample(schema: str, i: int) -> dict:
    ts = T0 + timedelta(seconds=i, microseconds=i)
    maybe = lambda v: v if i % 2 else None  # noqa: E731 - optional fields both ways
    if schema == "invoice":
        lines = _lines(i)
        return {"invoice_id": f"inv-{i}", "account_id": f"a-{i % 7}", "subscription_id": f"s-{i}",
                "plan_id": "growth-eur", "currency": "EUR", "issued_at": ts, "reason": "period_end",
                "lines": lines, "total": sum((ln["amount"] for ln in lines), Decimal(0)),
                "payment_method": maybe(f"tok_{i}")}  # fmt: skip
    if schema == "subscription_event":
        return {"event_id": f"e-{i}", "type": "subscription.created", "timestamp": ts,
                "account_id": f"a-{i}", "subscription_id": f"s-{i}", "plan_id": maybe("pro-usd"),
                "mode": maybe("immediate"), "payment_method": maybe(f"tok_{i}")}  # fmt: skip
    if schema == "usage_event":
        return {"event_id": f"u-{i}", "timestamp": ts, "account_id": f"a-{i}",
                "subscription_id": f"s-{i % 5}", "metric": "api_calls",
                "quantity": Decimal(f"{i}.5")}  # fmt: skip
    if schema == "payment_result":
        return {"payment_id": f"p-{i}", "invoice_id": f"inv-{i}", "account_id": f"a-{i}",
                "attempt": i % 3, "status": "declined" if i % 2 else "succeeded",
                "amount": Decimal("12.34"), "currency": "USD", "gateway_account": "gw-1",
                "gateway_reference": maybe(f"ch_{i}"), "decline_code": maybe("card_declined"),
                "latency_ms": 250.5 + i, "completed_at": ts}  # fmt: skip
    if schema == "refund_result":
        return {"refund_id": f"r-{i}", "invoice_id": f"inv-{i}", "account_id": f"a-{i}",
                "status": "refunded", "amount": Decimal("-1.5"), "currency": "JPY",
                "reason": maybe("duplicate"), "gateway_reference": maybe(f"re_{i}"),
                "requested_at": ts, "completed_at": ts + timedelta(milliseconds=90)}  # fmt: skip
    if schema == "entitlement":
        return {"entitlement_id": f"en-{i}", "account_id": f"a-{i}", "subscription_id": f"s-{i}",
                "action": "deactivate", "cause": f"refund:r-{i}", "timestamp": ts}  # fmt: skip
    raise AssertionError(schema)
