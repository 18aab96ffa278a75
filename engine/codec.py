"""Avro single-object encoding of events, every schema version readable.

Wire format (Avro spec, "Single object encoding"): the two bytes ``C3 01``,
the 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's
parsing canonical form, then the Avro binary body. Because every record names
its writer schema, a schema change only adds ``schemas/event.vN.avsc``: the
newest version writes, and every version found in ``schemas/`` stays readable.
"""

from __future__ import annotations

import io
import json
from functools import cache
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from engine.errors import CodecError
from engine.events import BODY_TYPES, Event

MAGIC = b"\xc3\x01"
HEADER_LEN = 10
_NAMESPACE = "dev.ploy.events."


def schema_dir() -> Path:
    """Where the .avsc files are: the repo's ``schemas/`` or the wheel's copy."""
    repo = Path(__file__).resolve().parent.parent / "schemas"
    return repo if repo.is_dir() else Path(__file__).resolve().parent / "schemas"


class Codec:
    """Encodes with the newest schema; decodes any known version by fingerprint."""

    def __init__(self, directory: Path | None = None):
        files = sorted((directory or schema_dir()).glob("event.v*.avsc"), key=_version)
        if not files:
            raise CodecError(f"no event schemas (event.vN.avsc) in {directory or schema_dir()}")
        self.readers: dict[bytes, Any] = {}
        self.versions: dict[bytes, int] = {}
        for path in files:
            parsed = parse_schema(json.loads(path.read_text()))
            fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
            self.readers[fp] = parsed
            self.versions[fp] = _version(path)
        self.writer = parsed
        self.writer_fingerprint = fp
        self._header = MAGIC + fp

    def encode(self, event: Event) -> bytes:
        """The single-object encoding of ``event`` under the newest schema."""
        record = {
            "event_id": event.event_id,
            "execution_id": event.execution_id,
            "workflow": event.workflow,
            "timestamp": event.timestamp,
            "epoch": event.epoch,
            "body": (_NAMESPACE + event.body.NAME, vars(event.body)),
        }
        buf = io.BytesIO()
        buf.write(self._header)
        schemaless_writer(buf, self.writer, record)
        return buf.getvalue()

    def decode(self, data: bytes) -> Event:
        """The event in ``data``; CodecError names what is wrong with the bytes."""
        if len(data) < HEADER_LEN or data[:2] != MAGIC:
            start = data[:2].hex() or "empty"
            raise CodecError(f"not an Avro single-object record (starts {start})")
        schema = self.readers.get(data[2:HEADER_LEN])
        if schema is None:
            raise CodecError(f"unknown schema fingerprint {data[2:HEADER_LEN].hex()}")
        try:
            record: Any = schemaless_reader(
                io.BytesIO(data[HEADER_LEN:]), schema, None, return_record_name=True
            )
            name, body = record["body"]
            cls = BODY_TYPES[name.rsplit(".", 1)[-1]]
            return Event(
                execution_id=record["execution_id"],
                workflow=record["workflow"],
                timestamp=record["timestamp"],
                epoch=record["epoch"],
                event_id=record["event_id"],
                body=cls(**body),
            )
        except CodecError:
            raise
        except Exception as exc:  # fastavro raises many types on garbage input
            raise CodecError(f"undecodable Avro body: {type(exc).__name__}: {exc}") from exc


def _version(path: Path) -> int:
    return int(path.name.split(".")[1].lstrip("v"))


@cache
def default_codec() -> Codec:
    """One codec per process over the shipped schemas."""
    return Codec()
