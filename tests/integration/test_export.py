"""``ploy export`` / ``ploy import`` on the real broker: files any reader opens, and back."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import fastavro
import pytest

from engine import NonRetryableError, ploy
from engine.cli import main
from engine.log import EventLog
from engine.rebuild import rebuild
from engine.testing import engine_config, running_engine, wait_for_status
from engine.view import PartitionView

PARTITIONS = 3


def worker() -> Any:
    app = ploy()

    @app.workflow("job")
    async def job(ctx: Any) -> dict[str, Any]:
        n = ctx.input["n"]
        a = await ctx.step.run("a", lambda: n * 2)

        def b() -> int:
            if n % 7 == 0:
                raise NonRetryableError("seven")
            return a + 1

        return {"b": await ctx.step.run("b", b)}

    @app.workflow("other")
    async def other(ctx: Any) -> int:
        return int(await ctx.step.run("x", lambda: 1))

    return app.build()


def app_dir(tmp_path: Path, name: str, kafka: str, prefix: str) -> Path:
    app = tmp_path / name
    app.mkdir()
    (app / "ploy.yaml").write_text(
        f"kafka: {{bootstrap_servers: '{kafka}', topic_prefix: {prefix}, "
        f"partitions: {PARTITIONS}}}\nworkflow: {{JOB: job, OTHER: other}}\n")
    return app


def ploy_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def topic_count(kafka: str, prefix: str) -> int:
    log = EventLog(kafka, prefix, PARTITIONS)
    try:
        return sum(len(records) for batch in log.read_until_end(
            dict.fromkeys(range(PARTITIONS), 0)) for records in batch.values())
    finally:
        log.close()


def dump(state_path: Path, topic: str) -> dict[str, list[tuple[bytes, bytes]]]:
    views = {}
    for db in sorted(state_path.iterdir()):
        view = PartitionView(db, topic, int(db.name[1:]))
        try:
            views[db.name] = list(view.dump())
        finally:
            view.close()
    return views


async def run_executions(kafka: str, prefix: str, state_dir: Path, count: int) -> dict[str, str]:
    """``count`` executions of job (every 7th fails) and 5 of other: {id: status}."""
    config = engine_config(kafka, prefix, state_dir, partitions=PARTITIONS,
                           workflow={"JOB": "job", "OTHER": "other"})
    async with running_engine(worker(), config) as engine:
        ids: list[str] = []
        for start in range(0, count, 100):
            done = await asyncio.gather(*(engine.env.JOB.trigger({"n": n})
                                          for n in range(start, min(start + 100, count))))
            ids += [d["execution_id"] for d in done]
        ids += [(await engine.env.OTHER.trigger({}))["execution_id"] for _ in range(5)]
        return {eid: (await wait_for_status(engine, eid, timeout_s=60)).status.value
                for eid in ids}


async def test_export_of_1000_executions_reads_back_and_imports_into_a_fresh_topic(
        kafka: str, topic_prefix: str, state_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    statuses = await run_executions(kafka, topic_prefix, state_dir, 1000)
    assert list(statuses.values()).count("failed") == 143
    in_topic = topic_count(kafka, topic_prefix)
    app = app_dir(tmp_path, "app", kafka, topic_prefix)

    # Avro: object container files with the flat schema; fastavro reads them as they are.
    avro = tmp_path / "avro"
    code, out, err = ploy_cli(capsys, "export", "--out", str(avro), "--dir", str(app))
    assert code == 0, err
    assert out.startswith(f"exported {in_topic} events of {topic_prefix}.events")
    rows = []
    for p in range(PARTITIONS):
        with (avro / f"p{p}.avro").open("rb") as fo:
            part = list(fastavro.reader(fo))
        assert [r["offset"] for r in part] == sorted(r["offset"] for r in part)  # log order
        assert {r["partition"] for r in part} <= {p}
        rows += part
    assert len(rows) == in_topic
    completed = next(r for r in rows if r["type"] == "StepCompleted")
    assert json.loads(json.loads(completed["body"])["output"]) is not None  # payload: JSON text
    manifest = json.loads((avro / "manifest.json").read_text())
    assert sum(manifest["counts"].values()) == in_topic and manifest["format"] == "avro"

    # JSON lines: the same records, body as an object.
    jsonl = tmp_path / "jsonl"
    code, _, err = ploy_cli(capsys, "export", "--format", "jsonl", "--out", str(jsonl),
                            "--dir", str(app))
    assert code == 0, err
    lines = [json.loads(line) for p in range(PARTITIONS)
             for line in (jsonl / f"p{p}.jsonl").read_text().splitlines()]
    assert len(lines) == in_topic
    assert {(r["partition"], r["offset"], r["event_id"]) for r in lines} == {
        (r["partition"], r["offset"], r["event_id"]) for r in rows}

    # Import into a fresh topic, rebuild: the same executions, the same bytes.
    fresh = f"{topic_prefix}-i"
    fresh_app = app_dir(tmp_path, "fresh", kafka, fresh)
    code, out, err = ploy_cli(capsys, "import", str(avro), "--dir", str(fresh_app))
    assert code == 0, err
    assert out.startswith(f"imported {in_topic} events into {fresh}.events")
    log = EventLog(kafka, fresh, PARTITIONS)
    try:
        rebuild(log, tmp_path / "rebuilt", workers=1)
    finally:
        log.close()
    assert dump(tmp_path / "rebuilt", f"{fresh}.events") == dump(
        state_dir / f"{topic_prefix}.events", f"{topic_prefix}.events")

    # Once more into the same topic: refused, nothing appended.
    code, _, err = ploy_cli(capsys, "import", str(jsonl), "--dir", str(fresh_app))
    assert code == 2 and "is not empty" in err and len(err.strip().splitlines()) == 1
    assert topic_count(kafka, fresh) == in_topic


async def test_export_selects_by_workflow_and_time(
        kafka: str, topic_prefix: str, state_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    await run_executions(kafka, topic_prefix, state_dir, 10)
    app = app_dir(tmp_path, "app", kafka, topic_prefix)
    out = tmp_path / "other"
    code, _, err = ploy_cli(capsys, "export", "--workflow", "OTHER", "--format", "jsonl",
                            "--out", str(out), "--dir", str(app))
    assert code == 0, err
    rows = [json.loads(line) for f in sorted(out.glob("p*.jsonl"))
            for line in f.read_text().splitlines()]
    assert {r["workflow"] for r in rows} == {"other"}
    assert sum(r["type"] == "WorkflowTriggered" for r in rows) == 5

    timestamps = sorted(r["timestamp"] for r in rows)
    middle = timestamps[len(timestamps) // 2]
    cut = tmp_path / "cut"
    code, _, err = ploy_cli(capsys, "export", "--since", str(middle), "--format", "jsonl",
                            "--out", str(cut), "--dir", str(app))
    assert code == 0, err
    kept = [json.loads(line) for f in sorted(cut.glob("p*.jsonl"))
            for line in f.read_text().splitlines()]
    assert kept and all(r["timestamp"] >= middle for r in kept)

    code, _, err = ploy_cli(capsys, "export", "--out", str(cut), "--dir", str(app))
    assert code == 2 and "already holds an export" in err
    fresh_app = app_dir(tmp_path, "fresh", kafka, f"{topic_prefix}-i")
    code, _, err = ploy_cli(capsys, "import", str(cut), "--dir", str(fresh_app))
    assert code == 2 and "was cut by --since/--until" in err
