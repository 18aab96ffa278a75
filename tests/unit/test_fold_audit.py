"""The fold's part of the audit features: who cancelled; a rerun's lineage."""

from __future__ import annotations

from engine import keys
from engine.events import (
    CancelRequested,
    StepCompleted,
    StepStarted,
    WorkflowCancelled,
    WorkflowTriggered,
)
from tests.unit.test_fold import Store


def test_cancel_records_who_asked_and_why() -> None:
    s = Store()
    s.apply(WorkflowTriggered("{}"), CancelRequested("duplicate order", "local:ann@box"),
            WorkflowCancelled("duplicate order"))
    ex = s.execution()
    assert (ex["status"], ex["cancel_reason"], ex["cancel_actor"]) == (
        "cancelled", "duplicate order", "local:ann@box")


def test_a_cancel_without_actor_writes_no_actor_key() -> None:
    s = Store()
    s.apply(WorkflowTriggered("{}"), CancelRequested("stop"))
    assert "cancel_actor" not in s.execution()  # records of v3 cancels are unchanged


def test_a_rerun_is_held_until_its_trigger_comes_again_and_listed_on_its_source() -> None:
    s = Store()
    s.apply(WorkflowTriggered("{}"), StepStarted("a", 1), StepCompleted("a", 1, None, "1", 1000))
    rerun = WorkflowTriggered("{}", rerun_of="e1", rerun_offset=1)
    s.apply(rerun, StepStarted("a", 1), StepCompleted("a", 1, None, "1", 1000), eid="r1")
    ex = s.execution("r1")
    assert (ex["rerun_of"], ex["rerun_offset"], ex["held"], ex["status"]) == (
        "e1", 1, True, "running")
    assert s.data[keys.rerun("e1", 3)] == b"r1"  # the source's lineage, at the trigger's offset
    s.apply(rerun, eid="r1")
    assert "held" not in s.execution("r1")
    assert s.get(keys.step("r1", "a"))["status"] == "completed"
    assert "rerun_of" not in s.execution("e1")
