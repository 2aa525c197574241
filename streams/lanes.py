"""Which workflow runs in which lane: one place for the routing of urgent work.

A workflow is a kind of request with a topic of its own. Each one is served by exactly
one of two lane processes, chosen by ``STREAMBILL_URGENT_WORKFLOWS``:

- the **priority** lane (``streambill run lane priority``; its own consumer group and
  process, gateway slots that bulk payments never take): the workflows declared urgent;
- the **standard** lane (``streambill run lane standard``): the others, competing for
  gateway capacity with bulk payments like any bulk work.

Producers never change: a refund request always goes to ``billing.refunds`` and a
cancellation request to ``billing.cancellations``; which lane subscribes to the topic is
the configuration, so moving a workflow between lanes is a restart, not a redeploy of
every client.
"""

from __future__ import annotations

from streams.kafka.topics import CANCELLATIONS, REFUNDS, TopicSpec

WORKFLOWS: dict[str, TopicSpec] = {"refund": REFUNDS, "cancellation": CANCELLATIONS}
LANES = ("priority", "standard")
DEFAULT_URGENT = "refund,cancellation"


class LaneConfigError(ValueError):
    pass


def parse_urgent(text: str) -> frozenset[str]:
    """``"refund,cancellation"`` -> the set; an unknown workflow is a configuration error
    (a typo must not silently demote a workflow to the standard lane)."""
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    unknown = sorted(names - WORKFLOWS.keys())
    if unknown:
        raise LaneConfigError(
            f"STREAMBILL_URGENT_WORKFLOWS: unknown workflow(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(WORKFLOWS))}"
        )
    return names


def workflows_of(lane: str, urgent: frozenset[str]) -> tuple[str, ...]:
    """The workflows the given lane serves, in a fixed order."""
    if lane not in LANES:
        raise LaneConfigError(f"unknown lane {lane!r}; lanes: {', '.join(LANES)}")
    return tuple(w for w in WORKFLOWS if (w in urgent) == (lane == "priority"))
