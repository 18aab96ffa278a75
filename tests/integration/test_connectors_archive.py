"""Archive sink and restore on real brokers: Avro container files any reader opens; ploy dev."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import fastavro
import pytest

from connectors import dev_restore, restore
from connectors.archive import FILE_NAME, ArchiveSink, dev_archive_dir
from connectors.cli import add_commands
from connectors.errors import ArchiveError, TopicNotEmptyError
from connectors.testing import running_connectors
from engine import ManualClock, ploy
from engine.broker import EmbeddedBroker
from engine.config import Config
from engine.log import EventLog
from engine.models import Execution
from engine.rebuild import clear_state
from engine.testing import engine_config, running_engine, wait_for_status


def worker() -> Any:
    app = ploy()

    @app.workflow("job")
    async def job(ctx: Any) -> dict[str, Any]:
        ctx.log("begin", {"n": ctx.input["n"]})
        a = await ctx.step.run("a", lambda: ctx.input["n"] * 2)
        if ctx.input["n"] % 10 == 0:
            await ctx.step.sleep("1h")
        b = await ctx.step.run("b", lambda: a + 1)
        return {"a": a, "b": b}

    return app.build()


def log_count(log: EventLog) -> int:
    return sum(len(records) for batch in log.read_until_end(dict.fromkeys(
        range(log.partitions), 0)) for records in batch.values())


def archived_count(directory: Path) -> int:
    """Events in the archive, read with fastavro's plain container-file reader."""
    total = 0
    for path in directory.glob("*.avro"):
        assert FILE_NAME.match(path.name), path.name
        with path.open("rb") as fo:
            records = list(fastavro.reader(fo))
        p, first, last = (int(g) for g in FILE_NAME.match(path.name).groups())  # type: ignore[union-attr]
        assert len(records) == last - first + 1
        assert all(isinstance(r, dict) and r["execution_id"] and r["event_id"] for r in records)
        total += len(records)
    return total


def app_config(kafka: str, prefix: str, state_dir: Path, **fields: Any) -> Config:
    return engine_config(kafka, prefix, state_dir, partitions=3, workflow={"JOB": "job"},
                         **fields)


async def snapshot(engine: Any, ids: list[str]) -> dict[str, tuple[Execution, list[Any]]]:
    out = {}
    for eid in ids:
        execution = await engine.runtime.get_execution(eid)
        history = await engine.runtime.history(eid)
        out[eid] = (execution, [h.model_dump() for h in history])
    return out


async def test_ploy_dev_restart_on_an_empty_broker_brings_every_execution_back(
    kafka: str, topic_prefix: str, state_dir: Path
) -> None:
    # First `ploy dev`: the broker is fresh, nothing to restore; the archive sink is added.
    config, restored = dev_restore(app_config(kafka, topic_prefix, state_dir))
    assert restored == 0
    archive = dev_archive_dir(config)
    (sink,) = config.sinks
    config = config.model_copy(update={"sinks": [sink.model_copy(update={"roll_bytes": 4096})]})
    job = worker()
    clock = ManualClock()
    async with running_engine(job, config, clock=clock) as engine:
        async with running_connectors(engine) as connectors:
            ids = [(await engine.env.JOB.trigger({"n": n}))["execution_id"] for n in range(50)]
            for n, eid in enumerate(ids):
                await wait_for_status(engine, eid, "sleeping" if n % 10 == 0 else "completed")
            before = await snapshot(engine, ids)
            assert isinstance(connectors.sinks[0], ArchiveSink)
    log = EventLog(kafka, topic_prefix, 3)
    in_topic = log_count(log)
    log.close()
    assert not list(archive.glob(".*.tmp"))
    assert len(list(archive.glob("p0-*.avro"))) > 1  # rolled by size
    assert archived_count(archive) == in_topic > 50 * 6

    # Second `ploy dev`: a new embedded broker, empty; the view is cleared as ploy dev does.
    with EmbeddedBroker() as broker:
        clear_state(state_dir / f"{topic_prefix}.events")
        fresh = app_config(broker.bootstrap_servers, topic_prefix, state_dir)
        config, restored = dev_restore(fresh)
        assert restored == in_topic
        clock = ManualClock()
        async with running_engine(job, config, clock=clock) as engine:
            async with running_connectors(engine):
                after = await snapshot(engine, ids)
                assert after == before  # every execution and its full history
                clock.advance(2 * 3600 * 1000)  # the sleeping ones wake
                for eid in ids[::10]:
                    done = await wait_for_status(engine, eid)
                    assert done.status == "completed" and done.output is not None
        log = EventLog(broker.bootstrap_servers, topic_prefix, 3)
        in_topic = log_count(log)
        log.close()
        assert archived_count(archive) == in_topic  # archiving went on after the restore


async def test_restore_cli_into_a_fresh_topic_then_rebuild_gives_the_same_executions(
    kafka: str, topic_prefix: str, state_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    archive = tmp_path / "archive"
    config = app_config(kafka, topic_prefix, state_dir,
                        sinks=[{"kind": "archive", "dir": archive, "roll_seconds": 0.2}])
    job = worker()
    async with running_engine(job, config) as engine:
        async with running_connectors(engine):
            ids = [(await engine.env.JOB.trigger({"n": n}))["execution_id"]
                   for n in range(1, 10)]
            for eid in ids:
                await wait_for_status(engine, eid)
            before = await snapshot(engine, ids)

    fresh_prefix = f"{topic_prefix}-r"
    app = tmp_path / "app"
    app.mkdir()
    (app / "ploy.yaml").write_text(
        f"kafka: {{bootstrap_servers: '{kafka}', topic_prefix: {fresh_prefix}, partitions: 3}}\n")
    parser = argparse.ArgumentParser(prog="ploy")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["archive", "restore", str(archive), "--dir", str(app)])
    assert args.run(args) == 0
    assert "events into " + f"{fresh_prefix}.events" in capsys.readouterr().out

    rebuilt = app_config(kafka, fresh_prefix, tmp_path / "state2")
    async with running_engine(job, rebuilt) as engine:
        assert await snapshot(engine, ids) == before

    log = EventLog(kafka, fresh_prefix, 3)
    try:
        with pytest.raises(TopicNotEmptyError, match="is not empty"):
            restore(log, archive)
    finally:
        log.close()
    log = EventLog(kafka, f"{topic_prefix}-wide", 4)
    try:
        with pytest.raises(ArchiveError, match="had 3 partitions"):
            restore(log, archive)
    finally:
        log.close()
