"""ploy.yaml's ``schedules:``: what is accepted, and errors naming file, key and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import load_config
from engine.errors import ConfigError

HEAD = "workflow:\n  REPORT: report\nschedules:\n"


def load(tmp_path: Path, schedules: str) -> object:
    (tmp_path / "ploy.yaml").write_text(HEAD + schedules)
    return load_config(tmp_path, env={})


def test_a_schedule_with_its_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, "  - {name: nightly, binding: REPORT, cron: '0 2 * * *',\n"
                            "     timezone: Europe/Paris, input: {full: true}}\n"
                            "  - {name: tick, binding: REPORT, every: 10s, catchup: all,\n"
                            "     catchup_limit: 5, overlap: allow}\n")
    nightly, tick = config.schedules  # type: ignore[attr-defined]
    assert (nightly.catchup, nightly.catchup_limit, nightly.overlap) == ("once", 100, "skip")
    assert nightly.input == {"full": True} and nightly.timing.zone == "Europe/Paris"
    assert tick.every_ms == 10_000 and tick.timing.next_after(25_000) == 30_000


@pytest.mark.parametrize(("entry", "key", "line", "problem"), [
    ("  - name: a\n    binding: REPORT\n    cron: '*/5 * * *'\n", "schedules.0.cron", 6,
     "has 4 fields"),
    ("  - name: a\n    binding: NOPE\n    every: 1m\n", "schedules.0.binding", 5,
     "names binding 'NOPE' which 'workflow:' does not define (bound: REPORT)"),
    ("  - name: a\n    binding: REPORT\n    every: 1m\n    catchup_limit: -1\n",
     "schedules.0.catchup_limit", 7, "greater than or equal to 1"),
    ("  - name: a\n    binding: REPORT\n    every: soon\n", "schedules.0.every", 6, "soon"),
    ("  - name: a\n    binding: REPORT\n    every: 100ms\n", "schedules.0.every", 6,
     "greater than or equal to 1000"),
    ("  - name: a\n    binding: REPORT\n", "schedules.0", 4,
     "needs exactly one of 'cron' and 'every'"),
    ("  - name: a\n    binding: REPORT\n    every: 1m\n    timezone: Mars/Base\n",
     "schedules.0.timezone", 7, "unknown time zone 'Mars/Base'"),
    ("  - name: a\n    binding: REPORT\n    every: 1m\n    catchup: sometimes\n",
     "schedules.0.catchup", 7, "'skip', 'once' or 'all'"),
    ("  - name: a\n    binding: REPORT\n    every: 1m\n    when: now\n",
     "schedules.0.when", 7, "unknown key"),
    ("  - {name: a, binding: REPORT, every: 1m}\n  - {name: a, binding: REPORT, every: 2m}\n",
     "schedules.1.name", 5, "a second schedule 'a'"),
])
def test_mistakes_name_file_key_and_line(tmp_path: Path, entry: str, key: str, line: int,
                                         problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, entry)
    err = caught.value
    assert (err.key, err.line) == (key, line), str(err)
    assert problem in err.problem and err.file.endswith("ploy.yaml")
