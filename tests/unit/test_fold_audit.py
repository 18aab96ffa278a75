"""The fold's part of the audit features: who cancelled; a rerun's lineage."""

from __future__ import annotations

from engine.events import CancelRequested, WorkflowCancelled, WorkflowTriggered
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
