"""Archive files a crash left open are closed with their whole blocks, not deleted."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from connectors.archive import (
    _OpenFile,
    archived_positions,
    read_events,
    recover_open_files,
    to_record,
)
from engine.codec import default_codec
from engine.events import Event, WorkflowLog


def events(first: int, count: int) -> list[Event]:
    return [Event(f"e{i}", "job", 1_000 + i, WorkflowLog("info", f"line {i}"))
            for i in range(first, first + count)]


SCHEMA = cast(dict[str, Any], default_codec().writer)
NAMESPACE = str(SCHEMA["name"]).rsplit(".", 1)[0] + "."


def open_file(directory: Path) -> _OpenFile:
    return _OpenFile(directory, SCHEMA, {"ploy.topic": "t.events", "ploy.partition": "2"}, 2, 40)


def write(file: _OpenFile, batch: list[Event], first: int) -> None:
    for offset, event in enumerate(batch, start=first):
        file.write(to_record(event, NAMESPACE), offset)


def test_a_torn_last_block_keeps_the_synced_ones(tmp_path: Path) -> None:
    file = open_file(tmp_path)
    write(file, events(0, 5), 40)
    file.sync()
    write(file, events(5, 3), 45)
    file.sync()
    synced = file.tmp.stat().st_size
    write(file, events(8, 4), 48)
    file.sync()
    file.fo.close()  # killed: never closed, and the last block is cut short
    with file.tmp.open("r+b") as fo:
        fo.truncate(synced + 7)

    (closed,) = recover_open_files(tmp_path)
    assert (closed.partition, closed.first, closed.last) == (2, 40, 47)
    assert closed.path.name == "p2-40-47.avro"
    assert [e.execution_id for e in read_events(closed.path)] == [f"e{i}" for i in range(8)]
    assert not list(tmp_path.glob(".*"))
    assert archived_positions(tmp_path) == {2: 48}
    assert recover_open_files(tmp_path) == []  # nothing left to do


def test_a_file_with_no_whole_block_is_removed(tmp_path: Path) -> None:
    file = open_file(tmp_path)
    write(file, events(0, 2), 40)  # written, never synced
    file.fo.close()
    assert recover_open_files(tmp_path) == []
    assert list(tmp_path.iterdir()) == []
