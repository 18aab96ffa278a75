"""Durations: parsing every accepted form, rejecting the rest, backoff and display."""

from __future__ import annotations

import pytest

from engine.durations import (
    MAX_DURATION_MS,
    backoff_ms,
    format_duration,
    parse_duration,
    within_limit,
)
from engine.errors import DurationError


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        (0, 0),
        (1500, 1500),
        ("5000", 5000),
        ("0", 0),
        ("500ms", 500),
        ("30s", 30_000),
        ("5m", 300_000),
        ("1h", 3_600_000),
        ("1d", 86_400_000),
        ("1h30m", 5_400_000),
        ("2m30s", 150_000),
        ("1d2h", 93_600_000),
        ("1s500ms", 1_500),
        ("1m30ms", 60_030),
        ("1d1h1m1s1ms", 90_061_001),
        ("0s", 0),
        ("90m", 5_400_000),
    ],
)
def test_parse_duration_accepts(value: int | str, ms: int) -> None:
    assert parse_duration(value) == ms


@pytest.mark.parametrize(
    "value",
    [
        -1,
        "-5",
        "-5s",
        1.5,
        "1.5s",
        "5 parsecs",
        "",
        "1x",
        "s",
        "ms",
        "1s1h",  # ascending order
        "30m1h",
        "5m5m",  # a unit twice
        "1h 30m",  # spaces
        " 5s",
        "5s\n",
        "5S",
        "\uff15s",  # a fullwidth digit
        None,
        True,
        False,
        [1],
    ],
)
def test_parse_duration_rejects_naming_the_value(value: object) -> None:
    with pytest.raises(DurationError) as info:
        parse_duration(value)  # type: ignore[arg-type]
    assert info.value.value == value
    assert repr(value) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_durations_go_up_to_100_years() -> None:
    assert parse_duration(MAX_DURATION_MS) == parse_duration("36525d") == 3_155_760_000_000
    assert parse_duration(str(MAX_DURATION_MS)) == MAX_DURATION_MS


@pytest.mark.parametrize("value", [MAX_DURATION_MS + 1, "36525d1ms", "36526d", 10**30,
                                   "9" * 30, 10**5000],
                         ids=["max+1", "36525d1ms", "36526d", "10**30", "30 digits",
                              "an int of 5001 digits"])
def test_longer_than_100_years_is_refused_clearly(value: object) -> None:
    with pytest.raises(DurationError, match=r"longer than 3155760000000 ms \(100 years\)") as info:
        parse_duration(value)  # type: ignore[arg-type]
    assert info.value.value == value
    assert len(str(info.value)) < 200  # a huge value is shown cut short


def test_without_a_limit_any_length_parses_and_within_limit_checks_it_later() -> None:
    assert parse_duration(10**30, limit=None) == 10**30
    assert parse_duration("36526d", limit=None) == 36_526 * 86_400_000
    with pytest.raises(DurationError, match="longer than"):
        within_limit(10**30, 10**30)
    with pytest.raises(DurationError):  # text of thousands of digits is refused as text
        parse_duration("9" * 5000, limit=None)


def test_backoff_doubles_from_one_second_up_to_sixty() -> None:
    waits = [backoff_ms(attempt) for attempt in range(1, 10)]
    assert waits == [1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000]


def test_backoff_uses_its_parameters() -> None:
    assert [backoff_ms(n, initial_ms=100, max_ms=1000, multiplier=3) for n in (1, 2, 3, 4)] == [
        100,
        300,
        900,
        1000,
    ]
    assert backoff_ms(7, initial_ms=250, multiplier=1.0) == 250


def test_backoff_of_a_huge_attempt_is_the_cap() -> None:
    assert backoff_ms(100_000) == 60_000
    # Where the power still fits a float but the product does not (inf): the cap too.
    assert [backoff_ms(n) for n in (1022, 1023, 1024, 1025)] == [60_000] * 4


def test_backoff_attempts_are_one_based() -> None:
    with pytest.raises(ValueError, match="1-based"):
        backoff_ms(0)


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0ms"),
        (850, "850ms"),
        (999, "999ms"),
        (1000, "1s"),
        (1200, "1.2s"),
        (1299, "1.2s"),
        (59_999, "59.9s"),
        (60_000, "1m"),
        (185_000, "3m 5s"),
        (3_600_000, "1h"),
        (7_380_000, "2h 3m"),
        (86_400_000, "1d"),
        (93_600_000, "1d 2h"),
        (-850, "-850ms"),
    ],
)
def test_format_duration(ms: int, text: str) -> None:
    assert format_duration(ms) == text
