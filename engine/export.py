"""``ploy export`` and ``ploy import``: the log as files, and files back into a log.

An export is a directory: one file per partition of ``<prefix>.events``
(``p<N>.avro`` or ``p<N>.jsonl``), each event with its partition and offset,
in log order, and ``manifest.json``, written last (an export without it is
unfinished). The Avro files are standard object container files with a flat
schema (:data:`EXPORT_SCHEMA`), so Spark, DuckDB (``read_avro``) or fastavro
read them as they are: the envelope's fields, ``type``, and ``body`` as JSON
text of the body's fields, in which user payloads (input, output, log data)
stay the JSON strings they are on the log. A JSON-lines file holds the same
records with ``body`` as a JSON object.

Import appends an unfiltered or workflow-filtered export into an EMPTY topic
with the same partition count, each event to the partition it was exported
from, in order, re-encoded with the codec (the current schema version): every
execution stays on the partition its id hashes to, and a worker or ``ploy
rebuild`` folds the same executions from it. An export cut by time is
refused: the window cuts executions, and the fold stops at an event whose
execution it has never seen (invariant 6).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import fastavro
from fastavro.write import Writer

from connectors.kafka import Batch, make_producer
from engine.asof import offsets_at
from engine.codec import Codec
from engine.errors import CodecError, CorruptEventError, ExportError
from engine.events import BODY_TYPES, Event
from engine.log import EventLog
from engine.view import PartitionView

__all__ = ["EXPORT_SCHEMA", "Exported", "export_log", "fold_export", "import_log", "read_export"]

Progress = Callable[[int, int], None]
"""``on_progress(events done, events to do)``, as ``engine.rebuild``."""

FORMATS = ("avro", "jsonl")
MANIFEST = "manifest.json"
CODEC = "deflate"

EXPORT_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "ExportedEvent",
    "namespace": "dev.ploy.export",
    "doc": "One event of <prefix>.events with where it was on the log.",
    "fields": [
        {"name": "partition", "type": "int"},
        {"name": "offset", "type": "long"},
        {"name": "event_id", "type": "string"},
        {"name": "execution_id", "type": "string"},
        {"name": "workflow", "type": "string"},
        {"name": "timestamp", "type": "long", "doc": "Writer's clock, ms since the epoch."},
        {"name": "epoch", "type": "long"},
        {"name": "type", "type": "string", "doc": "The body's type (StepCompleted, ...)."},
        {"name": "body", "type": "string",
         "doc": "JSON of the body's fields; user payloads stay JSON text inside it."},
    ],
}


@dataclass(frozen=True)
class Exported:
    """What an export holds (its manifest), or what an import appended."""

    topic: str
    partitions: int
    format: str
    counts: dict[int, int]
    workflow: str | None = None
    since: int | None = None
    until: int | None = None

    @property
    def events(self) -> int:
        return sum(self.counts.values())


# -- export ---------------------------------------------------------------------------------


def to_row(partition: int, offset: int, event: Event) -> dict[str, Any]:
    """The export record of an event (``body`` as a dict: JSON text in Avro files)."""
    return {"partition": partition, "offset": offset, "event_id": event.event_id,
            "execution_id": event.execution_id, "workflow": event.workflow,
            "timestamp": event.timestamp, "epoch": event.epoch, "type": event.type,
            "body": asdict(event.body)}


def from_row(row: dict[str, Any]) -> Event:
    """The event of an export record (from either format)."""
    body = row["body"]
    fields = json.loads(body) if isinstance(body, str) else body
    kind = BODY_TYPES.get(row["type"])
    if kind is None:
        raise ValueError(f"unknown event type '{row['type']}'")
    return Event(row["execution_id"], row["workflow"], row["timestamp"], kind(**fields),
                 epoch=row["epoch"], event_id=row["event_id"])


class _File:
    """One partition's export file, written as events come."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.count = path, 0
        self.fo: IO[bytes] = path.open("wb")
        self.avro = Writer(self.fo, EXPORT_SCHEMA, codec=CODEC) if fmt == "avro" else None

    def write(self, row: dict[str, Any]) -> None:
        if self.avro is not None:
            self.avro.write({**row, "body": json.dumps(row["body"], ensure_ascii=False)})
        else:
            self.fo.write(json.dumps(row, ensure_ascii=False).encode() + b"\n")
        self.count += 1

    def close(self) -> None:
        if self.avro is not None:
            self.avro.flush()
        self.fo.close()


def export_log(log: EventLog, out: Path, fmt: str = "avro", *, workflow: str | None = None,
               since: int | None = None, until: int | None = None,
               on_progress: Progress | None = None) -> Exported:
    """Write the events of ``log`` selected by workflow and time into ``out``.

    1. Refuse an ``out`` that already holds an export (nothing is overwritten).
    2. Start each partition at ``since`` (the broker's offsets_for_times: no
       earlier record can be selected), or at 0.
    3. Read every partition to its end; keep the events of ``workflow`` whose
       timestamp is in [since, until); write each to its partition's file.
    4. Write the manifest: the export is complete.

    Raises:
        ExportError: ``out`` holds an export, or ``fmt`` is unknown.
        CorruptEventError: A record does not decode (named by partition and offset).
    """
    if fmt not in FORMATS:
        raise ExportError(out, f"unknown format '{fmt}' (use {' or '.join(FORMATS)})")
    # Step 1.
    if (out / MANIFEST).exists():
        raise ExportError(out, "already holds an export; choose an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    # Step 2.
    start = dict.fromkeys(range(log.partitions), 0)
    if since is not None:
        start = offsets_at(log, since)
    total = sum(log.watermarks(p)[1] - o for p, o in start.items())
    files = {p: _File(out / f"p{p}.{fmt}", fmt) for p in range(log.partitions)}
    done = 0
    try:
        # Step 3.
        for batches in log.read_until_end(start) if start else iter(()):
            for p, records in batches.items():
                for offset, raw in records:
                    event = _decode(log, p, offset, raw)
                    if _selected(event, workflow, since, until):
                        files[p].write(to_row(p, offset, event))
                done += len(records)
            if on_progress is not None:
                on_progress(done, max(done, total))
    finally:
        for file in files.values():
            file.close()
    # Step 4.
    exported = Exported(log.topic, log.partitions, fmt, {p: f.count for p, f in files.items()},
                        workflow, since, until)
    (out / MANIFEST).write_text(json.dumps(asdict(exported), indent=2) + "\n", encoding="utf-8")
    return exported


def _decode(log: EventLog, partition: int, offset: int, raw: bytes) -> Event:
    try:
        return log.codec.decode(raw)
    except CodecError as exc:
        raise CorruptEventError(log.topic, partition, offset, str(exc)) from None


def _selected(event: Event, workflow: str | None, since: int | None, until: int | None) -> bool:
    return ((workflow is None or event.workflow == workflow)
            and (since is None or event.timestamp >= since)
            and (until is None or event.timestamp < until))


# -- import ---------------------------------------------------------------------------------


def read_manifest(directory: Path) -> Exported:
    """The manifest of the export in ``directory``; ExportError if there is none."""
    path = directory / MANIFEST
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(directory, f"holds no {MANIFEST}: not an export, or an unfinished "
                          "one") from None
    except ValueError as exc:
        raise ExportError(directory, f"{MANIFEST} is not JSON: {exc}") from None
    doc["counts"] = {int(p): n for p, n in doc["counts"].items()}
    return Exported(**doc)


def read_export(directory: Path, partition: int) -> Iterator[tuple[int, Event]]:
    """(offset on the exported log, event) of one partition of an export, in log order."""
    manifest = read_manifest(directory)
    path = directory / f"p{partition}.{manifest.format}"
    if not path.exists():
        return
    with path.open("rb") as fo:
        rows: Iterator[Any] = (fastavro.reader(fo) if manifest.format == "avro"
                               else (json.loads(line) for line in fo if line.strip()))
        for row in rows:
            yield row["offset"], from_row(row)


def fold_export(directory: Path, state_path: Path, codec: Codec) -> list[PartitionView]:
    """Fold an export of whole executions into new views at ``state_path``, one per
    partition, without Kafka (``ploy replay-check --histories``). The caller closes them.

    Raises:
        ExportError: Not an export, or one cut by time.
        CorruptEventError: The fold refuses an event (named by its exported offset).
    """
    manifest = read_manifest(directory)
    _check_whole(manifest, directory)
    views = []
    for p in range(manifest.partitions):
        view = PartitionView(state_path / f"p{p}", manifest.topic, p, codec, wal=False)
        views.append(view)
        records = [(offset, codec.encode(event)) for offset, event in read_export(directory, p)]
        _, failure = view.apply(records)
        if failure is not None:
            for opened in views:
                opened.close()
            raise failure
    return views


def _check_whole(manifest: Exported, directory: Path) -> None:
    if manifest.since is not None or manifest.until is not None:
        raise ExportError(directory, "was cut by --since/--until: its executions are "
                          "incomplete and would not fold; use an export of whole "
                          "executions (all, or --workflow)")


def import_log(log: EventLog, directory: Path, *, on_progress: Progress | None = None,
               timeout_s: float = 120.0) -> Exported:
    """Append the export in ``directory`` into ``log``'s topic, which must be empty.

    1. Read the manifest; refuse an export cut by time, or from a topic with
       another partition count (an execution's partition is its id's hash
       modulo the count).
    2. Refuse a topic that holds any record.
    3. Append each partition's events to the same partition, in order,
       re-encoded with the codec, and wait for every acknowledgement.

    Raises:
        ExportError: Not an export, cut by time, another partition count, or
            the topic is not empty.
    """
    # Step 1.
    manifest = read_manifest(directory)
    _check_whole(manifest, directory)
    if manifest.partitions != log.partitions:
        raise ExportError(directory, f"was exported from {manifest.partitions} partitions, "
                          f"'{log.topic}' has {log.partitions}; an execution's partition "
                          "depends on the count, so they must be equal")
    # Step 2.
    _check_empty(log, directory)
    # Step 3.
    acks = Batch(make_producer(log), f"import {directory}")
    counts = dict.fromkeys(range(log.partitions), 0)
    for p in counts:
        for _, event in read_export(directory, p):
            acks.produce(log.topic, log.codec.encode(event), event.execution_id.encode(),
                         partition=p)
            counts[p] += 1
            if on_progress is not None and sum(counts.values()) % 1000 == 0:
                on_progress(sum(counts.values()), manifest.events)
    acks.wait(timeout_s)
    if on_progress is not None:
        on_progress(sum(counts.values()), sum(counts.values()))
    return Exported(log.topic, log.partitions, manifest.format, counts, manifest.workflow)


def _check_empty(log: EventLog, directory: Path) -> None:
    batches = log.read_until_end(dict.fromkeys(range(log.partitions), 0))
    try:
        found = next(batches, None)
    finally:
        batches.close()  # type: ignore[attr-defined]  # ends the generator's consumer
    if found:
        raise ExportError(directory, f"cannot be imported into topic '{log.topic}': it is not "
                          f"empty (partition {min(found)} holds events); import only into an "
                          "empty topic (a fresh prefix or cluster)")
