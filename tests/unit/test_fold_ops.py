"""The fold's parts for schedules, patches and versions (pure, over a dict)."""

from __future__ import annotations

import json

from engine import keys
from engine.events import Patched, ScheduleUpdated, WorkflowStarted, WorkflowTriggered
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
