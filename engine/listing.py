"""Listing executions newest first, a page at a time, across partitions.

Each partition answers a page from its own listing indexes
(:meth:`engine.view.PartitionView.page`); :func:`merge` combines the pages of
several partitions into one, whether they were read here or arrived as JSON
from the processes that own those partitions (:meth:`Page.from_json`).

The order is by creation time, newest first, and among executions created in
the same millisecond by execution id (the byte order of the index keys). A cursor names the last
execution of a page; the next page holds what comes strictly after it in that
order. Creation time and id never change, so a cursor stays valid however
statuses move: a page neither repeats nor skips an execution that keeps its
status between two requests.

Why a merge of per-partition pages is exact: each partition's page holds its
``limit`` first executions after the cursor, so the ``limit`` first of all of
them are among the pages' union. Asking every partition for the next page
after the merged page's last execution continues where the merge stopped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from engine.models import ExecutionSummary

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "Cursor", "Page", "Pager", "list_page", "merge"]

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000


class Cursor(NamedTuple):
    """A position in the newest-first order: the last execution of a page."""

    created_at: int
    execution_id: str

    def __str__(self) -> str:
        return f"{self.created_at}:{self.execution_id}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """The inverse of ``str()``: ``"<created_at>:<execution id>"``.

        Raises:
            ValueError: ``text`` is not a cursor (the message quotes it).
        """
        created, sep, eid = text.partition(":")
        if not sep or not created.isdigit() or not eid or "\x00" in eid:
            raise ValueError(f"not a listing cursor: {text!r} "
                             "(expected '<created_at>:<execution id>', as a page's 'next')")
        return cls(int(created), eid)

    @classmethod
    def of(cls, summary: ExecutionSummary) -> Cursor:
        return cls(summary.created_at, summary.execution_id)


def _order(summary: ExecutionSummary) -> tuple[int, str]:
    """The sort key of the listing order (newest first, then by id), as the indexes keep it."""
    return -summary.created_at, summary.execution_id


@dataclass(frozen=True)
class Page:
    """Executions newest first, and the cursor of the next page (None: there is none)."""

    executions: list[ExecutionSummary]
    next: Cursor | None = None

    def to_json(self) -> dict[str, Any]:
        """What an owner sends: ``{"executions": [...], "next": "<cursor>" | null}``."""
        return {"executions": [e.model_dump(mode="json") for e in self.executions],
                "next": None if self.next is None else str(self.next)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Page:
        """The inverse of :meth:`to_json` (a page from another process)."""
        nxt = data.get("next")
        return cls([ExecutionSummary.model_validate(e) for e in data["executions"]],
                   None if nxt is None else Cursor.parse(nxt))


def merge(pages: Iterable[Page], limit: int) -> Page:
    """One page of the ``limit`` newest executions of several pages, and its next cursor.

    Every page must have been read after the same cursor with the same
    ``limit`` (or a larger one). Pure: no I/O, so pages may come from anywhere.
    """
    if limit < 1:
        raise ValueError(f"a page holds at least one execution (limit={limit})")
    found: list[ExecutionSummary] = []
    more = False
    for page in pages:
        found.extend(page.executions)
        more = more or page.next is not None
    found.sort(key=_order)
    taken = found[:limit]
    more = more or len(found) > limit
    return Page(taken, Cursor.of(taken[-1]) if more and taken else None)


class Pager(Protocol):
    """What answers a page: a partition's view, or a client of the process that owns it."""

    def page(self, status: str | None = None, workflow: str | None = None,
             before: Cursor | None = None, limit: int = DEFAULT_LIMIT) -> Page: ...


def list_page(pagers: Sequence[Pager], *, status: str | None = None,
              workflow: str | None = None, before: Cursor | None = None,
              limit: int = DEFAULT_LIMIT, offset: int = 0) -> Page:
    """The merged page of every pager (blocking: call it off the event loop).

    ``offset`` is the older way to page (kept for the API's ``offset``
    parameter): it skips that many executions after ``before``, at the cost of
    reading them. The cursor of the returned page is exact either way.
    """
    if offset < 0:
        raise ValueError(f"offset must be >= 0 (offset={offset})")
    merged = merge([p.page(status, workflow, before, limit + offset) for p in pagers],
                   limit + offset)
    if not offset:
        return merged
    return Page(merged.executions[offset:], merged.next)
