"""Listing pages and timer scans of one partition's view (RocksDB in tmp_path, no broker)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
from rocksdict import WriteBatch

from engine import keys
from engine.codec import default_codec
from engine.events import (
    Body,
    Event,
    SleepScheduled,
    TimerFired,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowStarted,
    WorkflowTriggered,
)
from engine.listing import Cursor, Page, list_page, merge
from engine.view import PartitionView

CODEC = default_codec()


class Folder:
    """Folds events into a view, one batch per call, with increasing offsets."""

    def __init__(self, path: Path, partition: int = 0):
        self.view = PartitionView(path, "t", partition)
        self.offset = itertools.count()

    def fold(self, *events: tuple[str, str, int, Body]) -> None:
        records = [(next(self.offset), CODEC.encode(Event(eid, wf, ts, body)))
                   for eid, wf, ts, body in events]
        applied, failure = self.view.apply(records)
        assert failure is None and len(applied) == len(records)


def history(n: int, seed: int = 1) -> list[tuple[str, str, int, str]]:
    """(id, workflow, created_at, final status) of ``n`` executions, some created in the
    same millisecond."""
    rng = random.Random(seed)
    return [(f"x{rng.randrange(10**6):06d}-{i}", rng.choice(["a", "b"]), 1000 + i // 3,
             rng.choice(["completed", "failed", "running", "queued", "sleeping"]))
            for i in range(n)]


def fold_history(folder: Folder, executions: list[tuple[str, str, int, str]]) -> None:
    folder.fold(*[(eid, wf, ts, WorkflowTriggered("{}")) for eid, wf, ts, _ in executions])
    ends: dict[str, list[Body]] = {
        "queued": [], "running": [WorkflowStarted("w")],
        "sleeping": [WorkflowStarted("w"), SleepScheduled("sleep#1", 5, 10**9)],
        "completed": [WorkflowStarted("w"), WorkflowCompleted("1")],
        "failed": [WorkflowStarted("w"), WorkflowFailed("E", "m", "")],
    }
    for step in range(2):  # each transition in its own batch, as under light load
        folder.fold(*[(eid, wf, ts + 5, ends[st][step])
                      for eid, wf, ts, st in executions if len(ends[st]) > step])


def expected(executions: list[tuple[str, str, int, str]], status: str | None = None,
             workflow: str | None = None) -> list[str]:
    chosen = [(-ts, eid) for eid, wf, ts, st in executions
              if (status is None or st == status) and (workflow is None or wf == workflow)]
    return [eid for _, eid in sorted(chosen)]


def walk(view: PartitionView, limit: int, **filters: str | None) -> list[str]:
    """Every execution the filter lists, page by page through the cursors."""
    seen: list[str] = []
    cursor = None
    while True:
        page = view.page(before=cursor, limit=limit, **filters)  # type: ignore[arg-type]
        assert len(page.executions) <= limit
        seen += [e.execution_id for e in page.executions]
        if page.next is None:
            return seen
        assert page.next == Cursor.of(page.executions[-1])
        cursor = page.next


@pytest.mark.parametrize("status", [None, "completed", "failed", "running", "queued", "sleeping",
                                    "cancelled"])
@pytest.mark.parametrize("workflow", [None, "a", "b", "nope"])
def test_pages_list_each_filter_newest_first_through_cursors(
        tmp_path: Path, status: str | None, workflow: str | None) -> None:
    folder = Folder(tmp_path / "p0")
    executions = history(120)
    fold_history(folder, executions)
    want = expected(executions, status, workflow)
    for limit in (1, 7, 50, 500):
        assert walk(folder.view, limit, status=status, workflow=workflow) == want
    first = folder.view.page(status, workflow, limit=10)
    assert [e.execution_id for e in first.executions] == want[:10]
    assert all(e.status == status for e in first.executions if status)
    assert all(e.workflow == workflow for e in first.executions if workflow)


def test_a_deep_cursor_reads_from_where_it_points(tmp_path: Path) -> None:
    folder = Folder(tmp_path / "p0")
    executions = history(300)
    fold_history(folder, executions)
    want = expected(executions, "completed")
    summaries = {e.execution_id: e for e in folder.view.page("completed", limit=1000).executions}
    middle = summaries[want[len(want) // 2]]
    page = folder.view.page("completed", before=Cursor.of(middle), limit=5)
    assert [e.execution_id for e in page.executions] == want[len(want) // 2 + 1:][:5]


def test_a_status_change_moves_an_execution_between_pages(tmp_path: Path) -> None:
    folder = Folder(tmp_path / "p0")
    folder.fold(("e1", "a", 1000, WorkflowTriggered("{}")),
                ("e2", "a", 2000, WorkflowTriggered("{}")))
    assert [e.execution_id for e in folder.view.page("queued").executions] == ["e2", "e1"]
    folder.fold(("e1", "a", 3000, WorkflowStarted("w")))
    assert [e.execution_id for e in folder.view.page("queued").executions] == ["e2"]
    assert [e.execution_id for e in folder.view.page("running", "a").executions] == ["e1"]
    folder.fold(("e1", "a", 4000, WorkflowFailed("E", "m", "")))
    assert folder.view.page("running").executions == []
    failed = folder.view.page("failed", "a").executions
    assert [(e.execution_id, e.status, e.error) for e in failed] == [("e1", "failed", "m")]


def test_an_unknown_status_or_a_bad_limit_is_a_clear_error(tmp_path: Path) -> None:
    view = Folder(tmp_path / "p0").view
    with pytest.raises(ValueError, match="bogus"):
        view.page("bogus")
    with pytest.raises(ValueError, match="limit=0"):
        view.page(limit=0)


def test_merged_pages_of_partitions_equal_one_sorted_list(tmp_path: Path) -> None:
    executions = history(200, seed=3)
    views = []
    for p in range(3):
        folder = Folder(tmp_path / f"p{p}", p)
        fold_history(folder, executions[p::3])
        views.append(folder.view)
    for status, workflow in [(None, None), ("failed", None), (None, "b"), ("completed", "a")]:
        want = expected(executions, status, workflow)
        seen, cursor = [], None
        while True:
            page = list_page(views, status=status, workflow=workflow, before=cursor, limit=9)
            seen += [e.execution_id for e in page.executions]
            if page.next is None:
                break
            cursor = page.next
        assert seen == want
        # Pages that travel as JSON merge the same way.
        remote = [Page.from_json(v.page(status, workflow, limit=9).to_json()) for v in views]
        assert merge(remote, 9) == list_page(views, status=status, workflow=workflow, limit=9)
        # The older offset paging still works, with an exact cursor.
        paged = list_page(views, status=status, workflow=workflow, limit=4, offset=5)
        assert [e.execution_id for e in paged.executions] == want[5:9]
        assert paged.next == (Cursor.of(paged.executions[-1]) if len(want) > 9 else None)


def test_merge_of_nothing_and_cursor_text() -> None:
    assert merge([Page([]), Page([])], 5) == Page([], None)
    cursor = Cursor(1700000000000, "ab:c")
    assert Cursor.parse(str(cursor)) == cursor
    for bad in ("", "12", "x:y", ":e", "12:"):
        with pytest.raises(ValueError, match="cursor"):
            Cursor.parse(bad)


def test_a_view_folded_before_the_indexes_gets_them_on_open(tmp_path: Path) -> None:
    folder = Folder(tmp_path / "p0")
    fold_history(folder, history(50))
    before = list(folder.view.dump())
    # Drop every index key and the marker, as a view from an older version has it.
    batch = WriteBatch(raw_mode=True)
    for key, _ in before:
        if key[:2] in (keys.LISTED, keys.BY_STATUS, keys.BY_WORKFLOW, keys.BY_WORKFLOW_STATUS) \
                or key == keys.INDEXES:
            batch.delete(key)
    folder.view.db.write(batch)
    folder.view.close()
    reopened = PartitionView(tmp_path / "p0", "t", 0)
    assert list(reopened.dump()) == before


def test_timers_scan_earliest_first_from_a_position(tmp_path: Path) -> None:
    folder = Folder(tmp_path / "p0")
    folder.fold(*[(f"e{i}", "a", 1000, WorkflowTriggered("{}")) for i in range(6)])
    folder.fold(*[(f"e{i}", "a", 1001, SleepScheduled("sleep#1", 5, 5000 - i * 100))
                  for i in range(6)])
    folder.fold(("e5", "a", 1002, TimerFired("sleep#1", 4500)))
    view = folder.view
    all_timers = view.timers()
    assert all_timers == [(5000 - i * 100, f"e{i}", "sleep#1") for i in (4, 3, 2, 1, 0)]
    assert view.timers(limit=2) == all_timers[:2]
    assert view.timers(after=all_timers[1], limit=2) == all_timers[2:4]
    assert view.timers(after=all_timers[-1]) == []
    assert view.has_timer(4600, "e4", "sleep#1")
    assert not view.has_timer(4500, "e5", "sleep#1")
