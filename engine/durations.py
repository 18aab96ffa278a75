"""Durations: the one place that turns ``"1h30m"`` into milliseconds and back.

Sleeps, step timeouts and ploy.yaml's backoff all accept the same forms (int
milliseconds or a compact string), so they are parsed here once and a malformed
value fails the same way everywhere: with a :class:`~engine.errors.DurationError`
naming it, before anything is appended. The retry schedule lives here too, so
the runtime and the dashboard agree on when the next attempt is due.
"""

from __future__ import annotations

import re

from engine.errors import DurationError

# Units in descending order, each at most once, ASCII digits only: "1d2h", "1h30m", "500ms".
_DURATION = re.compile(
    r"(?:(?P<d>[0-9]+)d)?(?:(?P<h>[0-9]+)h)?(?:(?P<m>[0-9]+)m)?"
    r"(?:(?P<s>[0-9]+)s)?(?:(?P<ms>[0-9]+)ms)?"
)
_UNIT_MS = {"d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1_000, "ms": 1}
# The longest duration written anew: 100 years. A wake time or a deadline (now plus a
# duration) then always fits the log's 64-bit timestamps, and a sleep of longer is a
# mistake. (Those recorded before this limit replay as they were.)
MAX_DURATION_MS = 36_525 * 86_400_000
_MAX_TEXT = 64  # characters: any duration string of 100 years or less is far shorter


def parse_duration(value: int | str, *, limit: int | None = MAX_DURATION_MS) -> int:
    """Convert a duration to milliseconds.

    Args:
        value: Non-negative int milliseconds, a string of ASCII digits
            (milliseconds), or a string of units in descending order, each at
            most once and without spaces: ``"500ms"``, ``"30s"``, ``"5m"``,
            ``"1h"``, ``"1d"``, ``"1h30m"``, ``"1d2h"``.
        limit: The longest accepted (None: any; the workflow context checks it only
            where a duration is written to the log, :func:`within_limit`).

    Returns:
        The duration in milliseconds.

    Raises:
        DurationError: For anything else (negative, float, bool, None,
            ``""``, ``"5 parsecs"``, ``"1s1h"``), and for more than ``limit``
            (100 years, ``MAX_DURATION_MS``).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise DurationError(value)
        ms = value
    elif not isinstance(value, str) or len(value) > _MAX_TEXT:  # (int() of thousands of
        raise DurationError(value)  # digits would raise an error of its own)
    elif value.isascii() and value.isdigit():
        ms = int(value)
    else:
        match = _DURATION.fullmatch(value)
        if not value or match is None:
            raise DurationError(value)
        ms = sum(int(n) * _UNIT_MS[u] for u, n in match.groupdict().items() if n is not None)
    return ms if limit is None else within_limit(ms, value, limit)


def within_limit(ms: int, value: int | str, limit: int = MAX_DURATION_MS) -> int:
    """``ms`` (parsed from ``value``), or DurationError if it is longer than ``limit``."""
    if ms > limit:
        years = " (100 years)" if limit == MAX_DURATION_MS else ""
        raise DurationError(value, f"longer than {limit} ms{years}, the longest there is")
    return ms


def backoff_ms(
    attempt: int, initial_ms: int = 1000, max_ms: int = 60_000, multiplier: float = 2.0
) -> int:
    """Return how long to wait after failed attempt number ``attempt``.

    The wait grows as ``initial_ms * multiplier ** (attempt - 1)`` and is capped
    at ``max_ms``: with the defaults 1 s, 2 s, 4 s ... 60 s.

    Args:
        attempt: The 1-based number of the attempt that just failed.
        initial_ms: The wait after the first failure.
        max_ms: The longest wait.
        multiplier: Growth factor between consecutive waits (>= 1).

    Returns:
        The wait in milliseconds.

    Raises:
        ValueError: If ``attempt`` is below 1.
    """
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, got {attempt}")
    try:
        wait = initial_ms * multiplier ** (attempt - 1)
    except OverflowError:  # a huge attempt number: the cap applies anyway
        return max_ms
    if not wait < max_ms:  # (also inf: 1000 * 2.0 ** 1023 is beyond a float)
        return max_ms
    return round(wait)


def format_duration(ms: int) -> str:
    """Render milliseconds for people: "850ms", "1.2s", "3m 5s", "2h 3m", "1d 2h".

    Two units at most, the smaller one dropped when it is zero; seconds below a
    minute keep one decimal (truncated, so 59.99 s never shows as "60.0s").

    Args:
        ms: A duration in milliseconds; a negative one (clock skew between
            hosts) is shown with a leading ``-`` rather than raising.

    Returns:
        The display string.
    """
    if ms < 0:
        return "-" + format_duration(-ms)
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60_000:
        tenths = ms // 100
        return f"{tenths // 10}s" if tenths % 10 == 0 else f"{tenths / 10:.1f}s"
    if ms < 3_600_000:
        big, small, big_ms, small_ms = "m", "s", 60_000, 1_000
    elif ms < 86_400_000:
        big, small, big_ms, small_ms = "h", "m", 3_600_000, 60_000
    else:
        big, small, big_ms, small_ms = "d", "h", 86_400_000, 3_600_000
    whole, rest = divmod(ms, big_ms)
    part = rest // small_ms
    return f"{whole}{big} {part}{small}" if part else f"{whole}{big}"
