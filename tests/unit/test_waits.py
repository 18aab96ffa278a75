"""The fold of waits and events, over an in-memory dict: no RocksDB, no Kafka."""

from __future__ import annotations

import json
from collections.abc import Iterator

from engine import fold, keys, waits
from engine.codec import default_codec
from engine.events import (
    Body,
    CancelRequested,
    Event,
    EventSent,
    TimerFired,
    WaitStarted,
    WorkflowStarted,
    WorkflowTriggered,
)

DAY = 24 * 3600 * 1000


class Store:
    """One partition's keys in a dict, scanned in key order as RocksDB would."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.offset = 0

    def scan(self, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
        return iter(sorted((k, v) for k, v in self.data.items() if start <= k < stop))

    def apply(self, body: Body, eid: str = "e1", ts: int = 1000) -> list[str]:
        """Fold one event; the executions it woke."""
        tx = fold.Tx(self.data.get, self.scan)
        event = Event(eid, "wf", ts, body, event_id=f"ev{self.offset}")
        fold.apply(tx, event, 0, self.offset, default_codec().encode(event))
        self.offset += 1
        woken = list(tx.woken)
        for key, value in tx.encoded():
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value
        return woken

    def record(self, eid: str) -> dict:  # type: ignore[type-arg]
        return json.loads(self.data[keys.execution(eid)])  # type: ignore[no-any-return]

    def wait(self, eid: str, key: str = "w") -> dict:  # type: ignore[type-arg]
        return json.loads(self.data[keys.sleep(eid, key)])  # type: ignore[no-any-return]

    def stats(self) -> dict:  # type: ignore[type-arg]
        return json.loads(self.data[keys.EVENT_STATS])  # type: ignore[no-any-return]


def started(store: Store, eid: str, ts: int = 1000) -> None:
    store.apply(WorkflowTriggered("{}"), eid, ts)
    store.apply(WorkflowStarted("w1"), eid, ts)


def sent(id: str, data: object, event_type: str = "paid", target: str | None = None,
         source: str = "s") -> EventSent:
    return EventSent(id, event_type, source, 5, json.dumps(data), target)


def wait(match: object, since: int = 0, timeout_at: int | None = None,
         key: str = "w") -> WaitStarted:
    return WaitStarted(key, "paid", json.dumps(match), since, timeout_at)


def test_a_waiter_receives_the_first_matching_event_once_and_runs_again() -> None:
    s = Store()
    started(s, "e1")
    s.apply(wait({"order.id": 7}), "e1", 1100)
    assert s.record("e1")["status"] == "waiting"
    assert s.apply(sent("a", {"order": {"id": 8}}), "x", 1200) == []  # another order
    assert s.apply(sent("b", {"order": {"id": 7}, "amount": 3}), "x", 1300) == ["e1"]
    assert s.apply(sent("c", {"order": {"id": 7}}), "x", 1400) == []  # the wait is over
    assert s.record("e1")["status"] == "running"
    assert s.wait("e1")["event"]["id"] == "b"
    assert keys.history("e1", 4) in s.data  # the event, at its offset, in the history
    assert not [k for k in s.data if k.startswith(keys.WAITER)]
    assert s.stats() == {"received": 3, "duplicates": 0, "delivered": 1,
                         "dropped_unmatched": 0}


def test_an_event_before_the_wait_is_found_by_the_lookback_not_before_since() -> None:
    s = Store()
    s.apply(sent("old", {"k": 1}), "x", 500)
    s.apply(sent("new", {"k": 1}), "x", 1500)
    started(s, "e1")
    assert s.apply(wait({"k": 1}, since=1000), "e1", 2000) == ["e1"]
    assert s.wait("e1")["event"]["id"] == "new"
    # A second wait of the same execution never gets an event it already received.
    s.apply(wait({"k": 1}, since=0, key="w2"), "e1", 2100)
    assert s.wait("e1", "w2")["event"]["id"] == "old"
    s.apply(wait({"k": 1}, since=0, key="w3"), "e1", 2200)
    assert s.wait("e1", "w3")["status"] == "waiting"


def test_a_since_before_1970_from_another_writer_looks_back_over_every_kept_event() -> None:
    s = Store()
    s.apply(sent("old", {"k": 1}), "x", 500)
    started(s, "e1")
    assert s.apply(wait({"k": 1}, since=-1000), "e1", 2000) == ["e1"]  # no fold failure
    assert s.wait("e1")["event"]["id"] == "old"


def test_a_repeated_id_is_ignored_and_each_waiter_gets_a_broadcast_once() -> None:
    s = Store()
    for eid in ("e1", "e2"):
        started(s, eid)
        s.apply(wait({"k": 1}), eid, 1100)
    assert sorted(s.apply(sent("a", {"k": 1}), "x", 1200)) == ["e1", "e2"]
    assert s.apply(sent("a", {"k": 2}), "x", 1300) == []  # same source and id: a repeat
    assert s.stats()["duplicates"] == 1
    assert s.apply(sent("a", {"k": 2}, source="other"), "x", 1400) == []  # a new event


def test_a_targeted_event_reaches_only_its_execution() -> None:
    s = Store()
    for eid in ("e1", "e2"):
        started(s, eid)
        s.apply(wait({}), eid, 1100)
    assert s.apply(sent("a", {}, target="e2"), "e2", 1200) == ["e2"]
    assert s.record("e1")["status"] == "waiting"


def test_a_timeout_and_a_cancel_end_the_wait_and_forget_the_waiter() -> None:
    s = Store()
    started(s, "e1")
    started(s, "e2")
    s.apply(wait({"k": 1}, timeout_at=5000), "e1", 1100)
    s.apply(wait({"k": 1}, timeout_at=5000), "e2", 1100)
    assert keys.timer(5000, "e1", "w") in s.data
    s.apply(TimerFired("w", 5000), "e1", 5000)
    assert (s.wait("e1")["status"], s.record("e1")["status"]) == ("timed_out", "running")
    s.apply(CancelRequested("stop"), "e2", 5100)
    assert (s.wait("e2")["status"], s.record("e2")["status"]) == ("cancelled", "cancelled")
    assert not [k for k in s.data if k.startswith((keys.WAITER, keys.WAIT_SHAPE, keys.TIMER))]
    assert s.apply(sent("late", {"k": 1}), "x", 5200) == []


def test_unmatched_events_are_dropped_after_the_retention_and_counted() -> None:
    s = Store()
    s.apply(sent("a", {"k": 1}), "x", 1000)
    s.apply(sent("b", {"k": 2}), "x", 2000)
    s.apply(sent("c", {"k": 3}), "x", 1500 + waits.RETENTION_MS)  # a's retention is over
    assert s.stats()["dropped_unmatched"] == 1
    assert keys.event_id("s", "a") not in s.data  # its id may come again as a new event
    started(s, "e1", 2 * DAY)
    assert s.apply(wait({"k": 1}), "e1", 2 * DAY) == []
    assert s.apply(wait({"k": 2}, since=2 * DAY, key="w2"), "e1", 2 * DAY) == []  # b: before
