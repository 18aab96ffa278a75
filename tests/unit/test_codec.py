"""The Avro contract: every event round-trips; bad bytes fail clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.codec import MAGIC, Codec, default_codec, schema_dir
from engine.errors import CodecError
from engine.events import (
    BODY_TYPES,
    PartitionClaimed,
    CancelRequested,
    Event,
    SleepScheduled,
    StepCompleted,
    StepFailed,
    StepStarted,
    TimerFired,
    WorkflowCancelled,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowLog,
    WorkflowStarted,
    WorkflowTriggered,
)

EVERY_BODY = [
    WorkflowTriggered('{"order":"o-1"}', "key-1"),
    WorkflowTriggered("{}"),
    WorkflowStarted("host:1"),
    StepStarted("charge", 1, '{"amount":3}'),
    StepCompleted("charge", 2, None, '{"paid":true}', 1_700_000_000_000),
    StepFailed("charge", 1, None, "ValueError", "declined", "Traceback...", 5, 1_000, False),
    StepFailed("charge", 3, "{}", "ValueError", "declined", "", 5, None, True),
    SleepScheduled("sleep#1", 86_400_000, 1_700_086_400_000),
    TimerFired("sleep#1", 1_700_086_400_000),
    WorkflowLog("info", "hello \u2603", '{"k":[1,2]}'),
    WorkflowLog("warning", "no data"),
    CancelRequested("user asked"),
    CancelRequested(),
    WorkflowCancelled(None),
    WorkflowCompleted('{"ok":true}'),
    WorkflowFailed("StepFailedError", "step 'x' failed", "Traceback..."),
    PartitionClaimed(3, "host:42"),
]


def test_every_body_type_is_covered() -> None:
    assert {type(b).NAME for b in EVERY_BODY} == set(BODY_TYPES)


@pytest.mark.parametrize("body", EVERY_BODY, ids=lambda b: type(b).NAME)
def test_round_trip(body: object) -> None:
    codec = default_codec()
    event = Event("exec-1", "order_processing", 1_700_000_000_123, body, epoch=7)  # type: ignore[arg-type]
    data = codec.encode(event)
    assert data[:2] == MAGIC
    assert data[2:10] == codec.writer_fingerprint
    assert codec.decode(data) == event


def test_fingerprint_is_stable_across_processes() -> None:
    code = "from engine.codec import Codec; print(Codec().writer_fingerprint.hex())"
    runs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True).stdout.strip()
        for _ in range(2)
    }
    assert runs == {default_codec().writer_fingerprint.hex()}


def test_fingerprint_is_crc64_avro_of_the_canonical_form() -> None:
    from fastavro.schema import parse_schema, to_parsing_canonical_form

    canonical = to_parsing_canonical_form(
        parse_schema(json.loads((schema_dir() / "event.v2.avsc").read_text()))
    ).encode()
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in canonical:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    assert default_codec().writer_fingerprint == fp.to_bytes(8, "little")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "not an Avro single-object record"),
        (b"{\"json\": true}", "not an Avro single-object record"),
        (MAGIC + b"\x00" * 8 + b"\x02a", "unknown schema fingerprint 0000000000000000"),
    ],
)
def test_bad_bytes_name_the_problem(data: bytes, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        default_codec().decode(data)


def test_truncated_body_is_a_codec_error() -> None:
    codec = default_codec()
    data = codec.encode(Event("e", "w", 1, StepCompleted("s", 1, None, "{}", 1)))
    with pytest.raises(CodecError, match="undecodable Avro body"):
        codec.decode(data[:-6])


def test_v1_events_stay_readable_by_the_current_codec(tmp_path: Path) -> None:
    (tmp_path / "event.v1.avsc").write_text((schema_dir() / "event.v1.avsc").read_text())
    v1_writer = Codec(tmp_path)
    current = default_codec()
    assert current.writer_fingerprint != v1_writer.writer_fingerprint
    event = Event("e", "w", 1, StepCompleted("s", 1, None, "{}", 1))
    assert current.decode(v1_writer.encode(event)) == event
    assert current.versions[v1_writer.writer_fingerprint] == 1
    assert current.versions[current.writer_fingerprint] == 2


def test_a_new_version_is_picked_up_from_the_schema_directory(tmp_path: Path) -> None:
    latest = json.loads((schema_dir() / "event.v2.avsc").read_text())
    (tmp_path / "event.v2.avsc").write_text(json.dumps(latest))
    v3 = json.loads(json.dumps(latest))
    v3["fields"].append({"name": "trace_id", "type": ["null", "string"], "default": None})
    (tmp_path / "event.v3.avsc").write_text(json.dumps(v3))
    new = Codec(tmp_path)
    event = Event("e", "w", 1, WorkflowTriggered("{}"))
    assert new.decode(default_codec().encode(event)) == event
    assert new.decode(new.encode(event)) == event
    assert new.versions[new.writer_fingerprint] == 3
