"""The invoice's shape is written down once (streams/invoice_record.py); every other form
of it is checked against that: the Avro schema, the fast writer's layout, the sink's
columns, the public JSON (`streambill rate`, the API). The fast writer's bytes against
fastavro's: tests/test_rating_codecs.py."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from streams.codec import codec
from streams.domain.invoice import Invoice, InvoiceLine, invoice_to_dict
from streams.fast_codec import InvoiceWriter
from streams.invoice_record import INVOICE_FIELDS, LINE_FIELDS, PRIVATE_FIELDS, invoice_record
from streams.kafka.topics import INVOICES
from streams.processors.sink import COLUMNS, COORDINATES, LANDERS

T0 = datetime(2026, 3, 1, tzinfo=UTC)
T1 = datetime(2026, 4, 1, tzinfo=UTC)
INVOICE = Invoice(
    invoice_id="inv-1", account_id="acct-1", subscription_id="sub-1", currency="EUR",
    issued_at=T1,
    lines=(
        InvoiceLine("flat:pro", "flat", T0, T1, Decimal(1), Decimal("49.00")),
        InvoiceLine("usage:api_calls", "usage", T0, T1, Decimal("1234.5"), Decimal("12.35")),
        InvoiceLine("credit:pro", "proration_credit", T0, T1, Decimal(1), Decimal("-10.00")),
    ),
    total=Decimal("51.35"), reason="period_end",
)  # fmt: skip
RECORD = invoice_record(INVOICE, "pro", "card")
# columns the sink derives from the lines rather than copies
SINK_DERIVED = {"invoices": ["recurring_total", "usage_total", "line_count"],
                "invoice_lines": ["line_no"]}  # fmt: skip


def schema_fields() -> tuple[tuple[str, ...], tuple[str, ...]]:
    fields = codec(INVOICES.schema).schema["fields"]
    (lines,) = [f for f in fields if f["name"] == "lines"]
    return tuple(f["name"] for f in fields), tuple(
        f["name"] for f in lines["type"]["items"]["fields"]
    )


def test_the_schema_has_the_mappings_fields_in_its_order() -> None:
    assert schema_fields() == (INVOICE_FIELDS, LINE_FIELDS)


def test_the_record_is_the_mappings_fields_and_the_schema_takes_it() -> None:
    assert tuple(RECORD) == INVOICE_FIELDS
    assert all(tuple(line) == LINE_FIELDS for line in RECORD["lines"])
    c = codec(INVOICES.schema)
    assert c.decode(c.encode(RECORD)) == RECORD


def test_the_fast_writer_lays_out_the_mappings_fields() -> None:
    assert tuple(name for name, _ in InvoiceWriter.FIELDS) == INVOICE_FIELDS
    assert tuple(name for name, _ in InvoiceWriter.LINE) == LINE_FIELDS
    assert InvoiceWriter(INVOICES.schema, lambda *_: b"").enabled  # the schema is its layout


def test_the_sinks_columns_are_the_records_fields() -> None:
    header = [f for f in INVOICE_FIELDS if f != "lines"]
    copied = [c for c in COLUMNS["invoices"] if c not in SINK_DERIVED["invoices"] + COORDINATES]
    assert copied == header
    line_columns = [c for c in COLUMNS["invoice_lines"] if c in LINE_FIELDS]
    assert line_columns == list(LINE_FIELDS)
    rest = set(COLUMNS["invoice_lines"]) - set(LINE_FIELDS) - set(SINK_DERIVED["invoice_lines"])
    assert rest <= set(header)  # the invoice's, repeated on each line


def test_the_sink_lands_each_field_in_its_column() -> None:
    rows: dict[str, list] = {t: [] for t in COLUMNS}
    LANDERS[INVOICES.base](RECORD, 3, 42, rows)
    ((invoice,),) = [rows["invoices"]]
    landed = dict(zip(COLUMNS["invoices"], invoice, strict=True))
    assert {k: v for k, v in landed.items() if k in RECORD} == {
        k: v for k, v in RECORD.items() if k != "lines"
    }
    assert landed["line_count"] == 3 and (landed["_partition"], landed["_offset"]) == (3, 42)
    assert landed["recurring_total"] + landed["usage_total"] == INVOICE.total
    for no, (row, line) in enumerate(zip(rows["invoice_lines"], RECORD["lines"], strict=True)):
        cells = dict(zip(COLUMNS["invoice_lines"], row, strict=True))
        assert cells["line_no"] == no
        assert all(
            cells[k] == (line[k] if k in line else RECORD[k]) for k in cells if k != "line_no"
        )


def test_the_public_json_is_the_record_less_its_private_fields() -> None:
    public = invoice_to_dict(INVOICE)
    assert tuple(public) == tuple(f for f in INVOICE_FIELDS if f not in PRIVATE_FIELDS)
    assert all(tuple(line) == LINE_FIELDS for line in public["lines"])
    assert public["total"] == "51.35" and public["lines"][1]["quantity"] == "1234.5"


def test_a_record_written_before_the_credit_fields_lands_as_it_meant() -> None:
    """A billing.invoices record of the first schema (schemas/history/invoice.1.avsc: no
    finalized_at, credit_applied, amount_due) is read with them null and lands finalized
    when issued, with no credit and the total when positive due; payments collects that."""
    import io

    import fastavro

    from streams.codec import MAGIC, SCHEMAS_DIR, load_schema_json, schema_fingerprint
    from streams.processors import payments

    old = fastavro.parse_schema(load_schema_json(SCHEMAS_DIR / "history" / "invoice.1.avsc"))
    for total, due in ((Decimal("51.35"), Decimal("51.35")), (Decimal("-3.00"), Decimal(0))):
        record = {k: v for k, v in RECORD.items() if k in {f["name"] for f in old["fields"]}}
        record["total"] = total
        buf = io.BytesIO()
        buf.write(MAGIC + schema_fingerprint(old))
        fastavro.schemaless_writer(buf, old, record)
        read = codec(INVOICES.schema).decode(buf.getvalue())
        assert (read["finalized_at"], read["credit_applied"], read["amount_due"]) == (None,) * 3
        rows: dict[str, list] = {t: [] for t in COLUMNS}
        LANDERS[INVOICES.base](read, 0, 0, rows)
        landed = dict(zip(COLUMNS["invoices"], rows["invoices"][0], strict=True))
        assert (landed["finalized_at"], landed["credit_applied"], landed["amount_due"]) == (
            INVOICE.issued_at,
            Decimal(0),
            due,
        )
        request = payments.request_for_invoice(buf.getvalue(), ("m-1",), T1)
        assert (request and request["amount"]) == (due or None)
