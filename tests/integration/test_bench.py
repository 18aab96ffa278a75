"""``python -m engine.bench floor step --quick`` on the session's broker: a CI smoke test."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

MACHINE_LINE = re.compile(
    r"^scenario=(?P<scenario>[a-z_]+) metric=(?P<metric>[A-Za-z0-9_]+) "
    r"value=(?P<value>\S+) unit=(?P<unit>\S+)$"
)
ROOT = Path(__file__).resolve().parents[2]


def test_quick_floor_and_step_print_parseable_positive_figures(kafka: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka}
    done = subprocess.run(
        [sys.executable, "-m", "engine.bench", "floor", "step", "--quick", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("scenario=")]
    figures = []
    for line in lines:
        match = MACHINE_LINE.match(line)
        assert match is not None, f"unparseable machine line: {line!r}"
        value = float(match["value"])
        assert value > 0, line
        figures.append((match["scenario"], match["metric"], value, match["unit"]))
    assert {f[0] for f in figures} == {"floor", "step"}
    metrics = {(f[0], f[1]) for f in figures}
    assert {("floor", "append_p50"), ("floor", "append_p99"), ("step", "step_p50"),
            ("step", "step_p99"), ("step", "step_p50_over_floor_p50")} <= metrics
    # The table closes the output, and the JSON holds the same figures.
    assert re.search(r"^scenario\s+metric\s+value\s+unit\s+target\s+ok\?$", done.stdout, re.M)
    saved = json.loads(out.read_text())
    assert saved["errors"] == {}
    assert [(f["scenario"], f["metric"], f["unit"]) for f in saved["figures"]] == [
        (s, m, u) for s, m, _, u in figures]
    for saved_figure, (_, _, value, _) in zip(saved["figures"], figures, strict=True):
        assert saved_figure["value"] == pytest.approx(value, rel=1e-5)
