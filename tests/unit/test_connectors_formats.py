"""Connector formats without a broker: CloudEvents out and in, JSON/Avro inputs, signatures,
archive records."""

from __future__ import annotations

import base64
import io
import json
import struct
from pathlib import Path
from typing import Any, cast

import fastavro
import pytest

from connectors.archive import archive_files, from_record, to_record
from connectors.cloudevents import _TYPES as TYPES
from connectors.cloudevents import (
    NotACloudEventError,
    data_of,
    header_map,
    lifecycle_type,
    rfc3339,
    to_cloudevent,
)
from connectors.errors import ArchiveError
from connectors.source import AvroDecoder, InvalidRecordError, decode_cloudevent, decode_json
from connectors.webhooks import sign, verify_signature
from engine.codec import default_codec
from engine.config import LIFECYCLE_TYPES
from engine.events import (
    BODY_TYPES,
    Event,
    PartitionClaimed,
    StepCompleted,
    StepFailed,
    WorkflowLog,
    WorkflowTriggered,
)

T = 1_738_324_800_123  # 2025-01-31T12:00:00.123Z


def failed(final: bool) -> StepFailed:
    return StepFailed("charge", 1, None, "ValueError", "no", "tb", T, None if final else T + 1,
                      final)


# -- lifecycle CloudEvents --------------------------------------------------------------------


def test_every_event_type_has_a_lifecycle_type_or_is_internal() -> None:
    assert set(TYPES) == set(BODY_TYPES)  # a new event type must be mapped (or None)
    assert set(TYPES.values()) | {"step.retrying"} == set(LIFECYCLE_TYPES) | {None}
    assert lifecycle_type(Event("partition-0", "", T, PartitionClaimed(0, "w1"))) is None


def test_a_step_failure_is_retrying_until_it_is_final() -> None:
    assert lifecycle_type(Event("e", "w", T, failed(False))) == "step.retrying"
    assert lifecycle_type(Event("e", "w", T, failed(True))) == "step.failed"


def test_cloudevent_of_an_event() -> None:
    event = Event("exec-1", "orders", T, StepCompleted("charge", 2, '{"amount": 3}',
                                                       '{"id": "pay_1"}', T - 5),
                  event_id="ev-1")
    ce = to_cloudevent(event, "shop", "step.completed")
    assert ce == {
        "specversion": "1.0", "id": "ev-1", "source": "ploy/shop",
        "type": "dev.ploy.step.completed", "subject": "exec-1",
        "time": "2025-01-31T12:00:00.123Z", "datacontenttype": "application/json",
        "data": {"execution_id": "exec-1", "workflow": "orders", "step": "charge",
                 "attempt": 2, "input": {"amount": 3}, "output": {"id": "pay_1"},
                 "started_at": T - 5},
    }
    log = to_cloudevent(Event("exec-1", "orders", T, WorkflowLog("info", "hi", None)), "p",
                        "workflow.log")
    assert log["data"]["data"] is None and log["data"]["message"] == "hi"
    trigger = to_cloudevent(Event("x", "w", T, WorkflowTriggered('"text"', "k")), "p",
                            "workflow.triggered")
    assert trigger["data"]["input"] == "text" and trigger["data"]["idempotency_key"] == "k"


def test_rfc3339_keeps_milliseconds() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(T) == "2025-01-31T12:00:00.123Z"


# -- CloudEvents in -----------------------------------------------------------------------------

BINARY = {"ce_specversion": "1.0", "ce_id": "1", "ce_source": "/s", "ce_type": "t"}
STRUCTURED = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}


def test_binary_mode() -> None:
    assert data_of(b'{"a": 1}', BINARY) == {"a": 1}
    assert data_of(b'{"a": 1}', {**BINARY, "content-type": "application/vnd.x+json"}) == {"a": 1}
    with pytest.raises(NotACloudEventError, match="missing CloudEvents header ce_source"):
        data_of(b"{}", {k: v for k, v in BINARY.items() if k != "ce_source"})
    with pytest.raises(NotACloudEventError, match="content type 'text/plain' is not JSON"):
        data_of(b"hi", {**BINARY, "content-type": "text/plain"})
    with pytest.raises(NotACloudEventError, match="specversion is '0.3'"):
        data_of(b"{}", {**BINARY, "ce_specversion": "0.3"})
    with pytest.raises(NotACloudEventError, match="binary-mode data is not JSON"):
        data_of(b"{", BINARY)


def test_structured_mode() -> None:
    ct = {"content-type": "application/cloudevents+json"}
    assert data_of(json.dumps({**STRUCTURED, "data": [1]}).encode(), ct) == [1]
    assert data_of(json.dumps({**STRUCTURED, "data": {"b": 2}}).encode(), {}) == {"b": 2}
    encoded = base64.b64encode(b'{"c": 3}').decode()
    assert data_of(json.dumps({**STRUCTURED, "data_base64": encoded}).encode(), ct) == {"c": 3}
    with pytest.raises(NotACloudEventError, match="missing CloudEvents attribute id, type"):
        data_of(json.dumps({"specversion": "1.0", "source": "/s"}).encode(), ct)
    with pytest.raises(NotACloudEventError, match="not a CloudEvent"):
        data_of(b'{"order": 1}', {})
    with pytest.raises(NotACloudEventError, match="data_base64 is not base64"):
        data_of(json.dumps({**STRUCTURED, "data_base64": "!!"}).encode(), ct)
    with pytest.raises(NotACloudEventError, match="no value"):
        data_of(None, ct)


def test_header_map_lowercases_and_decodes() -> None:
    assert header_map([("CE_ID", b"1"), ("x", None)]) == {"ce_id": "1", "x": ""}
    assert header_map(None) == {}


# -- source decoders ----------------------------------------------------------------------------

SCHEMA = {"type": "record", "name": "Order", "fields": [{"name": "id", "type": "string"}]}


def confluent(schema_id: int, record: dict[str, object]) -> bytes:
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(SCHEMA), record)
    return b"\x00" + struct.pack(">I", schema_id) + body.getvalue()


def test_json_and_cloudevent_decoders() -> None:
    assert decode_json(b'{"a": [1]}', {}) == {"a": [1]}
    with pytest.raises(InvalidRecordError, match="not JSON"):
        decode_json(b"\xff", {})
    with pytest.raises(InvalidRecordError, match="no value"):
        decode_json(None, {})
    with pytest.raises(InvalidRecordError, match="not a CloudEvent"):
        decode_cloudevent(b"{}", {})


def test_avro_decoder(tmp_path: Path) -> None:
    (tmp_path / "42.avsc").write_text(json.dumps(SCHEMA))
    (tmp_path / "43.avsc").write_text("{not a schema")
    decode = AvroDecoder(tmp_path)
    assert decode(confluent(42, {"id": "o-1"}), {}) == {"id": "o-1"}
    with pytest.raises(InvalidRecordError, match=r"no writer schema 7: .*7\.avsc does not exist"):
        decode(confluent(7, {"id": "x"}), {})
    with pytest.raises(InvalidRecordError, match="43.avsc is not an Avro schema"):
        decode(confluent(43, {"id": "x"}), {})
    with pytest.raises(InvalidRecordError, match="starts 7b"):
        decode(b'{"id": "x"}', {})
    with pytest.raises(InvalidRecordError, match="does not match schema 42"):
        decode(b"\x00" + struct.pack(">I", 42) + b"\x7f", {})


# -- webhook signatures -------------------------------------------------------------------------


def test_signature_round_trip_and_refusals() -> None:
    body = b'{"id":"1"}'
    header = sign("k", body, 1_700_000_000)
    assert header.startswith("t=1700000000,v1=") and len(header.split("v1=")[1]) == 64
    assert verify_signature("k", header, body, now=1_700_000_100)
    assert not verify_signature("k", header, body, now=1_700_000_400)  # too old: replay
    assert not verify_signature("other", header, body, now=1_700_000_000)
    assert not verify_signature("k", header, body + b" ", now=1_700_000_000)
    assert not verify_signature("k", None, body)
    assert not verify_signature("k", "t=x,v1=00", body)
    assert not verify_signature("k", "v1=00", body)


# -- archive records ----------------------------------------------------------------------------


def test_archive_record_round_trip_through_a_container_file() -> None:
    codec = default_codec()
    namespace = str(cast(dict[str, Any], codec.writer)["name"]).rsplit(".", 1)[0] + "."
    events = [
        Event("e1", "w", T, WorkflowTriggered('{"a":1}', "k"), event_id="a"),
        Event("e1", "w", T + 1, failed(False), epoch=3, event_id="b"),
        Event("partition-0", "", T + 2, PartitionClaimed(0, "host:1"), epoch=4, event_id="c"),
    ]
    buf = io.BytesIO()
    fastavro.writer(buf, codec.writer, [to_record(e, namespace) for e in events])
    buf.seek(0)
    plain = [cast(dict[str, Any], r) for r in fastavro.reader(buf)]
    assert [r["event_id"] for r in plain] == ["a", "b", "c"]
    buf.seek(0)
    assert [from_record(r) for r in fastavro.reader(buf, return_record_name=True)] == events  # type: ignore[arg-type]


def test_archive_files_in_order_and_overlaps_refused(tmp_path: Path) -> None:
    for name in ("p0-10-19.avro", "p0-0-9.avro", "p1-0-4.avro", ".p0-20.avro.tmp", "x.avro"):
        (tmp_path / name).write_bytes(b"")
    files = archive_files(tmp_path)
    assert [(f.first, f.last) for f in files[0]] == [(0, 9), (10, 19)]
    assert [(f.first, f.last) for f in files[1]] == [(0, 4)]
    (tmp_path / "p0-5-12.avro").write_bytes(b"")
    with pytest.raises(ArchiveError, match="overlap"):
        archive_files(tmp_path)
    assert archive_files(tmp_path / "missing") == {}
