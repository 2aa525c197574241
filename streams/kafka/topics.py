"""Every topic, declared once: name, value schema, partitions, retention/compaction."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from streams.config import Settings, environment_namespace

# An optional prefix for every topic and consumer group, so several independent
# pipelines (test runs, tenants' sandboxes) can share one cluster. Empty by default:
# the contract names are the plain ones (billing.invoices, ...).
_namespace = environment_namespace()


def set_namespace(namespace: str) -> None:
    global _namespace
    _namespace = namespace


def namespace() -> str:
    return _namespace


def group_id(base: str) -> str:
    return _namespace + base


@dataclass(frozen=True)
class TopicSpec:
    base: str
    schema: str | None  # Avro schema of the values (None: internal bytes)
    compacted: bool = False

    @property
    def name(self) -> str:
        return _namespace + self.base

    def config(self) -> dict[str, str]:
        if self.compacted:
            return {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"}
        # billing topics are the replayable source of truth: keep them
        return {"cleanup.policy": "delete", "retention.ms": "-1"}


SUBSCRIPTIONS = TopicSpec("billing.subscriptions", "subscription_event")
USAGE = TopicSpec("billing.usage", "usage_event")
INVOICES = TopicSpec("billing.invoices", "invoice")
PAYMENT_REQUESTS = TopicSpec("billing.payment-requests", "payment_request")
PAYMENT_RESULTS = TopicSpec("billing.payment-results", "payment_result")
REFUNDS = TopicSpec("billing.refunds", "refund_request")
# a cancellation request is a subscription.cancelled event addressed to a lane first
CANCELLATIONS = TopicSpec("billing.cancellations", "subscription_event")
REFUND_RESULTS = TopicSpec("billing.refund-results", "refund_result")
ENTITLEMENTS = TopicSpec("billing.entitlements", "entitlement")
DEAD_LETTER = TopicSpec("billing.dead-letter", "dead_letter")
ALERTS = TopicSpec("billing.alerts", "alert")
CONTROL = TopicSpec("billing.control", "bill_run")
PAYMENT_CONTROL = TopicSpec("billing.payment-control", "payment_run")
RATING_CHANGELOG = TopicSpec("billing.rating-changelog", None, compacted=True)
# the latest record of an account is its customer (every field given: nothing is lost
# to compaction)
CUSTOMERS = TopicSpec("billing.customers", "customer", compacted=True)
# the plans' version history (streams/catalog_history.py): one record per plan holding all
# its versions, so compaction never loses one
CATALOG = TopicSpec("billing.catalog", "catalog_plan", compacted=True)
# dunning: attempt n+1 waits in retry topic n. One topic per step, so each holds one
# constant delay and its records come due in offset order: the dispatcher pauses a
# partition at its first record not yet due, never skipping past it.
MAX_DUNNING_STEPS = 5
PAYMENT_RETRIES = tuple(
    TopicSpec(f"billing.payment-retry-{n}", "payment_request")
    for n in range(1, MAX_DUNNING_STEPS + 1)
)

ALL_TOPICS = (
    SUBSCRIPTIONS,
    USAGE,
    INVOICES,
    PAYMENT_REQUESTS,
    PAYMENT_RESULTS,
    REFUNDS,
    CANCELLATIONS,
    REFUND_RESULTS,
    ENTITLEMENTS,
    DEAD_LETTER,
    ALERTS,
    CONTROL,
    PAYMENT_CONTROL,
    RATING_CHANGELOG,
    CUSTOMERS,
    CATALOG,
    *PAYMENT_RETRIES,
)


def spec_for(name: str) -> TopicSpec:
    for t in ALL_TOPICS:
        if t.name == name:
            return t
    raise KeyError(name)


def ensure_topics(admin: AdminClient, settings: Settings, timeout: float = 30.0) -> list[str]:
    """Create missing topics and grow partition counts; returns the names created.

    Idempotent: existing topics with enough partitions are left as they are.
    """
    metadata = admin.list_topics(timeout=timeout)
    brokers = len(metadata.brokers)
    replication = settings.replication or min(3, brokers)
    existing = metadata.topics
    to_create = [
        NewTopic(t.name, settings.partitions, replication, config=t.config())
        for t in ALL_TOPICS
        if t.name not in existing
    ]
    created: list[str] = []
    if to_create:
        for name, future in admin.create_topics(to_create, operation_timeout=timeout).items():
            try:
                future.result()
                created.append(name)
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":  # a concurrent creator won
                    raise
    grow = [
        NewPartitions(t.name, settings.partitions)
        for t in ALL_TOPICS
        if t.name in existing and len(existing[t.name].partitions) < settings.partitions
    ]
    if grow:
        for future in admin.create_partitions(grow, operation_timeout=timeout).values():
            future.result()
    _wait_for_leaders(admin, [t.name for t in ALL_TOPICS], timeout)
    return created


def _wait_for_leaders(admin: AdminClient, names: list[str], timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while True:
        topics = admin.list_topics(timeout=timeout).topics
        ready = all(
            n in topics
            and topics[n].partitions
            and all(p.leader >= 0 for p in topics[n].partitions.values())
            for n in names
        )
        if ready:
            return
        if time.monotonic() > deadline:
            raise TimeoutError("topics have no partition leaders yet")
        time.sleep(0.1)


def spec_for_base(base: str) -> TopicSpec:
    return next(t for t in ALL_TOPICS if t.base == base)


def delete_namespace(admin: AdminClient, ns: str, timeout: float = 30.0) -> list[str]:
    """Delete the declared topics of namespace `ns`, and wait until the cluster no
    longer lists them; returns the names deleted. Its consumer groups go with them: the
    broker drops a group without members once the topics of all its committed offsets
    are deleted."""
    import time

    existing = admin.list_topics(timeout=timeout).topics
    topics = [ns + t.base for t in ALL_TOPICS if ns + t.base in existing]
    for future in (admin.delete_topics(topics, operation_timeout=timeout).values()
                   if topics else ()):  # fmt: skip
        future.result()
    deadline = time.monotonic() + timeout
    while set(topics) & set(admin.list_topics(timeout=timeout).topics):
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics of namespace {ns!r} still listed after deletion")
        time.sleep(0.1)
    return topics
