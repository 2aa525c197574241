"""The API's OpenAPI 3.1 document, built from the same field analysis that validates
requests (``streams.api.records``), so it describes exactly what the server accepts."""

from __future__ import annotations

from functools import cache
from typing import Any

from streams.api import records

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


def _errors(*statuses: int) -> dict[str, Any]:
    meaning = {
        400: "the body is not JSON",
        401: "no valid API key",
        403: "an account of another tenant",
        404: "not found",
        409: "a request with the same Idempotency-Key is in progress",
        413: "the body is larger than the server accepts",
        415: "the body is not application/json",
        422: "invalid: one message per field",
        429: "over the tenant's concurrency or rate limit",
        503: "Kafka (or the warehouse) is unavailable; nothing was written",
    }
    return {
        str(s): _json(
            {"$ref": "#/components/schemas/Error"}, meaning[s], headers=s in (409, 429, 503)
        )
        for s in statuses
    }


WRITE_ERRORS = (400, 401, 403, 409, 413, 415, 422, 429, 503)
IDEMPOTENCY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "a retry with the same key and body is answered like the first "
    "request and never makes a second event",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
}


@cache
def openapi_document(plans: tuple[str, ...] = ()) -> dict[str, Any]:
    """``plans``: the catalog's plan ids, listed as the values plan_id may take."""
    subscription = records.body_schema(
        "subscription_event",
        records.subscription_rules(lambda _: True),
        optional=("event_id", "timestamp"),
    )
    if plans:
        subscription["properties"]["plan_id"]["enum"] = [*plans, None]
    usage = records.body_schema("usage_event", records.USAGE_RULES)
    refund = records.body_schema(
        "refund_request", records.REFUND_RULES, server_fields=("requested_at",)
    )

    def write(summary: str, schema: str, ok: dict[str, Any]) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
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
                "Create a subscription, change its plan or cancel it", "SubscriptionEvent", accepted
            ),
            "/v1/usage": write(
                f"A batch of 1 to {records.MAX_USAGE_BATCH} usage events", "UsageBatch", usage_ok
            ),
            "/v1/refunds": write(
                "Request a refund (served by the priority lane)", "RefundRequest", accepted
            ),
            "/v1/invoices/{invoice_id}": {
                "get": {
                    "summary": "An invoice with its lines, as landed in the warehouse",
                    "parameters": [
                        {
                            "name": "invoice_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": _json({"type": "object"}, "the invoice"),
                        **_errors(401, 403, 404, 429, 503),
                    },
                }
            },
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
                "Accepted": ACCEPTED,
                "BatchResult": BATCH,
                "Error": ERROR,
            },
        },
    }
