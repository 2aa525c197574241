"""Exact decimal money: parsing, currency minor units, one-time half-even rounding.

All arithmetic goes through the explicit context ``CTX`` (never the thread's
default context, whose 28 digits would silently round large sums).
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation

from babel.numbers import get_currency_precision, is_currency

# 100 significant digits: inputs are bounded below (18 integer + 18 fractional
# digits), so products, sums of many events and proration quotients stay exact
# (or, for non-terminating quotients, far below the final rounding step).
CTX = Context(prec=100, rounding=ROUND_HALF_EVEN, Emin=-999999, Emax=999999)

ZERO = Decimal(0)
ONE = Decimal(1)

MAX_INTEGER_DIGITS = 18
MAX_FRACTION_DIGITS = 18


class InvalidDecimal(ValueError):
    """A value that is not an acceptable decimal (float, NaN, garbage, out of range)."""


class UnknownCurrency(ValueError):
    pass


def parse_decimal(value: object, *, allow_negative: bool = False) -> Decimal:
    """Parse a JSON decimal string (or integer) exactly; an already decoded
    ``Decimal`` (Avro ``decimal``) is validated the same way.

    JSON floats are refused: by the time orjson has produced a float the exact
    decimal the sender wrote is already lost.
    """
    if isinstance(value, bool):  # bool is an int subclass; `true` is no amount
        raise InvalidDecimal(f"expected a decimal string, got boolean {value!r}")
    if isinstance(value, float):
        raise InvalidDecimal(f"expected a decimal string, got JSON float {value!r}")
    if isinstance(value, Decimal):
        d = value
    elif isinstance(value, int):
        d = Decimal(value)
    elif isinstance(value, str):
        text = value.strip()
        if text != value or not text:
            raise InvalidDecimal(f"invalid decimal {value!r}")
        try:
            d = Decimal(text)
        except InvalidOperation:
            raise InvalidDecimal(f"invalid decimal {value!r}") from None
    else:
        raise InvalidDecimal(f"expected a decimal string, got {type(value).__name__}")
    if not d.is_finite():
        raise InvalidDecimal(f"decimal must be finite, got {value!r}")
    if d.is_zero():
        return d.copy_abs()  # "-0" is just 0
    if d.adjusted() >= MAX_INTEGER_DIGITS:
        raise InvalidDecimal(f"decimal {value!r} is too large (max {MAX_INTEGER_DIGITS} digits)")
    if d.as_tuple().exponent < -MAX_FRACTION_DIGITS:
        # normalize() drops trailing zeros so "1.000…0" is still accepted
        n = d.normalize(CTX)
        if n.as_tuple().exponent < -MAX_FRACTION_DIGITS:
            raise InvalidDecimal(
                f"decimal {value!r} has more than {MAX_FRACTION_DIGITS} fractional digits"
            )
        d = n
    if not allow_negative and d.is_signed():
        raise InvalidDecimal(f"must not be negative, got {value!r}")
    return d


# currency code -> (minor units, quantum); babel's lookups are slow and its data
# is fixed for the life of the process. Only valid codes are cached, so the cache
# is bounded by ISO 4217.
_CURRENCIES: dict[str, tuple[int, Decimal]] = {}


def _currency(currency: str) -> tuple[int, Decimal]:
    try:
        return _CURRENCIES[currency]
    except (KeyError, TypeError):
        pass
    if not isinstance(currency, str) or not is_currency(currency):
        # babel's get_currency_precision silently answers 2 for any unknown code
        raise UnknownCurrency(f"unknown currency code {currency!r}")
    digits = int(get_currency_precision(currency))
    entry = _CURRENCIES[currency] = (digits, Decimal(1).scaleb(-digits))
    return entry


def minor_units(currency: str) -> int:
    """Digits after the decimal point for an ISO 4217 code (EUR 2, JPY 0, KWD 3)."""
    return _currency(currency)[0]


def round_money(amount: Decimal, currency: str) -> Decimal:
    """Round an exact amount once, half-even, to the currency's minor unit."""
    q = amount.quantize(_currency(currency)[1], context=CTX)
    return q.copy_abs() if q.is_zero() else q  # never emit "-0.00"


def format_money(amount: Decimal, currency: str) -> str:
    return f"{round_money(amount, currency):f}"


def format_quantity(quantity: Decimal) -> str:
    """Normalized plain decimal: 1000 (not 1E+3), 2.5 (not 2.50), 0."""
    n = quantity.normalize(CTX)
    if n.is_zero():
        return "0"
    return f"{n:f}"


def add(a: Decimal, b: Decimal) -> Decimal:
    return CTX.add(a, b)


def mul(a: Decimal, b: Decimal) -> Decimal:
    return CTX.multiply(a, b)


def total(amounts: list[Decimal] | tuple[Decimal, ...]) -> Decimal:
    acc = ZERO
    for a in amounts:
        acc = CTX.add(acc, a)
    return acc
