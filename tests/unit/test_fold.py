"""The pure fold, over an in-memory dict: no RocksDB, no Kafka."""

from __future__ import annotations

import json
import random

import pytest

from engine import fold, keys
from engine.codec import default_codec
from engine.errors import InvalidTransitionError
from engine.events import (
    Body,
    CancelRequested,
    Event,
    PartitionClaimed,
    SleepScheduled,
    StepCompleted,
    StepFailed,
    StepStarted,
    TimerFired,
    WorkflowCancelled,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowLog,
    WorkflowStarted,
    WorkflowTriggered,
)
from engine.models import ExecutionStatus


class Store:
    """A dict standing in for one partition's RocksDB, with the view's batch rule."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.offset = 0

    def apply(self, *bodies: Body, eid: str = "e1", ts: int = 1000) -> None:
        tx = fold.Tx(self.data.get)
        for body in bodies:
            event = Event(eid, "wf", ts, body, event_id=f"ev{self.offset}")
            fold.apply(tx, event, 3, self.offset, default_codec().encode(event))
            self.offset += 1
            ts += 10
        self.commit(tx)

    def commit(self, tx: fold.Tx) -> None:
        for key, value in tx.encoded():
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value

    def get(self, key: bytes) -> dict:  # type: ignore[type-arg]
        return json.loads(self.data[key])  # type: ignore[no-any-return]

    def execution(self, eid: str = "e1") -> dict:  # type: ignore[type-arg]
        return self.get(keys.execution(eid))

    def timers(self) -> list[bytes]:
        return sorted(k for k in self.data if k.startswith(keys.TIMER))


def test_trigger_creates_a_queued_execution_indexed_for_listing() -> None:
    s = Store()
    s.apply(WorkflowTriggered('{"a":1}', "k"))
    ex = s.execution()
    assert (ex["status"], ex["input"], ex["idempotency_key"], ex["partition"]) == (
        "queued", '{"a":1}', "k", 3)
    assert keys.active("e1") in s.data
    assert keys.created(1000, "e1") in s.data
    assert keys.history("e1", 0) in s.data


def test_a_second_trigger_changes_nothing_but_the_history() -> None:
    s = Store()
    s.apply(WorkflowTriggered('{"a":1}', "k"), WorkflowStarted("w"))
    s.apply(WorkflowTriggered('{"a":2}', "k"))
    ex = s.execution()
    assert (ex["status"], ex["input"], ex["events"]) == ("running", '{"a":1}', 3)
    assert keys.history("e1", 2) in s.data


def test_event_for_unknown_execution_is_refused() -> None:
    with pytest.raises(InvalidTransitionError, match="e1"):
        Store().apply(StepStarted("s", 1))


def test_step_attempts_retries_and_completion() -> None:
    s = Store()
    s.apply(
        WorkflowTriggered("{}"),
        StepStarted("charge", 1, '{"amt":1}'),
        StepFailed("charge", 1, '{"amt":1}', "IOError", "down", "tb", 1010, 5000, False),
    )
    step = s.get(keys.step("e1", "charge"))
    assert step["status"] == "retrying"
    assert step["attempts"][0]["retry_at"] == 5000
    s.apply(StepStarted("charge", 2), StepCompleted("charge", 2, None, '{"ok":1}', 1500), ts=2000)
    step = s.get(keys.step("e1", "charge"))
    assert step["status"] == "completed"
    assert step["output"] == '{"ok":1}'
    assert [a["attempt"] for a in step["attempts"]] == [1, 2]
    assert step["attempts"][1] == {"attempt": 2, "started_at": 2000, "ended_at": 2010,
                                   "error": None, "retry_at": None}
    assert step["input"] == '{"amt":1}'
    assert s.execution()["status"] == "running"


def test_final_failure_marks_the_step_failed() -> None:
    s = Store()
    s.apply(WorkflowTriggered("{}"), StepFailed("x", 1, None, "E", "m", "", 1000, None, True))
    step = s.get(keys.step("e1", "x"))
    assert (step["status"], step["error"]["message"]) == ("failed", "m")


def test_sleep_indexes_a_timer_and_firing_resumes() -> None:
    s = Store()
    s.apply(WorkflowTriggered("{}"), SleepScheduled("sleep#1", 500, 99_000))
    assert s.execution()["status"] == "sleeping"
    assert s.timers() == [keys.timer(99_000, "e1", "sleep#1")]
    s.apply(TimerFired("sleep#1", 99_000))
    assert s.execution()["status"] == "running"
    assert s.timers() == []
    assert s.get(keys.sleep("e1", "sleep#1"))["status"] == "completed"
    s.apply(TimerFired("sleep#1", 99_000))  # a duplicate firing changes nothing
    assert s.execution()["status"] == "running"


def test_timer_keys_sort_by_wake_time() -> None:
    assert keys.timer(9, "z", "s") < keys.timer(10, "a", "s") < keys.timer(2**40, "a", "s")
    assert keys.parse_timer(keys.timer(12345, "exec", "sleep#2")) == (12345, "exec", "sleep#2")


def test_cancel_while_sleeping_ends_it_at_once_and_drops_the_timer() -> None:
    s = Store()
    s.apply(WorkflowTriggered("{}"), SleepScheduled("sleep#1", 500, 99_000),
            CancelRequested("stop"))
    ex = s.execution()
    assert (ex["status"], ex["cancel_reason"]) == ("cancelled", "stop")
    assert s.timers() == []
    assert keys.active("e1") not in s.data
    s.apply(TimerFired("sleep#1", 99_000), WorkflowCancelled("stop"))
    assert s.execution()["status"] == "cancelled"


def test_terminal_status_never_changes_but_late_steps_are_recorded() -> None:
    s = Store()
    s.apply(WorkflowTriggered("{}"), StepStarted("a", 1), CancelRequested(None))
    s.apply(StepCompleted("a", 1, None, "1", 1000), WorkflowCompleted("2"),
            WorkflowFailed("E", "m", ""))
    ex = s.execution()
    assert (ex["status"], ex["output"], ex["error"]) == ("cancelled", None, None)
    assert s.get(keys.step("e1", "a"))["status"] == "completed"


def test_completion_and_failure() -> None:
    s = Store()
    s.apply(WorkflowTriggered("{}"), WorkflowCompleted('{"r":1}'))
    assert (s.execution()["status"], s.execution()["output"]) == ("completed", '{"r":1}')
    f = Store()
    f.apply(WorkflowTriggered("{}"), WorkflowFailed("ValueError", "bad", "tb"))
    assert f.execution()["error"] == {"type": "ValueError", "message": "bad", "traceback": "tb"}


def test_logs_are_numbered() -> None:
    s = Store()
    s.apply(WorkflowTriggered("{}"), WorkflowLog("info", "a", '{"x":1}'),
            WorkflowLog("warning", "b"))
    assert s.get(keys.log("e1", 1))["message"] == "b"
    assert s.execution()["logs"] == 2


def test_the_fold_is_deterministic_and_batching_does_not_matter() -> None:
    bodies: list[Body] = [
        WorkflowTriggered("{}"), WorkflowStarted("w"), StepStarted("a", 1),
        StepCompleted("a", 1, None, "1", 1000), SleepScheduled("sleep#1", 5, 2000),
        TimerFired("sleep#1", 2000), WorkflowLog("info", "x"), WorkflowCompleted("null"),
    ]
    one_batch, per_event = Store(), Store()
    one_batch.apply(*bodies)
    for i, body in enumerate(bodies):
        per_event.apply(body, ts=1000 + 10 * i)
    assert one_batch.data == per_event.data


def claim(s: Store, epoch: int, worker: str, partition: int = 3) -> None:
    tx = fold.Tx(s.data.get)
    event = Event(f"partition-{partition}", "", 1, PartitionClaimed(partition, worker), epoch=epoch)
    fold.apply(tx, event, partition, s.offset, default_codec().encode(event))
    s.offset += 1
    s.commit(tx)


def test_a_higher_claim_fences_the_former_owners_runtime_events() -> None:
    s = Store()
    claim(s, 1, "a")
    tx_events = [WorkflowTriggered("{}"), StepStarted("x", 1)]
    for body in tx_events:
        s.apply(body)  # epoch 0 < 1: the trigger counts, the step is fenced
    assert s.execution()["events"] == 1
    claim(s, 2, "b")
    claim(s, 2, "c")  # not above the current claim: ignored
    assert s.get(keys.CLAIM)["worker"] == "b"
    tx = fold.Tx(s.data.get)
    for epoch, body in [(1, StepCompleted("x", 1, None, '"zombie"', 1)),
                        (1, CancelRequested("client")),
                        (2, StepCompleted("x", 1, None, '"owner"', 1))]:
        event = Event("e1", "wf", 5, body, epoch=epoch)
        fold.apply(tx, event, 3, s.offset, default_codec().encode(event))
        s.offset += 1
    s.commit(tx)
    assert s.get(keys.step("e1", "x"))["output"] == '"owner"'
    assert s.execution()["status"] == "cancelled"  # a client event is never fenced
    assert s.get(keys.CLAIM)["fenced"] == 2


def test_recorded_error_text_is_bounded() -> None:
    from engine.execution import ERROR_TEXT_LIMIT, error_fields

    try:
        raise ValueError("x" * (ERROR_TEXT_LIMIT * 3))
    except ValueError as exc:
        kind, message, traceback = error_fields(exc)
    assert kind == "ValueError"
    assert len(message) < ERROR_TEXT_LIMIT + 100
    assert message.endswith(f"[{ERROR_TEXT_LIMIT * 2} more bytes]")
    assert len(traceback) < ERROR_TEXT_LIMIT + 100


# -- the listing indexes (rule 7) -------------------------------------------------------


def listed(s: Store, eid: str = "e1") -> set[tuple[str | None, str | None]]:
    """Every (status, workflow) index that lists ``eid``, as (status filter, workflow filter)."""
    ex = json.loads(s.data[keys.execution(eid)])
    found = set()
    for st in (None, *(x.value for x in ExecutionStatus)):
        for wf in (None, "wf", "other"):
            if keys.listing(keys.listing_prefix(st, wf), ex["created_at"], eid) in s.data:
                found.add((st, wf))
    return found


def expected_index(status: str) -> set[tuple[str | None, str | None]]:
    return {(None, None), (None, "wf"), (status, None), (status, "wf")}


def index_writes(tx: fold.Tx) -> dict[bytes, bytes | None]:
    return {k: v for k, v in tx.encoded()
            if k[:2] in (keys.LISTED, keys.BY_STATUS, keys.BY_WORKFLOW, keys.BY_WORKFLOW_STATUS)}


TRANSITIONS: list[tuple[str, list[Body], str]] = [
    ("queued", [], "queued"),
    ("queued", [WorkflowStarted("w")], "running"),
    ("queued", [StepStarted("a", 1)], "running"),
    ("queued", [CancelRequested("stop")], "cancelled"),
    ("queued", [WorkflowCompleted("1")], "completed"),
    ("running", [SleepScheduled("sleep#1", 5, 2000)], "sleeping"),
    ("running", [WorkflowFailed("E", "m", "")], "failed"),
    ("running", [WorkflowCancelled("stop")], "cancelled"),
    ("sleeping", [TimerFired("sleep#1", 2000)], "running"),
    ("sleeping", [CancelRequested("stop")], "cancelled"),
    ("sleeping", [WorkflowCompleted("1")], "completed"),
    ("completed", [StepCompleted("a", 1, None, "1", 1000)], "completed"),
    ("cancelled", [WorkflowCompleted("1"), WorkflowFailed("E", "m", "")], "cancelled"),
]
REACH: dict[str, list[Body]] = {
    "queued": [WorkflowTriggered("{}")],
    "running": [WorkflowTriggered("{}"), WorkflowStarted("w")],
    "sleeping": [WorkflowTriggered("{}"), WorkflowStarted("w"),
                 SleepScheduled("sleep#1", 5, 2000)],
    "completed": [WorkflowTriggered("{}"), WorkflowCompleted("1")],
    "cancelled": [WorkflowTriggered("{}"), CancelRequested("stop")],
}


@pytest.mark.parametrize(("before", "events", "after"), TRANSITIONS,
                         ids=[f"{b}-{'+'.join(type(e).__name__ for e in ev) or 'none'}-{a}"
                              for b, ev, a in TRANSITIONS])
def test_every_status_transition_moves_the_status_index_keys(
        before: str, events: list[Body], after: str) -> None:
    s = Store()
    s.apply(*REACH[before])
    assert listed(s) == expected_index(before)
    s.apply(*events, ts=5000)
    assert s.execution()["status"] == after
    assert listed(s) == expected_index(after)


def test_a_batch_moves_the_index_once_from_the_status_before_it() -> None:
    s = Store()
    s.apply(WorkflowTriggered("{}"))
    tx = fold.Tx(s.data.get)
    for i, body in enumerate([WorkflowStarted("w"), SleepScheduled("sleep#1", 5, 2000),
                              TimerFired("sleep#1", 2000), WorkflowCompleted("1")]):
        event = Event("e1", "wf", 2000 + i, body)
        fold.apply(tx, event, 3, 10 + i, default_codec().encode(event))
    writes = index_writes(tx)
    # Only the queued keys are deleted: no tombstone for running or sleeping.
    assert {k for k, v in writes.items() if v is None} == {
        keys.listing(keys.listing_prefix("queued", wf), 1000, "e1") for wf in (None, "wf")}
    assert {k for k, v in writes.items() if v is not None} == {
        keys.listing(keys.listing_prefix("completed", wf), 1000, "e1") for wf in (None, "wf")}


def test_a_second_trigger_and_a_late_event_write_no_index_key() -> None:
    s = Store()
    s.apply(WorkflowTriggered("{}", "k"), WorkflowCompleted("1"))
    for body in (WorkflowTriggered('{"again":1}', "k"), StepCompleted("a", 1, None, "1", 1),
                 CancelRequested("late")):
        tx = fold.Tx(s.data.get)
        event = Event("e1", "wf", 9000, body)
        fold.apply(tx, event, 3, s.offset, default_codec().encode(event))
        s.offset += 1
        assert index_writes(tx) == {}
        s.commit(tx)
    assert listed(s) == expected_index("completed")


def test_fenced_events_leave_the_indexes_as_they_are() -> None:
    s = Store()
    s.apply(WorkflowTriggered("{}"), WorkflowStarted("w"))
    claim(s, 2, "b")
    tx = fold.Tx(s.data.get)
    for body in (WorkflowCompleted("1"), SleepScheduled("sleep#1", 5, 2000)):
        event = Event("e1", "wf", 9000, body, epoch=1)
        assert fold.apply(tx, event, 3, s.offset, default_codec().encode(event)) is False
        s.offset += 1
    assert index_writes(tx) == {}
    s.commit(tx)
    assert listed(s) == expected_index("running")


def test_index_keys_list_newest_first_and_parse_back() -> None:
    prefix = keys.listing_prefix("failed", "wf")
    newer, older = keys.listing(prefix, 2000, "a"), keys.listing(prefix, 1000, "b")
    assert newer < older < keys.end_of(prefix)
    assert keys.listing(prefix, 2000, "a") < keys.listing(prefix, 2000, "b")
    assert keys.parse_listing(prefix, older) == (1000, "b")
    # One filter's prefix is never the start of another's.
    assert not keys.listing_prefix("queued", "wf").startswith(keys.listing_prefix(None, "wf"))
    assert not keys.listing_prefix(None, "wf").startswith(keys.listing_prefix(None, "w"))


def test_random_histories_keep_the_indexes_exact_in_any_batching() -> None:
    """Whatever the events and however they are batched, the indexes hold exactly the
    keys the execution records imply (what a view rebuilt from the records would have)."""
    rng = random.Random(7)
    choices: list[Body] = [
        WorkflowStarted("w"), StepStarted("a", 1), StepCompleted("a", 1, None, "1", 1),
        SleepScheduled("sleep#1", 5, 2000), TimerFired("sleep#1", 2000),
        SleepScheduled("sleep#2", 5, 3000), TimerFired("sleep#2", 3000),
        CancelRequested("c"), WorkflowCancelled("c"), WorkflowCompleted("1"),
        WorkflowFailed("E", "m", ""), WorkflowLog("info", "x"),
    ]
    for _ in range(40):
        events = []
        for n in range(6):
            events.append((f"e{n}", WorkflowTriggered("{}")))
        events += [(f"e{rng.randrange(6)}", rng.choice(choices)) for _ in range(30)]
        one, split = Store(), Store()
        for eid, body in events:
            one.apply(body, eid=eid, ts=1000 + int(eid[1:]))
        i = 0
        while i < len(events):
            n = rng.randint(1, 8)
            tx = fold.Tx(split.data.get)
            for eid, body in events[i:i + n]:
                event = Event(eid, "wf", 1000 + int(eid[1:]), body, event_id=f"ev{split.offset}")
                fold.apply(tx, event, 3, split.offset, default_codec().encode(event))
                split.offset += 1
            split.commit(tx)
            i += n
        assert one.data == split.data
        for n in range(6):
            assert listed(one, f"e{n}") == expected_index(one.execution(f"e{n}")["status"])
        index_keys = [k for k in one.data if k[:2] in (keys.LISTED, keys.BY_STATUS,
                                                       keys.BY_WORKFLOW, keys.BY_WORKFLOW_STATUS)]
        assert len(index_keys) == 6 * 4


def test_a_view_written_with_json_dumps_folds_on() -> None:
    """Views folded before orjson hold ASCII-escaped JSON: they read and fold on."""
    s = Store()
    s.apply(WorkflowTriggered('{"name":"Zoë"}'))
    key = keys.execution("e1")
    s.data[key] = json.dumps(s.execution(), sort_keys=True).encode()  # the old bytes
    s.apply(WorkflowCompleted('{"ok":"ü"}'))
    ex = s.execution()
    assert (ex["status"], ex["input"], ex["output"]) == ("completed", '{"name":"Zoë"}',
                                                         '{"ok":"ü"}')


def test_an_execution_created_in_a_batch_is_read_once_and_leaves_no_tombstone() -> None:
    """The view cannot hold keys of an execution the batch created: its step is not read,
    and its active key, put and deleted in the batch, is not written at all."""
    s = Store()
    reads: list[bytes] = []

    def read(key: bytes) -> bytes | None:
        reads.append(key)
        return s.data.get(key)

    tx = fold.Tx(read)
    for i, body in enumerate([WorkflowTriggered("{}"), StepStarted("a", 1),
                              StepCompleted("a", 1, None, "1", 1000), WorkflowCompleted("1")]):
        event = Event("e1", "wf", 1000 + i, body)
        fold.apply(tx, event, 3, i, default_codec().encode(event))
    writes = dict(tx.encoded())
    # The claim and the retention record (engine.retention) are read once per batch.
    assert [k for k in reads if k not in (keys.CLAIM, keys.RETENTION)] == [keys.execution("e1")]
    assert keys.active("e1") not in writes
    assert json.loads(writes[keys.step("e1", "a")] or b"")["status"] == "completed"
