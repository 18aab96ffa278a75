"""The Avro contract: every event round-trips; bad bytes fail clearly."""

from __future__ import annotations

import dataclasses
import io
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer

from engine.codec import (
    HEADER_LEN,
    MAGIC,
    Codec,
    compile_reader,
    compile_writer,
    default_codec,
    schema_dir,
)
from engine.errors import CodecError
from engine.events import (
    BODY_TYPES,
    CancelRequested,
    Event,
    EventSent,
    PartitionClaimed,
    PartitionReleased,
    Patched,
    RecordSkipped,
    ScheduleUpdated,
    SleepScheduled,
    StepCompleted,
    StepFailed,
    StepResolved,
    StepStarted,
    SubjectErased,
    TimerFired,
    WaitStarted,
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
    WorkflowLog("info", "positioned", None, "charge@2.0"),
    CancelRequested("user asked"),
    CancelRequested(),
    WorkflowCancelled(None),
    WorkflowCompleted('{"ok":true}'),
    WorkflowFailed("StepFailedError", "step 'x' failed", "Traceback..."),
    PartitionClaimed(3, "host:42"),
    RecordSkipped(3, 17, "garbage from a test producer", "ops@host"),
    PartitionReleased(3, "host:42", 2),
    WorkflowTriggered("{}", None, "parent-1", "charge", "00-abc-def-01", "src-1", 42, "user-7"),
    WorkflowStarted("host:1", "v2"),
    CancelRequested("ops asked", "admin"),
    WaitStarted("payment", "payment.settled", '{"order_id":"o-1"}', 1_700_000_000_000,
                1_700_003_600_000),
    WaitStarted("charge", "ploy.execution.ended", '{"execution_id":"c-1"}', 5, None, "c-1",
                False),
    EventSent("evt-1", "payment.settled", "kafka://payments", 1_700_000_000_000,
              '{"order_id":"o-1"}'),
    EventSent("evt-2", "nudge", "api", 1, "null", "exec-9"),
    Patched("new-refund-step"),
    ScheduleUpdated("nightly", "pause", "admin", "maintenance", None),
    StepResolved("charge", "complete", '{"ok":true}', "admin", "stuck"),
    StepResolved("charge", "retry-now", None, "admin"),
    SubjectErased("user-7", "admin", "GDPR request 12"),
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
        parse_schema(json.loads((schema_dir() / "event.v4.avsc").read_text()))
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
    assert current.versions[current.writer_fingerprint] == 4


def test_a_new_version_is_picked_up_from_the_schema_directory(tmp_path: Path) -> None:
    latest = json.loads((schema_dir() / "event.v4.avsc").read_text())
    (tmp_path / "event.v4.avsc").write_text(json.dumps(latest))
    v5 = json.loads(json.dumps(latest))
    v5["fields"].append({"name": "trace_id", "type": ["null", "string"], "default": None})
    (tmp_path / "event.v5.avsc").write_text(json.dumps(v5))
    new = Codec(tmp_path)
    event = Event("e", "w", 1, WorkflowTriggered("{}"))
    assert new.decode(default_codec().encode(event)) == event
    assert new.decode(new.encode(event)) == event
    assert new.versions[new.writer_fingerprint] == 5


# -- the compiled writer and readers against fastavro ----------------------------------------

NAMESPACE = "dev.ploy.events."


def _raw_schema(version: int) -> Any:
    return json.loads((schema_dir() / f"event.v{version}.avsc").read_text())


def _parsed(version: int) -> Any:
    return parse_schema(_raw_schema(version))


def fastavro_encode(schema: Any, event: Event, **extra: Any) -> bytes:
    """The Avro body fastavro writes for ``event`` (what the codec wrote before compiling)."""
    record = extra | {
        "event_id": event.event_id,
        "execution_id": event.execution_id,
        "workflow": event.workflow,
        "timestamp": event.timestamp,
        "epoch": event.epoch,
        "body": (NAMESPACE + event.body.NAME, dict(vars(event.body))),
    }
    buf = io.BytesIO()
    schemaless_writer(buf, schema, record)
    return buf.getvalue()


def fastavro_decode(schema: Any, body: bytes) -> Event:
    """The event fastavro reads from an Avro body."""
    record: Any = schemaless_reader(io.BytesIO(body), schema, None, return_record_name=True)
    name, fields = record["body"]
    return Event(
        execution_id=record["execution_id"],
        workflow=record["workflow"],
        timestamp=record["timestamp"],
        epoch=record["epoch"],
        event_id=record["event_id"],
        body=BODY_TYPES[name.rsplit(".", 1)[-1]](**fields),
    )


# ASCII, JSON punctuation and escapes, Latin-1, BMP (3-byte), astral (4-byte), combining,
# NUL and a noncharacter: every UTF-8 length.
ALPHABET = 'aZ09 _-{}[]":,\\/\n\t\x00\x7f\x80\xe9\xdf\xf8\u20ac\u65e5\u672c\u0301\u2603\uffff'
ALPHABET += "\U0001f600\U0001f680\U0001d11e"
EDGE_LONGS = [
    0, 1, -1, 2, 63, -64, 64, -65, 127, 128, -129, 8191, 8192, -8193,
    2**31 - 1, -(2**31), 2**31, -(2**31) - 1, 2**32, 2**53 + 1, 2**62, -(2**62),
    2**63 - 1, -(2**63), 2**63 - 2, -(2**63) + 1, 1_700_000_000_123, -1_700_000_000_123,
]


def _random_string(rng: random.Random) -> str:
    size = rng.choice([0, 0, 1, 2, 8, 31, 32, 33, 63, 64, 65, 127, 128, 200, rng.randrange(600)])
    if rng.random() < 0.3:
        return "".join(rng.choice("abcdef0123456789") for _ in range(size))  # ASCII: exact
    return "".join(rng.choice(ALPHABET) for _ in range(size))


def _random_long(rng: random.Random, bits: int) -> int:
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    pick = rng.random()
    if pick < 0.4:
        return rng.choice([v for v in EDGE_LONGS if low <= v <= high])
    if pick < 0.7:
        return rng.randint(-300, 300)
    return rng.randint(low, high) >> rng.randrange(bits)  # every magnitude


def _random_value(rng: random.Random, avro_type: Any) -> Any:
    if isinstance(avro_type, list):
        assert avro_type[0] == "null" and len(avro_type) == 2, avro_type
        return None if rng.random() < 0.35 else _random_value(rng, avro_type[1])
    if avro_type == "string":
        return _random_string(rng)
    if avro_type == "long":
        return _random_long(rng, 64)
    if avro_type == "int":
        return _random_long(rng, 32)
    if avro_type == "boolean":
        return rng.random() < 0.5
    raise AssertionError(f"no generator for {avro_type}")


def _body_field_types(version: int) -> dict[str, list[tuple[str, Any]]]:
    body = next(f for f in _raw_schema(version)["fields"] if f["name"] == "body")
    return {r["name"]: [(f["name"], f["type"]) for f in r["fields"]] for r in body["type"]}


def random_events(name: str, count: int, seed: int, version: int = 4) -> list[Event]:
    """``count`` events of body type ``name`` with random field values (fixed seed)."""
    rng = random.Random(f"{seed}-{name}")
    fields = _body_field_types(version)[name]
    events = []
    for _ in range(count):
        body = BODY_TYPES[name](**{n: _random_value(rng, t) for n, t in fields})
        events.append(Event(
            execution_id=_random_string(rng),
            workflow=_random_string(rng),
            timestamp=_random_long(rng, 64),
            body=body,
            epoch=_random_long(rng, 64),
            event_id=_random_string(rng),
        ))
    return events


def test_the_shipped_schemas_compile() -> None:
    for version in (1, 2, 3, 4):
        assert compile_writer(_parsed(version)) is not None
        assert compile_reader(_parsed(version)) is not None
    assert default_codec().compiled_writer is not None


@pytest.mark.parametrize("name", sorted(BODY_TYPES))
def test_compiled_codec_matches_fastavro_byte_for_byte(name: str) -> None:
    codec, schema = default_codec(), _parsed(4)
    for event in random_events(name, 300, seed=1):
        data = codec.encode(event)
        assert data[:HEADER_LEN] == MAGIC + codec.writer_fingerprint
        assert data[HEADER_LEN:] == fastavro_encode(schema, event), event
        decoded = codec.decode(data)
        assert decoded == fastavro_decode(schema, data[HEADER_LEN:]) == event
        assert hash(decoded) == hash(event)


@pytest.mark.parametrize("body", EVERY_BODY, ids=lambda b: type(b).NAME)
def test_decoded_events_are_plain_instances(body: Any) -> None:
    """Built without __init__ on the fast path: same fields, same order, still frozen."""
    event = default_codec().decode(default_codec().encode(Event("e", "w", 1, body, epoch=2)))
    assert list(vars(event)) == [f.name for f in dataclasses.fields(Event)]
    assert list(vars(event.body)) == [f.name for f in dataclasses.fields(type(body))]
    assert repr(event) == repr(Event("e", "w", 1, body, epoch=2, event_id=event.event_id))
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.body.x = 1  # type: ignore[union-attr]


@pytest.mark.parametrize("name", sorted(BODY_TYPES))
def test_every_truncation_is_a_codec_error(name: str) -> None:
    codec = default_codec()
    for event in random_events(name, 8, seed=2):
        data = codec.encode(event)
        for end in range(len(data)):
            with pytest.raises(CodecError):
                codec.decode(data[:end])


def test_trailing_bytes_are_a_codec_error() -> None:
    codec = default_codec()
    data = codec.encode(Event("e", "w", 1, StepStarted("s", 1)))
    for extra in (b"\x00", b"\x02a", b"garbage"):
        with pytest.raises(CodecError, match="trailing byte"):
            codec.decode(data + extra)


def _envelope(body: bytes) -> bytes:
    """A v4 record: event_id "a", execution_id "b", workflow "c", timestamp 0, epoch 0."""
    return MAGIC + default_codec().writer_fingerprint + b"\x02a\x02b\x02c\x00\x00" + body


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\x2a\x02w", "union index 21 of 21"),  # one past SubjectErased
        (b"\x01\x02w", "union index -1 of 21"),
        (b"\xff\xff\xff\xff\x0f", "union index"),
        (b"\x04\x02s\x02\x04", "union index 2 of 2"),  # StepStarted.input
        (b"\x04\x02s\x02\x03", "union index -2 of 2"),
        (b"\x08\x02s\x02\x00\x00\x00\x00\x00\x00\x02", "boolean byte 0x02"),  # StepFailed.final
        (b"\x02\x01", "negative length"),
        (b"\x02\x04\xff\xfe", "UnicodeDecodeError"),
        (b"\x02\xfe\xff\xff\xff\x0f", "Expected"),  # a 2 GB string in a few bytes
        (b"\x02" + b"\xff" * 11 + b"\x01", "varint longer than 10 bytes"),
        (b"\x0a\x02s" + b"\xff" * 9 + b"\x02\x00", "varint longer than 64 bits"),  # 2**64 + ...
        (b"\x00" + b"\xff" * 9 + b"\x02", "varint longer than 64 bits"),  # a string length
        (b"\x0a\x02s" + b"\xff" * 12, "varint longer than 10 bytes"),
    ],
)
def test_garbage_bodies_name_the_problem(body: bytes, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        default_codec().decode(_envelope(body))


def test_a_varint_of_a_long_index_is_still_read() -> None:
    """Avro lets a writer spend more bytes on a varint; the readers accept it."""
    canonical = _envelope(b"\x04\x02s\x02\x02\x02x")  # StepStarted("s", 1, "x")
    assert default_codec().decode(canonical).body == StepStarted("s", 1, "x")
    assert default_codec().decode(_envelope(b"\x84\x00\x02s\x82\x00\x82\x00\x02x")).body == (
        StepStarted("s", 1, "x")
    )
    assert default_codec().decode(_envelope(b"\x04\x02s\x02\x80\x00")).body == (
        StepStarted("s", 1, None)
    )


def test_random_garbage_only_ever_raises_codec_error() -> None:
    codec, rng = default_codec(), random.Random(3)
    valid = [codec.encode(e) for name in sorted(BODY_TYPES) for e in random_events(name, 5, 4)]
    for _ in range(3000):
        data = bytearray(rng.choice(valid))
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(HEADER_LEN, len(data))] = rng.randrange(256)
        if rng.random() < 0.2:
            data = bytearray(data[:HEADER_LEN]) + rng.randbytes(rng.randrange(40))
        try:
            assert isinstance(codec.decode(bytes(data)), Event)
        except CodecError:
            pass


def test_decode_takes_any_bytes_like() -> None:
    codec = default_codec()
    event = Event("e", "w", 1, StepCompleted("s", 1, None, "{}", 1))
    data = codec.encode(event)
    assert codec.decode(bytearray(data)) == codec.decode(memoryview(data)) == event  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (StepCompleted("s", 1, None, "{}", 2**63), OverflowError),
        (StepCompleted("s", 1, None, "{}", -(2**63) - 1), OverflowError),
        (StepStarted("s", 1, 5), ValueError),  # type: ignore[arg-type]
        (StepFailed("s", 1, None, "E", "m", "t", 1, True, False), ValueError),  # bool: no long
    ],
)
def test_values_outside_the_schema_do_not_encode(body: Any, error: type[Exception]) -> None:
    event = Event("e", "w", 1, body)
    with pytest.raises(error):
        default_codec().encode(event)
    with pytest.raises(error):
        fastavro_encode(_parsed(4), event)


@pytest.mark.parametrize("body", [
    WorkflowStarted("w-\ud800"),
    WorkflowFailed("E", "bad \udfff text", "tb \ud800"),
    WorkflowLog("info", "\ud83d alone", None, "w1.\udc00"),
])
def test_a_lone_surrogate_is_written_as_its_escape_never_an_error(body: Any) -> None:
    """No UTF-8 encoder takes one; one in an error message must not stop a run or a sink."""
    codec = default_codec()
    decoded = codec.decode(codec.encode(Event("e", "w", 1, body)))
    for name, value in vars(decoded.body).items():
        original = getattr(body, name)
        if isinstance(original, str):
            assert value == original.encode("utf-8", "backslashreplace").decode()
            assert "\\u" in value or original.isascii()


@pytest.mark.parametrize("name", sorted(set(BODY_TYPES) & set(_body_field_types(1))))
def test_v1_bytes_decode_with_the_current_codec(name: str, tmp_path: Path) -> None:
    (tmp_path / "event.v1.avsc").write_text((schema_dir() / "event.v1.avsc").read_text())
    v1_codec, v1 = Codec(tmp_path), _parsed(1)
    assert v1_codec.compiled_writer is not None
    header = MAGIC + v1_codec.writer_fingerprint
    current = default_codec()
    for event in random_events(name, 100, seed=5, version=1):
        body = fastavro_encode(v1, event)
        assert v1_codec.encode(event) == header + body
        assert current.decode(header + body) == fastavro_decode(v1, body) == event


def _with_latest(tmp_path: Path, change: Any) -> Codec:
    latest = _raw_schema(4)
    (tmp_path / "event.v4.avsc").write_text(json.dumps(latest))
    v5 = json.loads(json.dumps(latest))
    change(v5)
    (tmp_path / "event.v5.avsc").write_text(json.dumps(v5))
    return Codec(tmp_path)


def test_a_new_version_compiles_and_matches_fastavro(tmp_path: Path) -> None:
    def add_trace_id(v3: Any) -> None:
        v3["fields"].insert(2, {"name": "trace_id", "type": ["null", "string"], "default": None})

    new = _with_latest(tmp_path, add_trace_id)
    assert new.compiled_writer is not None
    parsed = new.writer
    for event in random_events("StepFailed", 50, seed=6):
        data = new.encode(event)
        assert data[HEADER_LEN:] == fastavro_encode(parsed, event)
        assert new.decode(data) == fastavro_decode(parsed, data[HEADER_LEN:]) == event
        assert new.decode(default_codec().encode(event)) == event
    # Set by another writer, a field the Event lacks is read and dropped.
    traced = data[:HEADER_LEN] + fastavro_encode(parsed, event, trace_id="t-1")
    assert len(traced) == len(data) + 4
    assert new.decode(traced) == event


def _add_map_field(v3: Any) -> None:
    v3["fields"].append(
        {"name": "tags", "type": ["null", {"type": "map", "values": "string"}], "default": None}
    )


def _add_unknown_body(v3: Any) -> None:
    body = next(f for f in v3["fields"] if f["name"] == "body")
    body["type"].append({"type": "record", "name": "NotAnEvent", "fields": []})


@pytest.mark.parametrize("change", [_add_map_field, _add_unknown_body])
def test_a_version_the_compiler_cannot_handle_falls_back_to_fastavro(
    change: Any, tmp_path: Path
) -> None:
    new = _with_latest(tmp_path, change)
    assert compile_writer(new.writer) is None and compile_reader(new.writer) is None
    assert new.compiled_writer is None
    for event in random_events("StepCompleted", 20, seed=7):
        data = new.encode(event)
        assert data[HEADER_LEN:] == fastavro_encode(new.writer, event)
        assert new.decode(data) == event
        assert new.decode(default_codec().encode(event)) == event  # v4: compiled
    with pytest.raises(CodecError, match="trailing byte"):
        new.decode(data + b"\x00")
    with pytest.raises(CodecError, match="undecodable Avro body"):
        new.decode(data[:-3])
