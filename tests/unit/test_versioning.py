"""The replay check and ctx.patched's answers, on recorded histories (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from engine.versioning import Diverged, Replay


def history(*keys: str) -> list[dict[str, Any]]:
    return [{"key": k, "kind": "sleep" if k.startswith("sleep#") else "step", "seq": i}
            for i, k in enumerate(keys)]


def test_a_replay_that_meets_its_history_goes_on_then_runs_fresh() -> None:
    replay = Replay(history("a", "fan[1]", "fan[0]", "sleep#1"), [])
    assert replay.replaying
    for key in ("a", "fan", "sleep#1"):
        replay.meet(key)
    assert not replay.replaying
    replay.meet("b")  # past the history: new steps run
    replay.end()


def test_concurrent_steps_may_come_back_in_either_order() -> None:
    replay = Replay(history("x", "y"), [])
    replay.meet("y")
    replay.meet("x")
    replay.end()


def test_a_call_the_history_lacks_diverges_naming_what_was_expected() -> None:
    replay = Replay(history("charge", "sleep#1", "ship"), [])
    replay.meet("charge")
    with pytest.raises(Diverged) as caught:
        replay.meet("refund")
    assert str(caught.value.error) .startswith(
        "non-determinism: expected sleep 'sleep#1' at position 2, found step 'refund'")
    replay = Replay(history("charge", "ship"), [])
    replay.meet("charge")
    with pytest.raises(Diverged, match="expected step 'ship' at position 2, found the end"):
        replay.end()


def test_patched_is_new_fresh_old_on_replay_and_kept_once_recorded() -> None:
    assert Replay([], []).patched("p") is None  # fresh: record the marker, new branch
    assert Replay(history("charge"), []).patched("p") is False  # history went past here
    assert Replay(history("charge"), ["p"]).patched("p") is True
    replay = Replay(history("charge"), [])
    replay.meet("charge")
    assert replay.patched("p") is None  # reached fresh after the replayed part


def test_ploy_status_shows_the_version_and_the_patches() -> None:
    from engine.cli import format_execution

    lines = format_execution({"execution_id": "x", "workflow": "w", "status": "running",
                              "version": "v2", "patches": ["new-refund-step"], "input": {}})
    assert "version    v2 (patched: new-refund-step)" in lines
    assert not any(line.startswith("version") for line in format_execution(
        {"execution_id": "x", "workflow": "w", "status": "running", "input": {}}))
