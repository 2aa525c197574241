"""Invoice documents: an invoice with every line kind rendered as HTML (checked as text,
escaping included) and as a PDF that poppler turns into an image (pdftoppm: the page is
not blank) and back into text (pdftotext: what a reader sees)."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from streams.documents import Issuer, invoice_document, locale_for, render
from streams.domain.invoice import Invoice, InvoiceLine

MAR, APR, MID = (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC),
                 datetime(2026, 3, 16, tzinfo=UTC))  # fmt: skip
FEB = datetime(2026, 2, 1, tzinfo=UTC)
ISSUER = Issuer("Acme Billing SAS", "1 rue de la Paix\n75002 Paris", "FR12345678901",
                "billing@acme.test")  # fmt: skip
CUSTOMER = {"account_id": "acct-7", "name": "Globex <Corporation>", "email": "ap@globex.test",
            "address": "10 Downing Lane\n1011 Amsterdam", "country": "FR"}  # fmt: skip


def every_kind() -> Invoice:
    def line(charge: str, kind: str, q: str | None, amount: str, start=MAR, end=APR) -> InvoiceLine:
        return InvoiceLine(charge, kind, start, end, None if q is None else Decimal(q),
                           Decimal(amount))  # fmt: skip

    lines = (
        line("base", "flat", None, "30.00"),
        line("api_calls", "usage", "1250", "12.50", FEB, MAR),
        line("base", "proration_credit", None, "-15.48", MID, APR),
        line("pro", "proration_charge", None, "25.81", MID, APR),
        line("api_calls", "usage_adjustment", "1400", "1.50", FEB, MAR),
        line("WELCOME10", "discount", None, "-5.43", FEB, APR),
        line("tax:FR", "tax", "48.90", "9.78", FEB, APR),
    )
    return Invoice("inv-0001", "acct-7", "sub-7", "EUR", MAR, lines, Decimal("58.68"),
                   "period_end", finalized_at=MAR, credit_applied=Decimal("20.00"),
                   amount_due=Decimal("38.68"))  # fmt: skip


def document() -> dict:
    return invoice_document(every_kind(), CUSTOMER, ISSUER, {"FR": Decimal("0.20")}, "2026-000042")


def test_the_html_shows_every_part_in_the_customers_locale_and_escapes_what_it_is_given() -> None:
    html = render(document(), "html").decode()
    for text in ("Acme Billing SAS", "75002 Paris", "FR12345678901", "1011 Amsterdam",
                 "2026-000042", "inv-0001", "Subscription", "Usage",
                 "Credit for the unused part of the period", "Charge for the rest of the period",
                 "Late usage: correction of a billed period", "Discount (WELCOME10)",
                 "Tax FR 20", "Credit applied", "Amount due", "End of period"):  # fmt: skip
        assert text in html, text
    # fr_FR: a comma for decimals, the symbol after the amount (a narrow no-break space)
    assert "38,68\u00a0€" in html and "1\u202f250" in html
    assert "Globex &lt;Corporation&gt;" in html and "<Corporation>" not in html
    assert locale_for(None) == "en_US" and locale_for("DE") == "de_DE"
    assert locale_for("ZZ") == "en_US"  # not a country: the default


def test_the_pdf_is_a_page_a_reader_sees_the_invoice_on(tmp_path: Path) -> None:
    pdf = tmp_path / "invoice.pdf"
    pdf.write_bytes(render(document(), "pdf"))
    assert pdf.read_bytes().startswith(b"%PDF-")
    # an image of the first page (gray, 50 dpi): not blank
    subprocess.run(["pdftoppm", "-gray", "-r", "50", "-f", "1", "-l", "1", str(pdf),
                    str(tmp_path / "page")], check=True)  # fmt: skip
    (image,) = tmp_path.glob("page*.pgm")
    header, pixels = _pgm(image.read_bytes())
    assert header[0] > 300 and header[1] > 500  # A4 at 50 dpi: 413 x 585
    dark = sum(1 for p in pixels if p < 128)
    assert dark > 2_000, "the page is (nearly) blank"
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], check=True,
                          capture_output=True, text=True).stdout  # fmt: skip
    for expected in ("Invoice", "Globex <Corporation>", "2026-000042", "Discount (WELCOME10)",
                     "Amount due", "38,68", "Credit applied", "20,00", "page 1 of 1"):  # fmt: skip
        assert expected in text, expected


def _pgm(data: bytes) -> tuple[tuple[int, int], bytes]:
    """A binary PGM (P5) -> ((width, height), its pixels)."""
    fields = data.split(maxsplit=4)
    assert fields[0] == b"P5"
    width, height = int(fields[1]), int(fields[2])
    return (width, height), fields[4][-width * height :]
