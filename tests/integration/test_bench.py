"""``python -m engine.bench ... --quick`` on the session's broker: CI smoke tests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

MACHINE_LINE = re.compile(
    r"^scenario=(?P<scenario>[a-z_]+) metric=(?P<metric>[A-Za-z0-9_]+) "
    r"value=(?P<value>\S+) unit=(?P<unit>\S+)$"
)
ROOT = Path(__file__).resolve().parents[2]

Figures = list[tuple[str, str, float, str]]


def run_bench(kafka: str, tmp_path: Path, *args: str,
              timeout_s: float) -> tuple[subprocess.CompletedProcess[str], Figures, Any]:
    """Run the bench with ``args --quick``; its output, its parsed machine lines, its JSON."""
    out = tmp_path / "bench.json"
    temp = tmp_path / "tmp"  # the bench's temporary files (and its workers' app dirs) go here
    temp.mkdir()
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka, "TMPDIR": str(temp)}
    done = subprocess.run(
        [sys.executable, "-m", "engine.bench", *args, "--quick", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    figures = []
    for line in done.stdout.splitlines():
        if not line.startswith("scenario="):
            continue
        match = MACHINE_LINE.match(line)
        assert match is not None, f"unparseable machine line: {line!r}"
        figures.append((match["scenario"], match["metric"], float(match["value"]),
                        match["unit"]))
    # The table closes the output, and the JSON holds the same figures.
    assert re.search(r"^scenario\s+metric\s+value\s+unit\s+target\s+ok\?$", done.stdout, re.M)
    saved = json.loads(out.read_text())
    assert saved["errors"] == {}
    assert [(f["scenario"], f["metric"], f["unit"]) for f in saved["figures"]] == [
        (s, m, u) for s, m, _, u in figures]
    for saved_figure, (_, _, value, _) in zip(saved["figures"], figures, strict=True):
        assert saved_figure["value"] == pytest.approx(value, rel=1e-5)
    return done, figures, saved


def test_quick_floor_and_step_print_parseable_positive_figures(kafka: str, tmp_path: Path) -> None:
    _, figures, _ = run_bench(kafka, tmp_path, "floor", "step", timeout_s=30)
    assert all(value > 0 for _, _, value, _ in figures), figures
    assert {f[0] for f in figures} == {"floor", "step"}
    metrics = {(f[0], f[1]) for f in figures}
    assert {("floor", "append_p50"), ("floor", "append_p99"), ("floor", "append_after_idle_p50"),
            ("step", "step_p50"), ("step", "step_p99"), ("step", "step_p50_over_floor_p50")
            } <= metrics


def test_quick_scale_failover_rolling_run_worker_processes_and_leave_none(
    kafka: str, tmp_path: Path
) -> None:
    done, figures, saved = run_bench(kafka, tmp_path, "scale", "failover", "rolling",
                                     timeout_s=240)
    value = {(s, m): v for s, m, v, _ in figures}
    units = {(s, m): u for s, m, _, u in figures}
    for n in (1, 2, 4):
        assert value["scale", f"workers_{n}"] > 0 and units["scale", f"workers_{n}"] == "exec/s"
        assert value["scale", f"workers_{n}_cpu_per_execution"] == pytest.approx(
            value["scale", f"workers_{n}_cpu_workers_per_execution"]
            + value["scale", f"workers_{n}_cpu_query_per_execution"], rel=1e-3)
    for n in (2, 4):
        assert value["scale", f"workers_{n}_over_workers_1"] == pytest.approx(
            value["scale", f"workers_{n}"] / value["scale", "workers_1"], rel=1e-3)
        assert value["scale", f"workers_{n}_cpu_ratio"] == pytest.approx(
            value["scale", f"workers_{n}_cpu_per_execution"]
            / value["scale", "workers_1_cpu_per_execution"], rel=1e-3)
    assert value["scale", "ceiling_4_workers"] == pytest.approx(
        4 * value["scale", "ceiling_per_added_worker"], rel=1e-4)
    assert "# scale model: " in done.stdout
    # Every partition was claimed again by the restarted workers (the figure, whatever it is).
    assert 0 < value["rolling", "seconds_to_first_claim"] <= value[
        "rolling", "seconds_to_claim_all"]
    assert value["rolling", "rounds"] == 1
    # Nobody takes a dead worker's partitions before the group's session timeout (6 s).
    assert 5 <= value["failover", "seconds_to_progress"] < 60
    assert value["failover", "executions_moved"] >= 1
    assert value["failover", "partitions_moved"] >= 1
    assert any("session.timeout.ms=6000" in note for note in saved["notes"])
    assert "# failover: session.timeout.ms=6000" in done.stdout
    # Every worker process the bench started is gone.
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit()
            and str(tmp_path) in _cmdline(p)]
    assert left == [], [_cmdline(p) for p in left]


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_quick_peer_runs_ploy_dev_over_http_and_leaves_nothing(kafka: str, tmp_path: Path) -> None:
    _, figures, _ = run_bench(kafka, tmp_path, "peer", timeout_s=60)
    value = {(s, m): v for s, m, v, _ in figures}
    assert value["peer", "sequential"] == 20 and value["peer", "at_once"] == 100
    assert value["peer", "sleepers"] == 5
    for metric in ("trigger_to_result_p50", "trigger_only_p50", "start_all", "completed",
                   "cpu_server_per_execution", "cpu_broker_per_execution", "rss_server",
                   "rss_broker", "floor_append_p50"):
        assert value["peer", metric] > 0, metric
    assert value["peer", "trigger_only_p50"] < value["peer", "trigger_then_result_p50"]
    # A 1 s sleep never ends early, and its timer fired at or after its wake time.
    assert value["peer", "sleep_late_p50"] >= 0 and value["peer", "sleep_timer_fired_late_p50"] >= 0
    # ploy dev and its broker are gone.
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit()
            and str(tmp_path) in _cmdline(p)]
    assert left == [], [_cmdline(p) for p in left]
