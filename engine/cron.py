"""Five-field cron expressions and fixed intervals: when a schedule fires. Pure.

    minute hour day-of-month month day-of-week
    */5    9-17 *            *     mon-fri

Each field is ``*`` or a comma list of ``N``, ``A-B``, ``*/S``, ``A-B/S`` or
``A/S`` (from A to the field's end). Months take ``jan``..``dec``, weekdays
``sun``..``sat`` (0 and 7 are Sunday). As in Vixie cron, when both the day of
month and the day of week are restricted a day matching either one fires.
``@hourly``, ``@daily``, ``@weekly``, ``@monthly`` and ``@yearly`` are short forms.

Times are evaluated on the wall clock of a time zone (``zoneinfo``): on a
daylight-saving day a wall time that does not exist does not fire, and a wall
time that happens twice fires once, the first time. Written here rather than
taken from ``croniter`` because the whole grammar is these few lines and each
fire time must be computed identically by every worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12),
           ("day of week", 0, 7))
_MONTHS = {n: i + 1 for i, n in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"))}
_DAYS = {n: i for i, n in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
           "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
           "@hourly": "0 * * * *"}
_WALK_LIMIT = 100_000  # fire times counted one by one before skipping ahead
_WEEK_MS = 7 * 24 * 3600 * 1000
_SEARCH_YEARS = 8  # a matching minute, if any, is within this many years (Feb 29 on a Monday)


class CronError(ValueError):
    """A cron expression that cannot be parsed, or that never fires."""


@dataclass(frozen=True)
class Cron:
    """A parsed five-field expression: the allowed values of each field."""

    expression: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool  # the day-of-month field is '*'
    any_weekday: bool  # the day-of-week field is '*'

    @classmethod
    def parse(cls, expression: str) -> Cron:
        """Parse ``expression``; CronError names the field and the part that is wrong."""
        text = _MACROS.get(expression.strip().lower(), expression)
        parts = text.split()
        if len(parts) != 5:
            raise CronError(f"cron expression {expression!r} has {len(parts)} fields; "
                            "expected 5: minute hour day-of-month month day-of-week")
        values = [_field(part, *spec, expression) for part, spec in zip(parts, _FIELDS,
                                                                        strict=True)]
        minutes, hours, days, months, weekdays = values
        cron = cls(expression, frozenset(minutes), frozenset(hours), frozenset(days),
                   frozenset(months), frozenset(d % 7 for d in weekdays),
                   any_day=parts[2].startswith("*"), any_weekday=parts[4].startswith("*"))
        if cron.after(datetime(2000, 1, 1)) is None:
            raise CronError(f"cron expression {expression!r} never fires")
        return cron

    def day_matches(self, day: date) -> bool:
        in_month = day.day in self.days
        in_week = (day.weekday() + 1) % 7 in self.weekdays
        if not self.any_day and not self.any_weekday:
            return in_month or in_week
        return in_month and in_week

    def after(self, wall: datetime) -> datetime | None:
        """The first matching minute strictly after the naive wall time ``wall``."""
        t = wall.replace(second=0, microsecond=0) + timedelta(minutes=1)
        limit = wall.year + _SEARCH_YEARS
        while t.year <= limit:
            if t.month not in self.months:
                t = datetime(t.year + t.month // 12, t.month % 12 + 1, 1)
            elif not self.day_matches(t.date()):
                t = datetime(t.year, t.month, t.day) + timedelta(days=1)
            elif t.hour not in self.hours:
                t = t.replace(minute=0) + timedelta(hours=1)
            elif t.minute not in self.minutes:
                t += timedelta(minutes=1)
            else:
                return t
        return None


def _field(part: str, name: str, low: int, high: int, expression: str) -> set[int]:
    names = _MONTHS if name == "month" else _DAYS if name == "day of week" else {}
    values: set[int] = set()
    for item in part.split(","):
        try:
            values |= _item(item.lower(), low, high, names)
        except ValueError as exc:
            raise CronError(f"cron expression {expression!r}: {name} field {part!r}: "
                            f"{exc}") from None
    return values


def _item(item: str, low: int, high: int, names: dict[str, int]) -> set[int]:
    span, _, step_text = item.partition("/")
    step = _number(step_text, names={}) if step_text else 1
    if step < 1:
        raise ValueError("a step must be at least 1")
    if span == "*":
        first, last = low, high
    elif "-" in span:
        a, b = span.split("-", 1)
        first, last = _number(a, names), _number(b, names)
    else:
        first = _number(span, names)
        last = high if step_text else first
    if not low <= first <= high or not low <= last <= high:
        raise ValueError(f"values must be within {low}-{high}")
    if first > last:
        raise ValueError(f"range {first}-{last} runs backwards")
    return set(range(first, last + 1, step))


def _number(text: str, names: dict[str, int]) -> int:
    if text in names:
        return names[text]
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a number" + (
            f" or a name ({', '.join(names)})" if names else ""))
    return int(text)


@dataclass(frozen=True)
class Timing:
    """When a schedule fires: a cron expression on a zone's wall clock, or every
    ``every_ms`` (instants that are multiples of it since the epoch, so every worker
    computes the same ones)."""

    cron: Cron | None = None
    every_ms: int | None = None
    zone: str = "UTC"

    def next_after(self, ms: int) -> int:
        """The first fire time (epoch ms) strictly after ``ms``."""
        if self.every_ms is not None:
            return (ms // self.every_ms + 1) * self.every_ms
        assert self.cron is not None
        zone = ZoneInfo(self.zone)
        wall = datetime.fromtimestamp(ms / 1000, zone).replace(tzinfo=None)
        while True:
            candidate = self.cron.after(wall)
            if candidate is None:
                raise CronError(f"cron expression {self.cron.expression!r} never fires again")
            wall = candidate
            aware = candidate.replace(tzinfo=zone)  # fold=0: a repeated wall time's first
            if aware.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != candidate:
                continue  # a wall time skipped by a daylight-saving change
            at = int(aware.timestamp() * 1000)
            if at > ms:
                return at

    def between(self, after: int, until: int, keep: int) -> tuple[list[int], int]:
        """Fire times in (``after``, ``until``]: the last ``keep`` of them and how many
        there are in all (counted up to a bound, past which the earliest are not
        walked: a year of minutely firings costs nothing)."""
        if self.every_ms is not None:
            first = after // self.every_ms + 1
            last = until // self.every_ms
            count = max(last - first + 1, 0)
            start = max(first, last - keep + 1)
            return [n * self.every_ms for n in range(start, last + 1)], count
        times: list[int] = []
        count, at = 0, after
        while True:
            if count == _WALK_LIMIT:  # a long downtime: count on from a week before the end
                at = max(at, until - _WEEK_MS)
            at = self.next_after(at)
            if at > until:
                return times, count
            count += 1
            times.append(at)
            if len(times) > keep:
                del times[0]


def iso(ms: int) -> str:
    """A fire time as it appears in idempotency keys: UTC, ISO 8601, to the millisecond
    only when it has some (``2026-11-28T09:30:00Z``)."""
    when = datetime.fromtimestamp(ms / 1000, UTC)
    spec = "milliseconds" if ms % 1000 else "seconds"
    return when.isoformat(timespec=spec).replace("+00:00", "Z")
