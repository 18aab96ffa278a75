"""The fold's parts for schedules, patches and versions (pure, over a dict)."""

from __future__ import annotations

import json

import pytest

from engine import keys
from engine.events import Patched, ScheduleUpdated, WorkflowStarted, WorkflowTriggered
from engine.schedules import fire_key, origin_of
from tests.unit.test_fold import Store


def test_schedule_updates_fold_into_one_record_never_fenced() -> None:
    store = Store()
    spec = '{"every_ms":1000}'
    fired = json.dumps({"fire_at": 5000, "execution_id": "x1"})
    skipped = json.dumps({"count": 3, "until": 9000, "reason": "catchup"})
    store.apply(ScheduleUpdated("s", "registered", "config", None, spec),
                ScheduleUpdated("s", "fired", "w1", None, fired),
                ScheduleUpdated("s", "paused", "local:ann", "holiday"),
                ScheduleUpdated("s", "skipped", "w1", "catchup", skipped),
                ScheduleUpdated("s", "resumed", "local:ann", None),
                eid="schedule-s")
    record = store.get(keys.schedule("s"))
    assert record["spec"] == {"every_ms": 1000} and record["registered_at"] == 1000
    assert (record["last_fire_at"], record["last_execution"]) == (9000, "x1")
    assert (record["fired"], record["skipped"], record["paused"]) == (1, 3, False)
    assert record["resumed_at"] == 1040
    assert [(r["action"], r["actor"], r["reason"]) for r in record["recent"]] == [
        ("registered", "config", None), ("paused", "local:ann", "holiday"),
        ("resumed", "local:ann", None)]
    assert store.data.get(keys.execution("schedule-s")) is None  # not an execution
    # What the Schedules page lists: the executions it started, what it gave up, the pause.
    assert record["started"] == [{"execution_id": "x1", "fire_at": 5000, "by": None,
                                  "at": 1010}]
    assert record["skips"] == [{"count": 3, "until": 9000, "reason": "catchup", "running": None,
                                "at": 1030}]
    assert record["pause"] is None


def test_a_schedule_record_keeps_the_pause_note_and_the_latest_ten_of_each_list() -> None:
    store = Store()
    triggered = [json.dumps({"execution_id": f"n{i}"}) for i in range(12)]
    store.apply(ScheduleUpdated("s", "paused", "dashboard:local", "<b>deploy</b>"),
                *(ScheduleUpdated("s", "triggered", "ann", None, t) for t in triggered),
                eid="schedule-s")
    record = store.get(keys.schedule("s"))
    assert record["paused"] and record["pause"]["actor"] == "dashboard:local"
    assert record["pause"]["reason"] == "<b>deploy</b>"  # as given: escaping is the page's
    assert [s["execution_id"] for s in record["started"]] == [f"n{i}" for i in range(2, 12)]
    assert {(s["fire_at"], s["by"]) for s in record["started"]} == {(None, "ann")}


def test_a_record_folded_before_the_lists_existed_gets_them_empty() -> None:
    store = Store()
    old = {"name": "s", "spec": None, "registered_at": 1, "paused": False, "resumed_at": None,
           "last_fire_at": None, "last_execution": None, "fired": 0, "skipped": 0,
           "recent": [], "updated_at": 1}
    store.data[keys.schedule("s")] = json.dumps(old).encode()
    store.apply(ScheduleUpdated("s", "fired", "w1", None,
                                json.dumps({"fire_at": 5000, "execution_id": "x1"})),
                eid="schedule-s")
    record = store.get(keys.schedule("s"))
    assert record["fired"] == 1 and [s["execution_id"] for s in record["started"]] == ["x1"]
    assert record["skips"] == [] and record["pause"] is None


@pytest.mark.parametrize(("key", "origin"), [
    ("schedule:nightly-report:2026-11-28T01:00:00Z", ("nightly-report", 1795827600000)),
    ("schedule:a.b:2026-11-28T01:00:00.250Z", ("a.b", 1795827600250)),
    ("schedule:nightly:now:0123abcd", ("nightly", None)),
    ("schedule:nightly:yesterday", None), ("schedule:bad name:now:1", None),
    ("schedule:x:2026-11-28T01:00:00", None),  # no zone: not a key a schedule writes
    ("order-17", None), (None, None)])
def test_the_schedule_that_started_an_execution_is_read_from_its_key(
        key: str | None, origin: tuple[str, int | None] | None) -> None:
    assert origin_of(key) == origin
    if origin is not None and origin[1] is not None:
        assert origin_of(fire_key(*origin)) == origin  # type: ignore[arg-type]


def test_patches_and_the_version_are_kept_on_the_execution_and_refold_identically() -> None:
    bodies = (WorkflowTriggered("{}", trace_parent="00-" + "a" * 32 + "-" + "b" * 16 + "-01"),
              WorkflowStarted("w1", "v2"), Patched("p1"), Patched("p1"), Patched("p2"))
    one, two = Store(), Store()
    one.apply(*bodies)
    for i, body in enumerate(bodies):
        two.apply(body, ts=1000 + 10 * i)  # one event per batch: the same bytes
    ex = one.execution()
    assert ex["version"] == "v2" and ex["patches"] == ["p1", "p2"]
    assert ex["trace_parent"].startswith("00-aaaa")
    assert one.data == two.data
