"""The ingress's hold on new executions during a burst of triggers (``engine.ingress``):
pure logic on a real event loop, no broker."""

from __future__ import annotations

import asyncio

import pytest

from engine import ingress
from engine.ingress import BURST, Ingress


def started_into(seen: list[str]) -> Ingress:
    return Ingress(seen.append)


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_fewer_triggers_than_a_burst_hold_nothing() -> None:
    seen: list[str] = []
    gate = started_into(seen)
    for _ in range(BURST - 1):
        gate.enter()
    assert not gate.holding
    assert gate.hold("a") is False  # start it now
    for _ in range(BURST - 1):
        gate.leave()
    assert gate.accepting == 0 and not gate.holding


async def test_a_burst_holds_starts_until_it_is_answered_then_starts_them_in_order(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingress, "GRACE_S", 0.05)
    seen: list[str] = []
    gate = started_into(seen)
    for _ in range(BURST):
        gate.enter()
    ids = [f"e{i}" for i in range(150)]  # more than a CHUNK: released over several turns
    assert all(gate.hold(eid) for eid in ids)
    for _ in range(BURST):
        gate.leave()
    await asyncio.sleep(0.01)
    assert seen == []  # the grace runs: the burst's next triggers may still come
    await asyncio.sleep(0.1)
    await turns(10)
    assert seen == ids
    assert not gate.holding and gate.hold("later") is False


async def test_a_trigger_in_the_grace_keeps_the_burst_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingress, "GRACE_S", 0.05)
    seen: list[str] = []
    gate = started_into(seen)
    for _ in range(BURST):
        gate.enter()
    gate.hold("a")
    for _ in range(BURST):
        gate.leave()
    await asyncio.sleep(0.03)
    gate.enter()  # the next of the burst
    await asyncio.sleep(0.05)
    assert seen == [] and gate.holding
    gate.hold("b")
    gate.leave()
    await asyncio.sleep(0.08)
    await turns()
    assert seen == ["a", "b"]


async def test_a_flood_that_never_ends_holds_a_start_for_max_hold_at_most(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingress, "MAX_HOLD_S", 0.1)
    seen: list[str] = []
    gate = started_into(seen)
    for _ in range(BURST):
        gate.enter()  # never answered
    gate.hold("a")
    await asyncio.sleep(0.05)
    assert seen == []
    await asyncio.sleep(0.1)
    await turns()
    assert seen == ["a"]
    assert gate.hold("b") is False  # over: a new burst begins with the next trigger


async def test_stop_forgets_what_is_held(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingress, "GRACE_S", 0.01)
    seen: list[str] = []
    gate = started_into(seen)
    for _ in range(BURST):
        gate.enter()
    gate.hold("a")
    gate.stop()
    for _ in range(BURST):
        gate.leave()
    await asyncio.sleep(0.05)
    await turns()
    assert seen == [] and not gate.holding
