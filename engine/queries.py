"""Queries about executions: answered here where this process folds the partition,
else by the partition's owner; result waiters and event streams fed by the fold.

``Queries`` is the query half of :class:`engine.runtime.Runtime` (which mixes it
in): reads never run on the event loop thread (view reads go to a thread), and a
query about a partition folded elsewhere carries this process's acknowledged
offset there, so it reads its own writes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator
from typing import Any

from engine.directory import Directory
from engine.erasure import KeyStore, reveal_entry, reveal_execution, reveal_history, reveal_summary
from engine.errors import CodecError, NotFoldedHereError, OwnerUnavailableError
from engine.events import (
    CancelRequested,
    Event,
    WorkflowCancelled,
    WorkflowCompleted,
    WorkflowFailed,
)
from engine.fold import TERMINAL
from engine.listing import Cursor, Page, list_page, merge
from engine.log import EventLog
from engine.models import Execution, ExecutionSummary, HistoryEntry
from engine.partitions import Partitions
from engine.view import PartitionView, build_execution, history_entries

ENDS = (WorkflowCompleted, WorkflowFailed, WorkflowCancelled, CancelRequested)
MAX_WAIT_S = 60.0  # a long-poll or a stream slice at an owner; the asker asks again
# An execution of at most this many events is built on the event loop (~100 us), larger
# ones in a thread: the hop costs more than a small build, and a busy loop more still.
INLINE_EVENTS = 64
Seen = tuple[int, int, Event]  # (partition, offset, event) as the fold applied it


class Queries:
    """get / history / list / wait for the end / stream, for any execution."""

    # What the runtime provides.
    log: EventLog
    partitions: Partitions
    directory: Directory | None
    key_store: KeyStore  # opens data subjects' sealed payloads for every answer
    _watchers: dict[str, list[asyncio.Queue[Seen]]]
    _end_watchers: dict[str, list[asyncio.Queue[Seen]]]
    _listers: list[ChangeFeed]

    # -- queries: here if this process folds the partition, else at its owner ------------

    async def _local_view(self, partition: int, min_offset: int | None) -> PartitionView | None:
        """The view of ``partition`` once it holds ``min_offset`` (default: every event
        this process had acknowledged there); None if this process does not fold it."""
        return await self.partitions.caught_up(partition, min_offset)

    async def _ask(self, partition: int, path: str, min_offset: int | None = None,
                   timeout_s: float = 10.0, **params: Any) -> tuple[int, Any]:
        """GET ``path`` from the owner of ``partition``, once it holds ``min_offset`` and
        every write this process had acknowledged there (read-your-writes)."""
        if self.directory is None:
            raise OwnerUnavailableError(partition, "this process folds it but is not caught up")
        mine = self.log.high_acked.get(partition)
        wanted = max((o for o in (min_offset, mine) if o is not None), default=None)
        return await self.directory.ask(partition, path,
                                        {"local": 1, "min_offset": wanted, **params},
                                        timeout_s=timeout_s)

    async def _record(self, eid: str) -> dict[str, Any] | None:
        """The execution record (status, workflow, ...), here or at its owner."""
        partition = self.log.partition_for(eid)
        view = await self._local_view(partition, None)
        if view is not None:
            return view.record(eid)
        execution = await self.get_execution(eid)
        if execution is None:
            return None
        return {"id": eid, "workflow": execution.workflow, "status": execution.status.value,
                "ended_at": execution.ended_at, "cancel_reason": execution.cancel_reason}

    async def get_execution(self, execution_id: str, *, local: bool = False,
                            min_offset: int | None = None) -> Execution | None:
        """The execution as its partition's view has it, or None for an unknown id.

        ``local``: answer from this process only (a routed query), else NotFoldedHereError.
        """
        partition = self.log.partition_for(execution_id)
        view = await self._local_view(partition, min_offset)
        if view is not None:
            record = view.record(execution_id)
            return None if record is None else await self._built(view, execution_id, record)
        if local:
            raise NotFoldedHereError(partition)
        status, payload = await self._ask(partition, f"/executions/{execution_id}", min_offset)
        if status == 404:
            return None
        if status != 200:
            raise OwnerUnavailableError(partition, f"answered {status}: {payload}")
        return Execution.model_validate(payload)

    async def _built(self, view: PartitionView, execution_id: str,
                     record: dict[str, Any]) -> Execution | None:
        """The execution of ``record`` in ``view``: built here when small and not sealed
        (cheaper than a hop to a thread), else in a thread, opened for its subject."""
        if record["events"] <= INLINE_EVENTS and record.get("subject") is None:
            return build_execution(view, execution_id, record)
        return await asyncio.to_thread(
            lambda: reveal_execution(self.key_store, build_execution(view, execution_id)))

    async def history(self, execution_id: str, *, local: bool = False,
                      min_offset: int | None = None) -> list[HistoryEntry] | None:
        """Every event of the execution with its partition and offset (the audit trail)."""
        partition = self.log.partition_for(execution_id)
        view = await self._local_view(partition, min_offset)
        if view is not None:
            if view.record(execution_id) is None:
                if not view.gone(execution_id):
                    return None
                return await asyncio.to_thread(self._history_in_log, execution_id, partition)
            return await asyncio.to_thread(lambda: reveal_history(
                self.key_store, history_entries(view, execution_id), execution_id))
        if local:
            raise NotFoldedHereError(partition)
        status, payload = await self._ask(partition, f"/executions/{execution_id}/history",
                                          min_offset)
        if status == 404:
            return None
        if status != 200:
            raise OwnerUnavailableError(partition, f"answered {status}: {payload}")
        return [HistoryEntry.model_validate(e) for e in payload["events"]]

    def _history_in_log(self, execution_id: str, partition: int) -> list[HistoryEntry]:
        """The history of an execution that retention removed from the view (``engine.
        retention``): a read of its whole partition of the log, filtered by id. It costs
        a scan of the partition (seconds for millions of events): for audits, not polling."""
        wanted = execution_id.encode()
        entries = []
        for batches in self.log.read_until_end({partition: 0}):
            for offset, raw in batches.get(partition, []):
                if wanted not in raw:
                    continue  # cheaper than decoding: most records are of other executions
                try:
                    event = self.log.codec.decode(raw)
                except CodecError:
                    continue  # the fold stopped there; the id is not its concern
                if event.execution_id == execution_id:
                    entries.append(_entry(partition, offset, event))
        return reveal_history(self.key_store, entries, execution_id) or []

    # -- results pushed, not polled ----------------------------------------------------

    @contextlib.contextmanager
    def _watch(self, execution_id: str, *, ends_only: bool = False
               ) -> Iterator[asyncio.Queue[Seen]]:
        """A queue of the execution's events as the fold applies them (costs nothing idle);
        ``ends_only``: only those that may end it (a result waiter wakes once, not per step)."""
        watchers = self._end_watchers if ends_only else self._watchers
        queue: asyncio.Queue[Seen] = asyncio.Queue()
        watchers.setdefault(execution_id, []).append(queue)
        try:
            yield queue
        finally:
            queues = watchers.get(execution_id, [])
            if queue in queues:
                queues.remove(queue)
            if not queues:
                watchers.pop(execution_id, None)

    # -- what changed, for live lists ---------------------------------------------------

    def _tell_listers(self, applied: Iterable[tuple[int, Event]]) -> None:
        """On the event loop, after a fold: tell every live list which executions changed."""
        if self._listers:
            changed = {event.execution_id for _, event in applied}
            for feed in self._listers:
                feed.add(changed)

    async def changes(self) -> AsyncGenerator[list[str], None]:
        """The ids of the executions each fold here changed (a burst coalesced into one
        item), for as long as the caller listens. Silent for partitions folded elsewhere."""
        feed = ChangeFeed()
        self._listers.append(feed)
        try:
            while True:
                yield await feed.take()
        finally:
            self._listers.remove(feed)

    async def wait_for_end(self, execution_id: str, timeout_s: float, *, local: bool = False,
                           min_offset: int | None = None) -> Execution | None:
        """The execution once it has ended (completed, failed or cancelled); None for an
        unknown id; TimeoutError after ``timeout_s``.

        Where this process folds the partition, the wait is a queue the fold feeds:
        it wakes on the end event, with no polling. Elsewhere it long-polls the
        owner, which waits the same way.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        partition = self.log.partition_for(execution_id)
        while True:
            if self.partitions.folds(partition):
                found = await self._wait_here(execution_id, partition, deadline, min_offset)
                if found is not _MOVED:
                    return found  # type: ignore[return-value]
            if local:
                raise NotFoldedHereError(partition)
            if loop.time() >= deadline:
                raise TimeoutError(f"execution {execution_id} has not ended after "
                                   f"{timeout_s:g} s")
            wait_s = min(deadline - loop.time(), MAX_WAIT_S)
            try:
                status, payload = await self._ask(
                    partition, f"/executions/{execution_id}/result", min_offset,
                    wait=f"{int(wait_s * 1000)}ms", timeout_s=wait_s + 10)
            except OwnerUnavailableError:  # its owner is changing: ask again, until the end
                await asyncio.sleep(0.2)
                continue
            if status == 404:
                return None
            if status == 200:
                return Execution.model_validate(payload)
            if status >= 500:  # the owner stopped mid-wait: ask again, whoever owns it now
                await asyncio.sleep(0.2)
            elif status != 202:  # 202: not ended within the wait; ask again
                raise OwnerUnavailableError(partition, f"answered {status}: {payload}")

    async def _wait_here(self, execution_id: str, partition: int, deadline: float,
                         min_offset: int | None) -> Execution | None | object:
        """``wait_for_end`` on a partition folded here; ``_MOVED`` if it stops being so."""
        loop = asyncio.get_running_loop()
        with self._watch(execution_id, ends_only=True) as seen:
            found = await self._record_here(execution_id, partition, min_offset)
            while isinstance(found, tuple) and found[1]["status"] not in TERMINAL:
                if not self.partitions.folds(partition):
                    return _MOVED
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError(f"execution {execution_id} is still "
                                       f"{found[1]['status']}")
                try:  # a slice of at most 1 s: then look again whether it is folded here
                    async with asyncio.timeout(min(remaining, 1.0)):  # (no task, as wait_for)
                        _, offset, event = await seen.get()
                except TimeoutError:
                    continue
                if isinstance(event.body, ENDS):  # folded: read as of it, with no wait
                    found = await self._record_here(execution_id, partition, offset)
            if not isinstance(found, tuple):
                return found  # None (unknown) or _MOVED
            return await self._built(found[0], execution_id, found[1])

    async def _record_here(self, execution_id: str, partition: int, min_offset: int | None
                           ) -> tuple[PartitionView, dict[str, Any]] | None | object:
        """The view folded here and the execution's record in it (None: unknown; ``_MOVED``:
        not folded here any more). A waiter reads only the record until the end: building
        the execution costs ~0.2 ms, for nothing while it runs."""
        view = await self._local_view(partition, min_offset)
        if view is None:
            return _MOVED
        record = view.record(execution_id)
        return None if record is None else (view, record)

    async def stream(self, execution_id: str, *, after: int = -1,
                     local: bool = False) -> AsyncGenerator[HistoryEntry, None]:
        """Every event of the execution in log order (those after offset ``after``), then
        each new one as the fold applies it, until its end event."""
        partition = self.log.partition_for(execution_id)
        if await self.get_execution(execution_id, local=local) is None:
            return  # an unknown id has no events
        seen = [after]  # the last offset sent, shared with the helpers
        while True:
            source = (self._stream_here(execution_id, partition, seen)
                      if self.partitions.folds(partition) else None)
            if source is None:
                if local:
                    raise NotFoldedHereError(partition)
                source = self._stream_at_owner(execution_id, seen)
            async for entry in source:
                yield entry
                if entry.type in _END_TYPES:
                    return

    async def _stream_here(self, execution_id: str, partition: int,
                           seen: list[int]) -> AsyncIterator[HistoryEntry]:
        """The history so far, then the fold's feed, while this process folds it."""
        with self._watch(execution_id) as feed:
            for entry in await self.history(execution_id) or []:
                if entry.offset > seen[0]:
                    seen[0] = entry.offset
                    yield entry
            while self.partitions.folds(partition):
                try:
                    async with asyncio.timeout(1.0):
                        p, offset, event = await feed.get()
                except TimeoutError:
                    continue
                if offset > seen[0]:
                    seen[0] = offset
                    yield reveal_entry(self.key_store, _entry(p, offset, event), execution_id)

    async def _stream_at_owner(self, execution_id: str,
                               seen: list[int]) -> AsyncIterator[HistoryEntry]:
        """The owner's history, followed by asking again every 250 ms (one round)."""
        for entry in await self.history(execution_id) or []:
            if entry.offset > seen[0]:
                seen[0] = entry.offset
                yield entry
        await asyncio.sleep(0.25)

    async def list_executions(self, *, workflow: str | None = None, status: str | None = None,
                              limit: int = 50, offset: int = 0,
                              partitions: Iterable[int] | None = None,
                              local: bool = False) -> list[ExecutionSummary]:
        """Executions newest first, filtered by workflow and status (see :meth:`list_page`)."""
        page = await self.list_page(workflow=workflow, status=status, limit=limit,
                                    offset=offset, partitions=partitions, local=local)
        return page.executions

    async def list_page(self, *, workflow: str | None = None, status: str | None = None,
                        before: Cursor | None = None, limit: int = 50, offset: int = 0,
                        partitions: Iterable[int] | None = None, local: bool = False) -> Page:
        """A page of executions newest first, across partitions, from just after ``before``.

        The partitions folded here are read from their listing indexes, off the
        event loop; the others are asked of their owners (one request per owner,
        each returning its own page from the same cursor) and the pages merged.
        """
        wanted = set(range(self.log.partitions) if partitions is None else partitions)
        here = sorted(p for p in wanted if self.partitions.folds(p))
        elsewhere = sorted(wanted - set(here))
        if elsewhere and local:
            raise NotFoldedHereError(elsewhere[0])
        views = [v for p in here if (v := await self._local_view(p, None)) is not None]
        pages = [await asyncio.to_thread(list_page, views, status=status, workflow=workflow,
                                         before=before, limit=offset + limit)]
        by_owner: dict[str, list[int]] = {}
        for p in elsewhere:
            card = self.directory.owner(p) if self.directory is not None else None
            by_owner.setdefault(card["worker"] if card else f"?{p}", []).append(p)
        for owned in by_owner.values():
            code, payload = await self._ask(
                owned[0], "/executions", partitions=",".join(map(str, owned)),
                workflow=workflow, status=status, limit=offset + limit,
                before=None if before is None else str(before))
            if code != 200:
                raise OwnerUnavailableError(owned[0], f"answered {code}: {payload}")
            pages.append(Page.from_json(payload))
        merged = merge(pages, offset + limit)
        return Page([reveal_summary(self.key_store, e) for e in merged.executions[offset:]],
                    merged.next)


class ChangeFeed:
    """Execution ids changed since the listener last took them: a set, so a slow
    listener costs at most ``LIMIT`` ids however much the fold applies."""

    LIMIT = 1000

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.ready = asyncio.Event()

    def add(self, ids: set[str]) -> None:
        if len(self.ids) < self.LIMIT:
            self.ids |= ids
        self.ready.set()

    async def take(self) -> list[str]:
        await self.ready.wait()
        self.ready.clear()
        taken, self.ids = sorted(self.ids), set()
        return taken


_END_TYPES = {"WorkflowCompleted", "WorkflowFailed", "WorkflowCancelled"}
_MOVED = object()  # the partition stopped being folded here during a wait


def _entry(partition: int, offset: int, event: Event) -> HistoryEntry:
    """A history entry of an event the fold just applied (as ``history_entries`` builds)."""
    return HistoryEntry(partition=partition, offset=offset, event_id=event.event_id,
                        timestamp=event.timestamp, type=event.type, epoch=event.epoch,
                        body=dict(vars(event.body)))
