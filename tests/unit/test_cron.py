"""Cron expressions and intervals: parsing, next fire times, time zones."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from engine.cron import Cron, CronError, Timing, iso


def ms(text: str, zone: str = "UTC") -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp() * 1000)


def wall(at: int, zone: str = "UTC") -> str:
    return datetime.fromtimestamp(at / 1000, ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M")


def fires(expr: str, start: str, n: int, zone: str = "UTC") -> list[str]:
    timing, at, out = Timing(cron=Cron.parse(expr), zone=zone), ms(start, zone), []
    for _ in range(n):
        at = timing.next_after(at)
        out.append(wall(at, zone))
    return out


def test_fields_ranges_lists_steps_and_names() -> None:
    cron = Cron.parse("*/15 9-17/4 1,15 jan-mar mon-fri")
    assert cron.minutes == {0, 15, 30, 45}
    assert cron.hours == {9, 13, 17}
    assert cron.days == {1, 15} and cron.months == {1, 2, 3}
    assert cron.weekdays == {1, 2, 3, 4, 5}
    assert Cron.parse("5/20 * * * 7").minutes == {5, 25, 45}
    assert Cron.parse("0 0 * * 7").weekdays == {0}  # 7 is Sunday too
    assert Cron.parse("@hourly").minutes == {0}


def test_next_fire_times() -> None:
    assert fires("*/5 * * * *", "2026-11-28 09:31:10", 3) == [
        "2026-11-28 09:35", "2026-11-28 09:40", "2026-11-28 09:45"]
    assert fires("0 9 * * mon", "2026-11-28 10:00", 2) == ["2026-11-30 09:00", "2026-12-07 09:00"]
    assert fires("0 0 29 2 *", "2026-01-01 00:00", 1) == ["2028-02-29 00:00"]
    assert fires("59 23 31 12 *", "2026-12-31 23:59", 1) == ["2027-12-31 23:59"]


def test_day_of_month_or_day_of_week_when_both_are_restricted() -> None:
    # the 1st of the month, and every Sunday (Vixie cron)
    assert fires("0 0 1 * sun", "2026-11-28 00:00", 3) == [
        "2026-11-29 00:00", "2026-12-01 00:00", "2026-12-06 00:00"]


def test_time_zone_and_daylight_saving() -> None:
    paris = "Europe/Paris"
    assert fires("0 12 * * *", "2026-11-28 13:00", 1, paris) == ["2026-11-29 12:00"]
    assert Timing(cron=Cron.parse("0 12 * * *"), zone=paris).next_after(
        ms("2026-11-28 13:00", paris)) == ms("2026-11-29 11:00")  # 12:00 CET is 11:00 UTC
    # 2026-03-29 02:30 does not exist in Paris: it does not fire that day
    assert fires("30 2 * * *", "2026-03-28 03:00", 2, paris) == [
        "2026-03-30 02:30", "2026-03-31 02:30"]
    # 2026-10-25 02:30 happens twice: it fires once
    timing = Timing(cron=Cron.parse("30 2 * * *"), zone=paris)
    first = timing.next_after(ms("2026-10-25 00:00", paris))
    assert timing.next_after(first) - first == 25 * 3600 * 1000


@pytest.mark.parametrize(("expr", "problem"), [
    ("* * * *", "has 4 fields"),
    ("61 * * * *", "minute field '61': values must be within 0-59"),
    ("* * * foo *", "month field 'foo': 'foo' is not a number or a name"),
    ("*/0 * * * *", "a step must be at least 1"),
    ("5-1 * * * *", "range 5-1 runs backwards"),
    ("0 0 31 2 *", "never fires"),
])
def test_bad_expressions_say_what_is_wrong(expr: str, problem: str) -> None:
    with pytest.raises(CronError, match=problem):
        Cron.parse(expr)


def test_intervals_and_the_times_between() -> None:
    every = Timing(every_ms=10_000)
    assert every.next_after(25_000) == 30_000 and every.next_after(30_000) == 40_000
    assert every.between(25_000, 61_000, 2) == ([50_000, 60_000], 4)
    assert every.between(60_000, 61_000, 5) == ([], 0)
    cron = Timing(cron=Cron.parse("* * * * *"))
    start = ms("2026-11-28 09:00")
    times, count = cron.between(start, start + 10 * 60_000, 3)
    assert count == 10 and [wall(t) for t in times] == [
        "2026-11-28 09:08", "2026-11-28 09:09", "2026-11-28 09:10"]


def test_iso_fire_times() -> None:
    at = int(datetime(2026, 11, 28, 9, 30, tzinfo=UTC).timestamp() * 1000)
    assert iso(at) == "2026-11-28T09:30:00Z"
    assert iso(at + 250) == "2026-11-28T09:30:00.250Z"
