"""Finding executions: the dashboard's filters beyond workflow and status, and counts.

The listing indexes (``engine.listing``) answer a workflow and a status. An id
or id prefix, a creation-time range and error text are tested on each summary
while pages are walked newest first. The walk starts at the range's end (a
cursor), stops at its start, and reads at most ``SCAN_LIMIT`` executions: a
search costs at most that many record reads, and a count that stopped there is
shown as "at least". One walk gives both the total count and the page asked for,
so the count does not change from page to page.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from engine.durations import parse_duration
from engine.listing import Cursor, Page
from engine.models import ExecutionSummary

__all__ = ["LAST", "SCAN_LIMIT", "Activity", "Filters", "Found", "activity", "find", "summary_json"]

SCAN_LIMIT = 5000
BATCH = 500
# The "last ..." choices of the time filter: value -> label.
LAST = {"15m": "last 15 minutes", "1h": "last hour", "24h": "last 24 hours", "7d": "last 7 days"}
_TIME_FORMATS = ("%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d")

ListPage = Callable[..., Awaitable[Page]]


@dataclass(frozen=True)
class Filters:
    """What the list is narrowed to, as it travels in the URL (``from_query``/``query``).

    Times are what the user typed (UTC, ``YYYY-MM-DDTHH:MM``); ``since``/``until``
    are the same in epoch ms, with ``last`` (a duration such as ``1h``) taking
    precedence over ``from``.
    """

    workflow: str = ""
    status: str = ""
    id: str = ""
    error: str = ""
    last: str = ""
    time_from: str = ""
    time_to: str = ""
    since: int | None = None
    until: int | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str], statuses: list[str], now: int) -> Filters:
        """The filters of a request's query string; values that do not parse are dropped."""
        status = query.get("status", "")
        last = query.get("last", "")
        filters = cls(workflow=query.get("workflow", "").strip(),
                      status=status if status in statuses else "",
                      id=query.get("id", "").strip(), error=query.get("error", "").strip(),
                      last=last if last in LAST else "",
                      time_from=query.get("from", "").strip(),
                      time_to=query.get("to", "").strip())
        since = now - parse_duration(filters.last) if filters.last else _utc_ms(filters.time_from)
        until = _utc_ms(filters.time_to)
        if until is not None and len(filters.time_to) == len("YYYY-MM-DDTHH:MM"):
            until += 59_999  # "to 09:30" takes in the whole minute
        return replace(filters, since=since, until=until)

    @property
    def narrowed(self) -> bool:
        """Whether any filter is set (the page says "filtered")."""
        return any((self.workflow, self.status, self.id, self.error, self.since is not None,
                    self.until is not None))

    def matches(self, summary: ExecutionSummary) -> bool:
        """Whether ``summary`` passes the filters the listing indexes do not answer."""
        if self.id and not summary.execution_id.startswith(self.id):
            return False
        if self.error and self.error.lower() not in (summary.error or "").lower():
            return False
        if self.since is not None and summary.created_at < self.since:
            return False
        return self.until is None or summary.created_at <= self.until

    def query(self, **extra: str) -> str:
        """The query string of these filters (empty ones left out), plus ``extra``."""
        fields = {"workflow": self.workflow, "status": self.status, "id": self.id,
                  "error": self.error, "last": self.last, "from": self.time_from,
                  "to": self.time_to, **extra}
        return urlencode({k: v for k, v in fields.items() if v})


@dataclass(frozen=True)
class Found:
    """A page of matches, the cursor of the next page, and how many match in all."""

    executions: list[ExecutionSummary]
    next: Cursor | None
    count: int
    exact: bool
    """False when the walk stopped at ``SCAN_LIMIT``: ``count`` is a lower bound."""


async def find(list_page: ListPage, filters: Filters, *, workflow: str | None,
               before: Cursor | None, limit: int) -> Found:
    """The ``limit`` first matches after ``before`` (None: from the newest), and the count.

    ``list_page`` is ``Engine.list_page`` (it reads the partitions folded here and
    asks the owners of the others); ``workflow`` is the workflow name the
    ``filters.workflow`` text resolved to. The count covers the whole range,
    so it is the same on every page; a page beyond what the count could read
    is read on its own.
    """
    start = None if filters.until is None else Cursor(filters.until + 1, "")
    walk = await _walk(list_page, filters, workflow, start, before, limit)
    if walk.ended or len(walk.shown) == limit or before is None:
        return Found(walk.shown, _next(walk.shown, walk.more or not walk.ended), walk.count,
                     walk.ended)
    assert walk.stopped_at is not None  # the page asked for is older than the walk got
    # Go on from where the count stopped, or from ``before`` if that is further.
    page = await _walk(list_page, filters, workflow, max(walk.stopped_at, before, key=_key),
                       before, limit - len(walk.shown))
    shown = walk.shown + page.shown
    return Found(shown, _next(shown, page.more or not page.ended), walk.count, False)


@dataclass
class _Walk:
    shown: list[ExecutionSummary]
    count: int = 0
    more: bool = False
    ended: bool = False  # the range was read to its start: ``count`` is exact
    stopped_at: Cursor | None = None


async def _walk(list_page: ListPage, filters: Filters, workflow: str | None,
                start: Cursor | None, before: Cursor | None, limit: int) -> _Walk:
    """Read from ``start`` on, at most ``SCAN_LIMIT`` executions: count the matches, keep
    the ``limit`` first after ``before``."""
    walk, scanned, cursor = _Walk([]), 0, start
    while scanned < SCAN_LIMIT:
        page = await list_page(workflow=workflow, status=filters.status or None,
                               before=cursor, limit=BATCH)
        for summary in page.executions:
            scanned += 1
            if filters.since is not None and summary.created_at < filters.since:
                walk.ended = True
                return walk
            if not filters.matches(summary):
                continue
            walk.count += 1
            if before is None or _key(Cursor.of(summary)) > _key(before):
                if len(walk.shown) < limit:
                    walk.shown.append(summary)
                else:
                    walk.more = True
        if page.next is None:
            walk.ended = True
            return walk
        cursor = walk.stopped_at = page.next
    return walk


def _key(cursor: Cursor) -> tuple[int, str]:
    """The newest-first order of the listing: later in it means older."""
    return -cursor.created_at, cursor.execution_id


def _next(shown: list[ExecutionSummary], more: bool) -> Cursor | None:
    return Cursor.of(shown[-1]) if more and shown else None


def _utc_ms(text: str) -> int | None:
    """``2026-11-28T09:30`` (UTC, as a datetime-local field sends it) in epoch ms, or None."""
    for form in _TIME_FORMATS:
        try:
            moment = datetime.strptime(text, form).replace(tzinfo=UTC)
        except ValueError:
            continue
        return int(moment.timestamp() * 1000)
    return None


def summary_json(summary: ExecutionSummary, now: int) -> dict[str, Any]:
    """A summary as the list shows it, with ``elapsed_ms`` (so far, while it runs)."""
    row = summary.model_dump(mode="json")
    if summary.duration_ms is None and not summary.status.terminal:
        row["elapsed_ms"] = max(now - (summary.started_at or summary.created_at), 0)
    else:
        row["elapsed_ms"] = summary.duration_ms
    return row


HOUR_MS, DAY_MS = 3_600_000, 86_400_000


@dataclass
class Activity:
    """How one workflow's executions created in a window stand: counts by status."""

    window: str
    by_status: dict[str, int]
    exact: bool = True

    @property
    def total(self) -> int:
        return sum(self.by_status.values())

    @property
    def failure_rate(self) -> float | None:
        """Failed among those that ended failed or completed (None: none has)."""
        failed, completed = self.by_status.get("failed", 0), self.by_status.get("completed", 0)
        return None if failed + completed == 0 else failed / (failed + completed)


async def activity(list_page: ListPage, workflow: str, now: int) -> list[Activity]:
    """The last hour's and the last day's executions of ``workflow``, counted by status
    in one walk of its listing index (at most ``SCAN_LIMIT`` reads)."""
    hour, day = Activity("last hour", {}), Activity("last 24 hours", {})
    cursor: Cursor | None = None
    scanned = 0
    while True:
        page = await list_page(workflow=workflow, before=cursor, limit=BATCH)
        for summary in page.executions:
            if summary.created_at < now - DAY_MS:
                return [hour, day]
            scanned += 1
            for window, span in ((hour, HOUR_MS), (day, DAY_MS)):
                if summary.created_at >= now - span:
                    status = summary.status.value
                    window.by_status[status] = window.by_status.get(status, 0) + 1
        if page.next is None:
            return [hour, day]
        if scanned >= SCAN_LIMIT:
            hour.exact = hour.exact and page.executions[-1].created_at < now - HOUR_MS
            day.exact = False
            return [hour, day]
        cursor = page.next
