"""The spine on a real broker: append, fold, crash, rebuild, corrupt records."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer

from engine import keys
from engine.codec import default_codec
from engine.errors import BrokerUnavailableError
from engine.events import (
    Event,
    StepCompleted,
    StepStarted,
    WorkflowCompleted,
    WorkflowLog,
    WorkflowTriggered,
)
from engine.log import EventLog, partition_for
from engine.view import PartitionView
from tests.integration.foldproc import fold_all

HERE = Path(__file__).parent


def digest(views: dict[int, PartitionView]) -> str:
    h = hashlib.sha256()
    for p in sorted(views):
        for key, value in views[p].dump():
            h.update(len(key).to_bytes(4, "big") + key + len(value).to_bytes(4, "big") + value)
    return h.hexdigest()


def close(views: dict[int, PartitionView]) -> None:
    for view in views.values():
        view.close()


def fifty_events(eid: str, ts: int) -> list[Event]:
    events = [Event(eid, "wf", ts, WorkflowTriggered('{"n":1}'))]
    for i in range(24):
        events.append(Event(eid, "wf", ts + 2 * i + 1, StepStarted(f"s{i}", 1)))
        events.append(Event(eid, "wf", ts + 2 * i + 2,
                            StepCompleted(f"s{i}", 1, None, f'{{"i":{i}}}', ts)))
    events.append(Event(eid, "wf", ts + 60, WorkflowCompleted('{"done":true}')))
    return events


@pytest.fixture
def filled_log(kafka: str, topic_prefix: str) -> str:
    """10,000 events of 200 executions, appended in batches."""
    log = EventLog(kafka, topic_prefix)
    for n in range(200):
        for event in fifty_events(f"exec-{n:03d}", 1_700_000_000_000 + n):
            log.append_nowait(event)
    log.flush()
    log.close()
    return topic_prefix


def test_append_returns_partition_and_offset_after_the_ack(kafka: str, topic_prefix: str) -> None:
    log = EventLog(kafka, topic_prefix, partitions=4)
    try:
        eid = "exec-ack"
        first = asyncio.run(log.append(Event(eid, "wf", 1, WorkflowTriggered("{}"))))
        second = log.append_sync(Event(eid, "wf", 2, WorkflowLog("info", "x")))
        assert first[0] == second[0] == partition_for(eid, 4)
        assert second[1] == first[1] + 1
    finally:
        log.close()


def test_topic_is_created_with_the_configured_partitions_and_kept(kafka: str,
                                                                  topic_prefix: str) -> None:
    log = EventLog(kafka, topic_prefix, partitions=3)
    again = EventLog(kafka, topic_prefix, partitions=9)  # an existing topic keeps its count
    try:
        assert (log.partitions, again.partitions) == (3, 3)
    finally:
        log.close()
        again.close()


def test_sigkill_mid_fold_loses_nothing_and_applies_nothing_twice(
    kafka: str, filled_log: str, tmp_path: Path
) -> None:
    crashed, clean = tmp_path / "crashed", tmp_path / "clean"
    progress = tmp_path / "progress"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent.parent)}
    args = [sys.executable, str(HERE / "foldproc.py"), kafka, filled_log, str(crashed),
            str(progress), "50"]
    child = subprocess.Popen(args, env=env)
    deadline = time.monotonic() + 60
    while not (progress.exists() and int(progress.read_text()) > 2000):
        assert child.poll() is None, "the fold finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_at = int(progress.read_text())
    assert 0 < killed_at < 10_000
    subprocess.run(args[:-1] + ["5000"], env=env, check=True, timeout=120)

    after_crash = fold_all(kafka, filled_log, crashed)
    without_crash = fold_all(kafka, filled_log, clean)
    try:
        assert digest(after_crash) == digest(without_crash)
        for n in range(200):
            eid = f"exec-{n:03d}"
            view = after_crash[partition_for(eid, 6)]
            record = view.record(eid)
            assert record is not None
            assert (record["events"], record["status"]) == (50, "completed")
            assert len(list(view.history(eid))) == 50
    finally:
        close(after_crash)
        close(without_crash)


def test_rebuild_from_offset_zero_is_byte_identical(kafka: str, filled_log: str,
                                                    tmp_path: Path) -> None:
    first = fold_all(kafka, filled_log, tmp_path / "first")
    before = digest(first)
    for view in first.values():
        view.destroy()
    rebuilt = fold_all(kafka, filled_log, tmp_path / "first")
    try:
        assert digest(rebuilt) == before
        assert sum(v.next_offset for v in rebuilt.values()) == 10_000
    finally:
        close(rebuilt)


def test_offsets_never_move_backwards(kafka: str, topic_prefix: str, tmp_path: Path) -> None:
    codec = default_codec()
    view = PartitionView(tmp_path / "p0", "t.events", 0)
    raw = codec.encode(Event("e", "w", 1, WorkflowTriggered("{}")))
    log_raw = codec.encode(Event("e", "w", 2, WorkflowLog("info", "m")))
    try:
        view.apply([(0, raw), (1, log_raw)])
        applied, failure = view.apply([(0, raw), (1, log_raw)])  # redelivered
        assert (applied, failure, view.next_offset) == ([], None, 2)
        assert view.record("e")["events"] == 2  # type: ignore[index]
    finally:
        view.close()


def test_corrupt_record_stops_its_partition_with_topic_partition_offset(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    log = EventLog(kafka, topic_prefix, partitions=2)
    eid = "exec-corrupt"
    p = log.partition_for(eid)
    log.append_sync(Event(eid, "wf", 1, WorkflowTriggered("{}")))
    producer = Producer({"bootstrap.servers": kafka})
    producer.produce(log.topic, key=eid.encode(), value=b"\xc3\x01garbage!", partition=p)
    producer.flush(10)
    log.append_sync(Event(eid, "wf", 3, WorkflowLog("info", "after")))
    log.close()
    with pytest.raises(AssertionError, match=(
        rf"corrupt event at topic '{topic_prefix}.events' partition {p} offset 1: "
        "unknown schema fingerprint")):
        fold_all(kafka, topic_prefix, tmp_path)
    view = PartitionView(tmp_path / f"p{p}", log.topic, p)
    try:
        assert view.next_offset == 1  # stopped at the corrupt record, nothing skipped
        assert view.record(eid)["events"] == 1  # type: ignore[index]
        assert keys.history(eid, 2) not in dict(view.dump())
    finally:
        view.close()


def test_unreachable_bootstrap_servers_fail_within_the_bound() -> None:
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match="127.0.0.1:1 is not reachable after 2 s"):
        EventLog("127.0.0.1:1", "nobody", connect_timeout_s=2)
    assert time.monotonic() - started < 6


def test_parallel_rebuild_equals_one_process_byte_for_byte(
    kafka: str, filled_log: str, tmp_path: Path
) -> None:
    from engine.rebuild import rebuild

    log = EventLog(kafka, filled_log)
    try:
        one = rebuild(log, tmp_path / "one", workers=1)
        two = rebuild(log, tmp_path / "two", workers=2)
    finally:
        log.close()
    assert one[0] == two[0] == 10_000
    views = {name: {p: PartitionView(tmp_path / name / f"p{p}", "", p) for p in range(6)}
             for name in ("one", "two")}
    try:
        assert digest(views["one"]) == digest(views["two"])
    finally:
        for group in views.values():
            close(group)


def test_parallel_rebuild_reports_a_corrupt_record_where_it_is(
    kafka: str, topic_prefix: str, tmp_path: Path
) -> None:
    from engine.errors import CorruptEventError
    from engine.rebuild import rebuild

    log = EventLog(kafka, topic_prefix, partitions=2)
    try:
        eid = "exec-bad"
        p = log.partition_for(eid)
        log.append_sync(Event(eid, "wf", 1, WorkflowTriggered("{}")))
        producer = Producer({"bootstrap.servers": kafka})
        producer.produce(log.topic, key=eid.encode(), value=b"garbage", partition=p)
        producer.flush(10)
        with pytest.raises(CorruptEventError, match=rf"partition {p} offset 1"):
            rebuild(log, tmp_path / "view", workers=2)
    finally:
        log.close()
