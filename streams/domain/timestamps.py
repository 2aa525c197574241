"""ISO 8601 UTC timestamps: strict parsing, canonical formatting, exact microseconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)


class InvalidTimestamp(ValueError):
    pass


def parse_timestamp(text: str) -> datetime:
    """Parse ISO 8601 with an explicit offset ("Z" or "+00:00"); return aware UTC.

    Naive timestamps are refused rather than guessed: billing a period an hour
    off is worse than a dead letter.
    """
    if not isinstance(text, str):
        raise InvalidTimestamp(f"timestamp must be a string, got {type(text).__name__}")
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidTimestamp(f"invalid ISO 8601 timestamp {text!r}") from None
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise InvalidTimestamp(f"timestamp {text!r} has no UTC offset (append 'Z')")
    try:
        return dt.astimezone(UTC)
    except OverflowError:
        raise InvalidTimestamp(f"timestamp {text!r} is out of range") from None


def format_timestamp(dt: datetime) -> str:
    """``2026-01-31T10:00:00Z``; microseconds only when non-zero."""
    return dt.astimezone(UTC).replace(tzinfo=None).isoformat() + "Z"


def to_micros(dt: datetime) -> int:
    """Exact integer microseconds since the epoch (no float seconds)."""
    return (dt - _EPOCH) // _ONE_US


def from_micros(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def require_utc(dt: datetime) -> datetime:
    if dt.tzinfo is None:
        raise InvalidTimestamp("datetime must be timezone-aware")
    return dt.astimezone(UTC)
