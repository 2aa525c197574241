"""The API's OpenAPI 3.1 document, built from the same field analysis that validates
requests (``streams.api.records``), so it describes exactly what the server accepts."""

from __future__ import annotations

from functools import cache
from typing import Any

from streams.api import reads, records

ERROR = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "a machine-readable code"},
        "message": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {"type": "string"},
            "description": "one message per invalid field",
        },
        "retry_after": {"type": "integer"},
    },
}
ACCEPTED = {
    "type": "object",
    "required": ["status", "topic", "partition", "offset"],
    "properties": {
        "status": {"const": "accepted"},
        "event_id": {"type": "string"},
        "refund_id": {"type": "string"},
        "credit_id": {"type": "string"},
        "topic": {"type": "string"},
        "partition": {"type": "integer"},
        "offset": {"type": "integer"},
    },
}
BATCH = {
    "type": "object",
    "required": ["accepted", "rejected", "failed", "items"],
    "properties": {
        "error": {"type": "string"},
        "message": {"type": "string"},
        "accepted": {"type": "integer"},
        "rejected": {"type": "integer"},
        "failed": {"type": "integer"},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "status"],
                "properties": {
                    "index": {"type": "integer"},
                    "event_id": {"type": "string"},
                    "status": {"enum": ["accepted", "rejected", "failed"]},
                    "errors": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
TIMESTAMP = {"type": "string", "format": "date-time"}
MONEY = {"type": "string", "description": "a decimal string at the currency's precision"}
INVOICE_SUMMARY = {
    "type": "object",
    "required": ["invoice_id", "account_id", "subscription_id", "currency", "issued_at",
                 "total", "status"],
    "properties": {
        "invoice_id": {"type": "string"},
        "account_id": {"type": "string"},
        "subscription_id": {"type": "string"},
        "currency": {"type": "string"},
        "issued_at": TIMESTAMP,
        "total": MONEY,
        "status": {
            "enum": list(reads.INVOICE_STATUSES),
            "description": "paid: a charge succeeded (or nothing was owed); uncollectible: "
            "every dunning attempt was declined; open: neither, yet",
        },
    },
}  # fmt: skip
INVOICE_PAGE = {
    "type": "object",
    "required": ["invoices", "next_cursor"],
    "properties": {
        "invoices": {"type": "array", "items": {"$ref": "#/components/schemas/InvoiceSummary"}},
        "next_cursor": {
            "type": ["string", "null"],
            "description": "pass as cursor for the next page; null on the last page",
        },
    },
}
SUBSCRIPTION = {
    "type": "object",
    "required": ["subscription_id", "account_id", "plan_id", "status", "created_at",
                 "cancelled_at", "updated_at"],
    "properties": {
        "subscription_id": {"type": "string"},
        "account_id": {"type": "string"},
        "plan_id": {"type": ["string", "null"]},
        "currency": {"type": ["string", "null"]},
        "interval": {"type": ["string", "null"]},
        "status": {"enum": ["active", "cancelling", "cancelled"]},
        "created_at": TIMESTAMP,
        "cancelled_at": {"type": ["string", "null"], "format": "date-time"},
        "updated_at": TIMESTAMP,
    },
}  # fmt: skip
REFUND = {
    "type": "object",
    "required": ["refund_id", "invoice_id", "account_id", "status", "amount", "currency",
                 "reason", "rejection_reason", "requested_at", "completed_at"],
    "properties": {
        "refund_id": {"type": "string"},
        "invoice_id": {"type": "string"},
        "account_id": {"type": "string"},
        "status": {"enum": ["refunded", "rejected"]},
        "amount": MONEY,
        "currency": {"type": "string"},
        "reason": {"type": ["string", "null"], "description": "as given with the request"},
        "rejection_reason": {"type": ["string", "null"]},
        "gateway_reference": {"type": ["string", "null"]},
        "requested_at": TIMESTAMP,
        "completed_at": TIMESTAMP,
    },
}  # fmt: skip
CUSTOMER = {
    "type": "object",
    "required": ["account_id", *reads.CUSTOMER_FIELDS, "updated_at"],
    "properties": {
        "account_id": {"type": "string"},
        "name": {"type": ["string", "null"]},
        "email": {"type": ["string", "null"]},
        "address": {"type": ["string", "null"], "description": "lines separated by newlines"},
        "country": {"type": ["string", "null"], "description": "ISO 3166-1 alpha-2"},
        "tax_exempt": {"type": "boolean"},
        "grace_hours": {"type": "integer", "minimum": 0},
        "payment_method": {"type": ["string", "null"], "description": "a gateway token"},
        "updated_at": TIMESTAMP,
    },
}  # fmt: skip
EVENT_STATUS = {
    "type": "object",
    "required": ["event_id", "status", "copies"],
    "properties": {
        "event_id": {"type": "string"},
        "status": {"enum": ["applied", "pending", "dead_lettered"]},
        "copies": {
            "type": "array",
            "description": "each time the event id was written to its topic",
            "items": {
                "type": "object",
                "required": ["topic", "partition", "offset", "status"],
                "properties": {
                    "topic": {"type": "string"},
                    "partition": {"type": "integer"},
                    "offset": {"type": "integer"},
                    "status": {"enum": ["applied", "ignored_repeat", "pending", "dead_lettered"]},
                    "reason": {"type": "string"},
                    "detail": {"type": "string"},
                    "processor": {"type": "string"},
                },
            },
        },
    },
}
RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before retrying",
        "schema": {"type": "integer", "minimum": 1},
    }
}


def _json(schema: dict[str, Any], description: str, headers: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        out["headers"] = RETRY_AFTER
    return out


def _read(summary: str, param: str, schema: str, description: str = "") -> dict[str, Any]:
    """A GET of one resource by its id, scoped to the tenant."""
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": [{"name": param, "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {
            "200": _json({"$ref": f"#/components/schemas/{schema}"}, summary),
            **_errors(401, 404, 429, 503),
        },
    }  # fmt: skip
    if description:
        op["description"] = description
    return {"get": op}


def _invoice_read() -> dict[str, Any]:
    """GET /v1/invoices/{id}: JSON, or the invoice's document as HTML or PDF."""
    path = _read("An invoice with its lines, as landed in the warehouse", "invoice_id", "Invoice",
                 "JSON by default; the document the customer receives as HTML or PDF with a "
                 "`.html` or `.pdf` suffix on the id, or `Accept: text/html` or "
                 "`application/pdf`.")  # fmt: skip
    content = path["get"]["responses"]["200"]["content"]
    content["text/html"] = {"schema": {"type": "string"}}
    content["application/pdf"] = {"schema": {"type": "string", "format": "binary"}}
    return path


def _errors(*statuses: int) -> dict[str, Any]:
    meaning = {
        400: "the body is not JSON",
        401: "no valid API key",
        403: "a write naming an account this API key does not own",
        404: "not found (another tenant's resource is not found either)",
        409: "a request with the same Idempotency-Key is in progress",
        413: "the body is larger than the server accepts",
        415: "the body is not application/json",
        422: "invalid, or certain to be refused downstream: one message per field",
        429: "over the tenant's concurrency or rate limit",
        503: "Kafka (or the warehouse) is unavailable; nothing was written",
    }
    return {
        str(s): _json(
            {"$ref": "#/components/schemas/Error"}, meaning[s], headers=s in (409, 429, 503)
        )
        for s in statuses
    }


def _query(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    param = {"name": name, "in": "query", "required": False, "schema": schema}
    return {**param, "description": description} if description else param


WRITE_ERRORS = (400, 401, 403, 409, 413, 415, 422, 429, 503)
IDEMPOTENCY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "a retry with the same key and body is answered like the first "
    "request and never makes a second event",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
}


# --- plans (billing.catalog) -------------------------------------------------------------

PLAN_OUT = {
    "type": "object",
    "required": ["plan_id", "currency", "interval", "charges"],
    "description": "the plan as a catalog file writes it",
    "properties": {
        "plan_id": {"type": "string"},
        "currency": {"type": "string"},
        "interval": {"enum": ["month", "year"]},
        "charges": {"type": "array", "items": {"type": "object"}},
        "trial_days": {"type": "integer", "minimum": 0},
    },
}
PLAN_PUBLISHED = {
    "type": "object",
    "required": ["plan_id", "version", "published_at", "existing", "plan"],
    "properties": {
        "plan_id": {"type": "string"},
        "version": {"type": "integer", "minimum": 1},
        "published_at": {**TIMESTAMP, "description": "when it took effect "
                         "(1970-01-01T00:00:00Z: a catalog file's plan, since always)"},
        "existing": {"enum": list(records.EXISTING_MODES)},
        "plan": PLAN_OUT,
    },
}  # fmt: skip
PLAN_VERSION = {
    "type": "object",
    "required": [*PLAN_PUBLISHED["required"], "versions", "retired_at"],
    "properties": {
        **PLAN_PUBLISHED["properties"],
        "versions": {"type": "integer", "minimum": 1, "description": "the plan's versions"},
        "retired_at": {"type": ["string", "null"], "format": "date-time"},
    },
}
PLAN_SCHEMAS = {
    "PlanPublication": {
        "type": "object",
        "required": ["plan"],
        "additionalProperties": False,
        "properties": {
            "plan": {"$ref": "#/components/schemas/Plan"},
            "existing": {
                "enum": list(records.EXISTING_MODES),
                "default": "keep",
                "description": "keep: subscriptions on older versions stay on them; "
                "next_period: they move to this version at their next period end",
            },
        },
    },
    "Plan": records.plan_schema(),
    "PlanPublished": PLAN_PUBLISHED,
    "PlanVersion": PLAN_VERSION,
    "PlanList": {
        "type": "object",
        "required": ["plans"],
        "properties": {"plans": {"type": "array",
                                 "items": {"$ref": "#/components/schemas/PlanVersion"}}},
    },
    "PlanRetired": {
        "type": "object",
        "required": ["plan_id", "retired_at"],
        "properties": {"plan_id": {"type": "string"}, "retired_at": TIMESTAMP},
    },
}  # fmt: skip


def _plan_paths() -> dict[str, Any]:
    """GET and POST /v1/plans, POST /v1/plans/{plan_id}/retire."""
    operator = _json({"$ref": "#/components/schemas/Error"},
                     'the API key is not an operator\'s (a tenant with "admin": true)')  # fmt: skip
    published = {"$ref": "#/components/schemas/PlanPublished"}
    return {
        "/v1/plans": {
            "get": {
                "summary": "The plans: each one's latest version, or every version",
                "parameters": [
                    _query(
                        "all_versions",
                        {"type": "boolean", "default": False},
                        "every version of each plan, not only the latest",
                    )
                ],
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/PlanList"}, "by plan id"),
                    **_errors(401, 422, 429, 503),
                },
            },
            "post": {
                "summary": "Publish a plan's next version (its first: a new plan), in effect "
                "now (operators only)",
                "description": "A new version keeps the plan's currency and interval; a "
                "retired plan takes none. Plans are global: any tenant reads them.",
                "parameters": [IDEMPOTENCY],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/PlanPublication"}
                        }
                    },
                },
                "responses": {
                    "201": _json(published, "published: the new version, durable in Kafka"),
                    "200": _json(
                        published,
                        "unchanged: the latest version has the same "
                        "definition and existing; nothing was published",
                    ),
                    **_errors(*WRITE_ERRORS),
                    "403": operator,
                    "422": _json(
                        {"$ref": "#/components/schemas/Error"},
                        "an invalid plan, or one the rating contract refuses: the message says why",
                    ),
                },
            },
        },
        "/v1/plans/{plan_id}/retire": {
            "post": {
                "summary": "Retire a plan: no creation or plan change names it from now on; "
                "its subscriptions go on (operators only)",
                "parameters": [
                    {
                        "name": "plan_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/PlanRetired"}, "retired"),
                    **_errors(401, 404, 422, 429, 503),
                    "403": operator,
                    "409": _json({"$ref": "#/components/schemas/Error"}, "already retired"),
                },
            }
        },
    }


@cache
def openapi_document(plans: tuple[str, ...] = ()) -> dict[str, Any]:
    """``plans``: the catalog's plan ids, listed as the values plan_id may take."""
    subscription = records.body_schema(
        "subscription_event",
        records.subscription_rules(lambda _: None),
        optional=("event_id", "timestamp"),
    )
    if plans:
        subscription["properties"]["plan_id"]["enum"] = [*plans, None]
    usage = records.body_schema("usage_event", records.USAGE_RULES)
    refund = records.body_schema(
        "refund_request", records.REFUND_RULES, server_fields=("requested_at",)
    )
    customer = records.body_schema(
        "customer", records.CUSTOMER_RULES, server_fields=("account_id", "timestamp")
    )
    credit = records.body_schema(
        "subscription_event", records.CREDIT_RULES, server_fields=records.CREDIT_SERVER_FIELDS
    )
    credit["properties"]["credit_id"]["description"] = (
        "a repeated credit_id is credited once; by default derived from the Idempotency-Key "
        "(the same key, the same credit), else random"
    )
    credit["properties"]["currency"]["description"] = "an ISO 4217 code such as EUR"
    credit["properties"]["amount"]["description"] = (
        "greater than 0, with at most the currency's minor-unit digits (EUR 2, JPY 0)"
    )

    def write(
        summary: str, schema: str, ok: dict[str, Any], description: str = ""
    ) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                **({"description": description} if description else {}),
                "parameters": [IDEMPOTENCY],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}
                    },
                },
                "responses": {**ok, **_errors(*WRITE_ERRORS)},
            }
        }

    accepted = {
        "202": _json({"$ref": "#/components/schemas/Accepted"}, "durable in Kafka (acks=all)")
    }
    batch = {"$ref": "#/components/schemas/BatchResult"}
    usage_ok = {
        "202": _json(batch, "every event is durable in Kafka"),
        "207": _json(batch, "some events accepted (durable), the others rejected"),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "streambill ingestion API",
            "version": "1.0.0",
            "description": "JSON events over HTTP into streambill's Kafka topics.",
        },
        "security": [{"apiKey": []}],
        "paths": {
            "/v1/subscriptions": write(
                "Create a subscription, change its plan, cancel, pause or resume it, or apply "
                "a coupon to it",
                "SubscriptionEvent",
                accepted,
                "Cancellations go to billing.cancellations (the lanes), the other events to "
                "billing.subscriptions. coupon.applied takes coupon_id, exactly one of "
                "percent_off (0 < p <= 100) and amount_off (> 0, in the subscription's "
                "currency), duration, and periods for a repeating coupon; the coupon fields "
                "are for coupon.applied only.",
            ),
            "/v1/usage": write(
                f"A batch of 1 to {records.MAX_USAGE_BATCH} usage events", "UsageBatch", usage_ok
            ),
            "/v1/refunds": write(
                "Request a refund (served by the priority lane)", "RefundRequest", accepted
            ),
            "/v1/credits": write(
                "Grant credit to an account",
                "CreditGrant",
                accepted,
                "A credit.granted event on billing.subscriptions, keyed by the account: the "
                "account's credit balance in that currency grows by the amount, and later "
                "invoices take from it.",
            ),
            "/v1/invoices": {
                "get": {
                    "summary": "The tenant's invoices, oldest first, with their payment status",
                    "parameters": [
                        _query("account", {"type": "string"}, "only this account's"),
                        _query("status", {"enum": list(reads.INVOICE_STATUSES)}),
                        _query("from", TIMESTAMP, "issued at or after"),
                        _query("to", TIMESTAMP, "issued before"),
                        _query(
                            "limit",
                            {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": reads.MAX_PAGE,
                                "default": reads.DEFAULT_PAGE,
                            },
                        ),
                        _query("cursor", {"type": "string"}, "next_cursor of the previous page"),
                    ],
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/InvoicePage"}, "one page"),
                        **_errors(401, 404, 422, 429, 503),
                    },
                }
            },
            "/v1/invoices/{invoice_id}": _invoice_read(),
            "/v1/subscriptions/{subscription_id}": _read(
                "A subscription as the warehouse holds it", "subscription_id", "Subscription"
            ),
            "/v1/refunds/{refund_id}": _read(
                "A refund's result (not found while the request is pending)",
                "refund_id",
                "Refund",
            ),
            "/v1/customers/{account_id}": {
                "put": {
                    "summary": "Replace the account's customer record (fields left out take "
                    "their defaults); payments charge its payment_method from then on",
                    "description": "Two records, in this order: a customer.updated event with "
                    "the record's country, tax_exempt and grace_hours on billing.subscriptions "
                    "(keyed by the account, so that rating applies it in order with the "
                    "account's other events; a null country there leaves the country rating "
                    "knows as it was), then the whole record on billing.customers.",
                    "parameters": [
                        {
                            "name": "account_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "pattern": reads.ID_PATTERN.pattern},
                        },
                        IDEMPOTENCY,
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/CustomerRecord"}
                            }
                        },
                    },
                    "responses": {
                        "202": _json(
                            {"$ref": "#/components/schemas/CustomerAccepted"},
                            "durable in Kafka (acks=all)",
                        ),
                        **_errors(*WRITE_ERRORS),
                    },
                },
                **_read(
                    "The account's current customer record, as the warehouse holds it",
                    "account_id",
                    "Customer",
                ),
            },
            "/v1/events/{event_id}": _read(
                "Whether an accepted event was applied, ignored as a repeat or dead-lettered",
                "event_id",
                "EventStatus",
                "applied: landed, the rating processor committed past it and every dead letter "
                "committed since has landed, none of it; pending: not known yet. Not found "
                "until the event has landed in the warehouse.",
            ),
            **_plan_paths(),
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "security": [],
                    "responses": {"200": _json({"type": "object"}, "alive")},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: Kafka answers",
                    "security": [],
                    "responses": {
                        "200": _json({"type": "object"}, "ready"),
                        "503": _json({"type": "object"}, "not ready", headers=True),
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "a tenant's API key"}
            },
            "schemas": {
                "SubscriptionEvent": subscription,
                "UsageEvent": usage,
                "UsageBatch": {
                    "type": "object",
                    "required": ["events"],
                    "additionalProperties": False,
                    "properties": {
                        "events": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": records.MAX_USAGE_BATCH,
                            "items": {"$ref": "#/components/schemas/UsageEvent"},
                        }
                    },
                },
                "RefundRequest": refund,
                "CreditGrant": credit,
                "Invoice": {"type": "object"},
                "InvoiceSummary": INVOICE_SUMMARY,
                "InvoicePage": INVOICE_PAGE,
                "Subscription": SUBSCRIPTION,
                "Refund": REFUND,
                "EventStatus": EVENT_STATUS,
                "CustomerRecord": customer,
                "Customer": CUSTOMER,
                "CustomerAccepted": {
                    "type": "object",
                    "required": [
                        "status",
                        "account_id",
                        "topic",
                        "partition",
                        "offset",
                        "customer",
                    ],
                    "properties": {
                        "status": {"const": "accepted"},
                        "account_id": {"type": "string"},
                        "topic": {"type": "string"},
                        "partition": {"type": "integer"},
                        "offset": {"type": "integer"},
                        "event_id": {
                            "type": "string",
                            "description": "the customer.updated event's id",
                        },
                        "customer": {"$ref": "#/components/schemas/Customer"},
                    },
                },
                "Accepted": ACCEPTED,
                "BatchResult": BATCH,
                "Error": ERROR,
                **PLAN_SCHEMAS,
            },
        },
    }
