"""The ingress's hold on new executions during a burst of triggers (``engine.ingress``):
pure logic on a real event loop, no broker."""

from __future__ import annotations

import asyncio

import pytest

from engine import ingress
from engine.ingress import BURST, Ingress


def started_into(seen: list[str]) -> Ingress:
    return Ingress(seen.append)


def accept(gate: Ingress, n: int = BURST) -> None:
    for _ in range(n):
        gate.enter()


def answer(gate: Ingress, n: int = BURST) -> None:
    for _ in range(n):
        gate.leave()


async def turns(n: int = 10) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def burst_of(gate: Ingress, ids: list[str], grace: float) -> None:
    """A burst that holds ``ids`` and is answered; back once its grace ran out and the
    starts it held were made."""
    accept(gate)
    for eid in ids:
        gate.hold(eid)
    answer(gate)
    await asyncio.sleep(grace * 2)
    await turns(20)


@pytest.fixture
def grace(monkeypatch: pytest.MonkeyPatch) -> float:
    """A grace that no stall of a busy machine outlasts, and a long bound."""
    monkeypatch.setattr(ingress, "GRACE_S", 0.2)
    monkeypatch.setattr(ingress, "MAX_HOLD_S", 30.0)
    return 0.2


async def test_fewer_triggers_than_a_burst_hold_nothing(grace: float) -> None:
    seen: list[str] = []
    gate = started_into(seen)
    accept(gate, BURST - 1)
    assert not gate.holding
    assert gate.hold("a") is False  # start it now
    answer(gate, BURST - 1)
    assert gate.accepting == 0 and not gate.holding and seen == []


async def test_a_burst_holds_starts_until_it_is_answered_then_starts_them_in_order(
        grace: float) -> None:
    seen: list[str] = []
    gate = started_into(seen)
    accept(gate)
    ids = [f"e{i}" for i in range(150)]  # more than a CHUNK: started over several turns
    assert all(gate.hold(eid) for eid in ids)
    answer(gate)
    await asyncio.sleep(grace / 4)
    assert seen == []  # the grace runs: the burst's next triggers may still come
    await asyncio.sleep(grace * 2)
    await turns()
    assert seen == ids
    assert not gate.holding and gate.hold("later") is False


async def test_a_trigger_in_the_grace_keeps_the_burst_on(grace: float) -> None:
    seen: list[str] = []
    gate = started_into(seen)
    accept(gate)
    gate.hold("a")
    answer(gate)
    await asyncio.sleep(grace / 4)
    gate.enter()  # the next of the burst
    await asyncio.sleep(grace * 2)
    assert seen == [] and gate.holding
    gate.hold("b")
    gate.leave()
    await asyncio.sleep(grace * 2)
    await turns()
    assert seen == ["a", "b"]


async def test_a_steady_flood_gets_max_hold_then_shares_the_loop_until_a_quiet_moment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingress, "GRACE_S", 0.01)
    monkeypatch.setattr(ingress, "MAX_HOLD_S", 0.1)
    seen: list[str] = []
    gate = started_into(seen)
    accept(gate)  # never all answered: a steady load
    assert gate.hold("a")
    await asyncio.sleep(0.3)
    await turns()
    assert seen == ["a"]  # held for MAX_HOLD_S at most
    accept(gate, BURST)  # more of the flood: no new burst, it would starve the executions
    assert gate.hold("b") is False
    answer(gate, 2 * BURST)
    accept(gate)  # at once: a moment with none in flight is no quiet moment
    assert gate.hold("b2") is False
    answer(gate)
    await asyncio.sleep(0.05)  # a quiet moment: GRACE_S with no trigger in flight
    accept(gate)
    assert gate.hold("c") is True  # a new burst
    answer(gate)
    await asyncio.sleep(0.1)
    await turns()
    assert seen == ["a", "c"]  # (b and b2 were not held: started by the caller)


async def test_a_start_that_fails_stops_neither_the_others_nor_later_bursts(
        grace: float, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []

    def start(eid: str) -> None:
        if eid == "bad":
            raise OSError("the producer's queue is full")
        seen.append(eid)

    gate = Ingress(start)
    await burst_of(gate, ["bad", "good"], grace)
    assert seen == ["good"]
    assert "bad: starting it after a burst failed" in caplog.text
    await burst_of(gate, ["next"], grace)
    assert seen == ["good", "next"] and not gate.holding
    assert gate.hold("lone") is False


async def test_what_a_new_burst_holds_waits_for_it_not_for_the_last_ones_start(
        grace: float) -> None:
    seen: list[str] = []
    gate: Ingress

    def start(eid: str) -> None:
        if not seen:  # a new burst begins as the last one's first start is made
            accept(gate)
            assert gate.hold("new")
        seen.append(eid)

    gate = Ingress(start)
    ids = [f"e{i}" for i in range(200)]
    await burst_of(gate, ids, grace)
    assert seen == ids and gate.holding  # all of the last burst, none of this one
    answer(gate)
    await asyncio.sleep(grace * 2)
    await turns()
    assert seen == [*ids, "new"]


async def test_what_becomes_startable_while_the_held_start_waits_its_turn(
        grace: float) -> None:
    seen: list[str] = []
    gate: Ingress

    def start(eid: str) -> None:
        if not seen:
            assert gate.holding and gate.hold("late")  # no burst now, but behind them
        seen.append(eid)

    gate = Ingress(start)
    ids = [f"e{i}" for i in range(150)]
    await burst_of(gate, ids, grace)
    assert seen == [*ids, "late"]
    assert not gate.holding and gate.hold("now") is False


async def test_after_stop_no_burst_begins(grace: float) -> None:
    seen: list[str] = []
    gate = started_into(seen)
    gate.stop()
    accept(gate)
    assert not gate.holding and gate.hold("a") is False
    answer(gate)
    assert gate.accepting == 0


async def test_stop_forgets_what_is_held(grace: float) -> None:
    seen: list[str] = []
    gate = started_into(seen)
    accept(gate)
    gate.hold("a")
    gate.stop()
    answer(gate)
    await asyncio.sleep(grace * 2)
    await turns()
    assert seen == [] and not gate.holding
