"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engine.partitions import Partitions


@pytest.fixture
def no_fetch(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, bool]]:
    """``switch["fetch"] = False`` stops the fold thread's fetches (True: on again)."""
    switch = {"fetch": True}
    poll = Partitions._poll

    def gated(self: Partitions, timeout_s: float) -> dict[int, list[tuple[int, bytes]]]:
        if not switch["fetch"]:
            self._stop.wait(timeout_s)
            return {}
        return poll(self, timeout_s)

    monkeypatch.setattr(Partitions, "_poll", gated)
    yield switch
