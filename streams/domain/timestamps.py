"""ISO 8601 UTC timestamps: strict parsing, canonical formatting, exact microseconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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
    if dt.tzinfo is UTC:  # "Z" / "+00:00": astimezone(UTC) would return dt itself
        return dt
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise InvalidTimestamp(f"timestamp {text!r} has no UTC offset (append 'Z')")
    try:
        return dt.astimezone(UTC)
    except OverflowError:
        raise InvalidTimestamp(f"timestamp {text!r} is out of range") from None


def timestamp_from_datetime(dt: datetime) -> datetime:
    """Validate an already decoded timestamp (e.g. Avro ``timestamp-micros``): it must
    be timezone-aware; it is returned normalized to UTC, like ``parse_timestamp``."""
    if not isinstance(dt, datetime):
        raise InvalidTimestamp(f"timestamp must be a datetime, got {type(dt).__name__}")
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise InvalidTimestamp(f"timestamp {dt.isoformat()!r} has no UTC offset (naive datetime)")
    if dt.tzinfo is UTC:
        return dt
    try:
        return dt.astimezone(UTC)
    except OverflowError:
        raise InvalidTimestamp(f"timestamp {dt.isoformat()!r} is out of range") from None


def format_timestamp(dt: datetime) -> str:
    """``2026-01-31T10:00:00Z``; microseconds only when non-zero."""
    return dt.astimezone(UTC).replace(tzinfo=None).isoformat() + "Z"


def to_micros(dt: datetime) -> int:
    """Exact integer microseconds since the epoch (no float seconds)."""
    d = dt - _EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


def from_micros(us: int) -> datetime:
    return _EPOCH + timedelta(0, 0, us)


def require_utc(dt: datetime) -> datetime:
    tz = dt.tzinfo
    if tz is UTC:
        return dt  # what astimezone(UTC) would return (the same object)
    if tz is None:
        raise InvalidTimestamp("datetime must be timezone-aware")
    return dt.astimezone(UTC)
