"""engine.retention on a real RocksDB view, without a broker: what leaves, what stays,
and that the view stays a function of the log however it is batched."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import keys, retention
from engine.codec import default_codec
from engine.config import load_config
from engine.errors import ConfigError
from engine.events import (
    Body,
    CancelRequested,
    Event,
    StepCompleted,
    StepStarted,
    WorkflowCompleted,
    WorkflowLog,
    WorkflowStarted,
    WorkflowTriggered,
)
from engine.fold import Tx
from engine.view import PartitionView, build_execution

CODEC = default_codec()
SECOND = 1000


def finished(eid: str, at: int) -> list[Event]:
    """A whole execution, triggered at ``at`` and completed 3 ms later."""
    bodies: list[Body] = [WorkflowTriggered("{}"), WorkflowStarted("w"), StepStarted("a", 1),
                          WorkflowLog("info", "hi", None, "w0.0"),
                          StepCompleted("a", 1, None, "1", at + 2), WorkflowCompleted("1")]
    return [Event(eid, "flow", at + min(i, 3), body) for i, body in enumerate(bodies)]


def records(events: list[Event]) -> list[tuple[int, bytes]]:
    return [(offset, CODEC.encode(event)) for offset, event in enumerate(events)]


def fold(path: Path, events: list[Event], batches: list[int] | None = None,
         retention_ms: int | None = SECOND) -> PartitionView:
    """A view of ``events`` folded in batches of the given sizes (default: one batch)."""
    view = PartitionView(path, "t.events", 0, CODEC, retention_ms=retention_ms)
    pending = records(events)
    for size in batches or [len(pending)]:
        applied, failure = view.apply(pending[:size])
        assert failure is None, failure
        pending = pending[size:]
    assert not pending
    return view


def log_with_retention_due() -> list[Event]:
    running = [Event("run", "flow", 100, WorkflowTriggered("{}")),
               Event("run", "flow", 101, WorkflowStarted("w"))]
    late = [Event("late", "flow", 5 * SECOND, WorkflowTriggered("{}"))]
    after = [Event("old", "flow", 6 * SECOND, CancelRequested("too late", "ops")),
             Event("old", "flow", 6 * SECOND, WorkflowTriggered("{}"))]  # its key, again
    return finished("old", 0) + running + late + finished("new", 5 * SECOND + 200) + after


def test_a_finished_execution_leaves_the_view_and_running_ones_stay(tmp_path: Path) -> None:
    view = fold(tmp_path / "v", log_with_retention_due())
    try:
        assert view.record("old") is None and view.gone("old")
        assert build_execution(view, "old") is None
        assert view.steps("old") == [] and view.logs("old") == []
        assert list(view.history("old")) == []
        listed = [s.execution_id for s in view.page().executions]
        assert "old" not in listed and {"run", "new", "late"} <= set(listed)
        run = view.record("run")
        assert run is not None and run["status"] == "running"  # 5 s old, not finished
        assert view.record("new") is not None  # ended 0.8 s before the last event
        assert not any(key.startswith(keys.prefix_of(space, "old"))
                       for key, _ in view.dump() for space in (keys.STEP, keys.HISTORY))
    finally:
        view.close()


def test_the_view_is_the_same_however_the_log_is_batched(tmp_path: Path) -> None:
    events = log_with_retention_due()
    whole = fold(tmp_path / "whole", events)
    one_by_one = fold(tmp_path / "one", events, [1] * len(events))
    rng = random.Random(7)
    sizes: list[int] = []
    while sum(sizes) < len(events):
        sizes.append(min(rng.randint(1, 4), len(events) - sum(sizes)))
    random_batches = fold(tmp_path / "random", events, sizes)
    try:
        assert list(whole.dump()) == list(one_by_one.dump()) == list(random_batches.dump())
    finally:
        for view in (whole, one_by_one, random_batches):
            view.close()


def test_a_backlog_drains_a_bounded_number_per_event(tmp_path: Path) -> None:
    events = [e for n in range(20) for e in finished(f"x{n:02}", n * 10)]
    view = fold(tmp_path / "v", events, retention_ms=None)  # retention off: all kept
    view.close()
    view = PartitionView(tmp_path / "v", "t.events", 0, CODEC, retention_ms=SECOND)
    try:
        offset = len(events)
        for i in range(3):
            tick = Event(f"t{i}", "flow", 10 * SECOND + i, WorkflowTriggered("{}"))
            view.apply([(offset, CODEC.encode(tick))])
            offset += 1
            kept = [n for n in range(20) if view.record(f"x{n:02}") is not None]
            assert kept == list(range(min(20, (i + 1) * retention.PER_EVENT), 20))  # oldest first
    finally:
        view.close()


def test_without_retention_nothing_leaves(tmp_path: Path) -> None:
    view = fold(tmp_path / "v", log_with_retention_due(), retention_ms=None)
    try:
        assert view.record("old") is not None and not view.gone("old")
        assert any(key.startswith(keys.ENDED) for key, _ in view.dump())
    finally:
        view.close()


def test_a_random_log_folds_to_the_same_bytes_in_any_batches(tmp_path: Path) -> None:
    rng = random.Random(17)
    streams = [finished(f"e{n}", rng.randint(0, 20 * SECOND)) for n in range(60)]
    streams += [[Event(f"r{n}", "flow", rng.randint(0, 20 * SECOND), WorkflowTriggered("{}"))]
                for n in range(10)]
    events: list[Event] = []
    while any(streams):  # interleave the executions, each in its own order
        stream = rng.choice([s for s in streams if s])
        events.append(stream.pop(0))
    views = [fold(tmp_path / "whole", events), fold(tmp_path / "one", events, [1] * len(events))]
    sizes: list[int] = []
    while sum(sizes) < len(events):
        sizes.append(min(rng.randint(1, 50), len(events) - sum(sizes)))
    views.append(fold(tmp_path / "random", events, sizes))
    try:
        dumps = [list(view.dump()) for view in views]
        assert dumps[0] == dumps[1] == dumps[2]
        removed = [n for n in range(60) if views[0].gone(f"e{n}")]
        assert 0 < len(removed) < 60
        assert all(views[0].record(f"r{n}") is not None for n in range(10))  # never ended
    finally:
        for view in views:
            view.close()


def test_retention_in_ploy_yaml_is_a_duration_and_off_by_default(tmp_path: Path) -> None:
    path = tmp_path / "ploy.yaml"
    path.write_text("kafka: {partitions: 1}\n")
    assert load_config(path, env={}).retention_ms is None
    path.write_text("retention: 30d\n")
    assert load_config(path, env={}).retention_ms == 30 * 24 * 3600 * 1000
    path.write_text("kafka: {partitions: 1}\nretention: soon\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert (info.value.key, info.value.line) == ("retention", 2)


def test_tx_first_merges_the_store_and_the_batch_in_key_order() -> None:
    rng = random.Random(3)
    stored = {keys.ended(rng.randint(0, 50), f"s{n}"): b"" for n in range(40)}

    def scan(start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
        return iter([(k, v) for k, v in sorted(stored.items()) if start <= k < stop])

    tx = Tx(stored.get, scan)
    live = set(stored)
    for n in range(30):  # this batch's writes: new keys, and deletes of stored ones
        if rng.random() < 0.5:
            key = keys.ended(rng.randint(0, 50), f"p{n}")
            tx.put_raw(key, b"")
            live.add(key)
        else:
            key = rng.choice(sorted(stored))
            tx.delete(key)
            live.discard(key)
    ordered = sorted(live)
    for after in (b"", ordered[5], ordered[-2]):
        for n in (1, 3, 100):
            stop = keys.ENDED + keys.u64(40)
            want = [k for k in ordered if k > after and k < stop][:n]
            assert tx.first(keys.ENDED, after, stop, n) == want


def test_a_view_folded_before_the_index_of_ended_executions_gets_it_on_open(
        tmp_path: Path) -> None:
    view = fold(tmp_path / "v", log_with_retention_due(), retention_ms=None)
    expected = list(view.dump())
    for key, _ in expected:  # what the previous version of the view did not have
        if key.startswith(keys.ENDED) or key == keys.RETENTION:
            view.db.delete(key)
    view.db.put(keys.INDEXES, b"1")
    view.close()
    view = PartitionView(tmp_path / "v", "t.events", 0, CODEC)
    try:
        assert list(view.dump()) == expected
    finally:
        view.close()
