"""Sink: every event of the log into Avro Object Container Files; and restore.

``sinks: [{kind: archive, dir: archive/, roll_bytes: 67108864, roll_seconds: 300}]``

Files are standard Avro container files (the event schema in the header,
deflate blocks) that any Avro reader opens as they are (fastavro, Spark,
DuckDB's avro extension). One series per partition of ``<prefix>.events``,
named by partition and offset range: ``p<partition>-<first>-<last>.avro``. A
file is written as ``.p<partition>-<first>.avro.tmp`` and renamed when it is
closed (fsynced first): when it reaches ``roll_bytes``, when it is
``roll_seconds`` old, and when the engine stops. A file holds contiguous
offsets (a gap in the log starts a new file), so its first offset and its
count name its last one.

Durability: what the sink read is written as a whole Avro block and fsynced
at least every ``ARCHIVE_SYNC_S``, open file or not. After a crash,
:func:`recover_open_files` closes each temporary file with every whole block
it holds (a block torn by the crash is dropped, its events are read again),
and the sink reads on from the offset after the last closed file, so each
event is in exactly one file. Headers hold ``ploy.topic``, ``ploy.partition``,
``ploy.partitions`` and ``ploy.first_offset``.

:func:`restore` appends an archive into an empty topic, each partition's
events to the same partition in the same order (so every execution stays on
the partition its id hashes to); a view folded from it is the view of the
archived log. ``ploy dev`` archives into its state directory and restores on
start (:func:`dev_restore`), so its in-memory broker no longer loses every
execution when it stops, nor, beyond the last ``ARCHIVE_SYNC_S``, when it is
killed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import fastavro
from fastavro.write import Writer

from connectors.errors import ArchiveError, TopicNotEmptyError
from connectors.kafka import Batch, make_producer
from connectors.lifecycle import load_position
from connectors.sink import SinkThread
from connectors.state import StateFile, connectors_dir, position_file_names, str_keys
from connectors.tail import EventTail, Position
from engine.config import ArchiveSink as ArchiveSinkConfig
from engine.config import Config
from engine.events import BODY_TYPES, Event
from engine.log import EventLog

if TYPE_CHECKING:
    from engine.app import Engine

logger = logging.getLogger("ploy.connectors")

FILE_NAME = re.compile(r"^p(\d+)-(\d+)-(\d+)\.avro$")
OPEN_NAME = re.compile(r"^\.p(\d+)-(\d+)\.avro\.tmp$")
# The longest an event the sink has read waits before it is on disk (fsynced):
# the poll wait plus the sync interval, plus the write itself.
SYNC_INTERVAL_S = 0.2
POLL_S = 0.2
ARCHIVE_SYNC_S = 1.0
CODEC = "deflate"
DEV_ROLL_SECONDS = 10.0
DEV_ROLL_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ArchiveFile:
    """A closed archive file and the offsets it holds."""

    path: Path
    partition: int
    first: int
    last: int


def archive_files(directory: Path) -> dict[int, list[ArchiveFile]]:
    """The closed files of an archive by partition, in offset order.

    Raises:
        ArchiveError: Two files of a partition overlap (two archives mixed).
    """
    by_partition: dict[int, list[ArchiveFile]] = {}
    if not directory.is_dir():
        return by_partition
    for path in directory.iterdir():
        match = FILE_NAME.match(path.name)
        if match:
            p, first, last = (int(g) for g in match.groups())
            by_partition.setdefault(p, []).append(ArchiveFile(path, p, first, last))
    for files in by_partition.values():
        files.sort(key=lambda f: f.first)
        for before, after in zip(files, files[1:], strict=False):
            if after.first <= before.last:
                raise ArchiveError(str(directory), f"{before.path.name} and {after.path.name} "
                                   "overlap: the directory mixes two archives")
    return by_partition


def archived_positions(directory: Path) -> dict[int, int]:
    """The offset after each partition's last closed file: where archiving goes on."""
    return {p: files[-1].last + 1 for p, files in archive_files(directory).items()}


def recover_open_files(directory: Path, partition: int | None = None) -> list[ArchiveFile]:
    """Close the files a crash left open, with every event they hold on disk.

    Each ``.p<partition>-<first>.avro.tmp`` is read block by block up to the
    first block the crash tore; its events are written to a new file that is
    fsynced and renamed ``p<partition>-<first>-<last>.avro`` (a file holds
    contiguous offsets, so the count gives ``last``); then the temporary
    file is removed. A crash during this leaves the temporary file, and it is
    done again. Files with no whole block are removed. With ``partition``,
    only that partition's files.

    Returns:
        The files closed.
    """
    closed: list[ArchiveFile] = []
    if not directory.is_dir():
        return closed
    only = "*" if partition is None else str(partition)
    for leftover in directory.glob(f".p{only}-*.avro.recovering"):
        leftover.unlink()
    for tmp in sorted(directory.iterdir()):
        match = OPEN_NAME.match(tmp.name)
        if match is None or (partition is not None and int(match.group(1)) != partition):
            continue
        partition_of, first = (int(g) for g in match.groups())
        schema, metadata, records = _readable_part(tmp)
        if records:
            last = first + len(records) - 1
            final = directory / f"p{partition_of}-{first}-{last}.avro"
            part = directory / f".p{partition_of}-{first}.avro.recovering"
            with part.open("wb") as fo:
                fastavro.writer(fo, schema, records, codec=CODEC, metadata=metadata)
                fo.flush()
                os.fsync(fo.fileno())
            os.replace(part, final)
            closed.append(ArchiveFile(final, partition_of, first, last))
            logger.warning("archive %s: closed %s with %d events left open by a crash",
                           directory, final.name, len(records))
        tmp.unlink()
        _fsync_dir(directory)
    return closed


def _readable_part(path: Path) -> tuple[Any, dict[str, str], list[Any]]:
    """The writer schema, the ``ploy.*`` metadata and the records of the whole blocks."""
    records: list[Any] = []
    schema: Any = None
    metadata: dict[str, str] = {}
    with path.open("rb") as fo:
        try:
            blocks = fastavro.block_reader(fo)
            schema = blocks.writer_schema
            metadata = {k: v for k, v in blocks.metadata.items() if k.startswith("ploy.")}
            for block in blocks:
                records.extend(list(block))  # a block counts whole or not at all
        except Exception as exc:  # fastavro raises many types on a torn header or block
            logger.debug("archive file %s: read up to a torn part (%s)", path, exc)
    return schema, metadata, records


def to_record(event: Event, namespace: str) -> dict[str, Any]:
    """An event as a record of the event schema (the union branch named)."""
    return {
        "event_id": event.event_id,
        "execution_id": event.execution_id,
        "workflow": event.workflow,
        "timestamp": event.timestamp,
        "epoch": event.epoch,
        "body": (namespace + event.body.NAME, dict(vars(event.body))),  # flat: no asdict
    }


def from_record(record: dict[str, Any]) -> Event:
    """The event of a record read with ``return_record_name=True``."""
    name, body = record["body"]
    return Event(record["execution_id"], record["workflow"], record["timestamp"],
                 BODY_TYPES[name.rsplit(".", 1)[-1]](**body), epoch=record["epoch"],
                 event_id=record["event_id"])


def read_events(path: Path) -> Iterator[Event]:
    """The events of one archive file, in order."""
    with path.open("rb") as fo:
        for record in fastavro.reader(fo, return_record_name=True):
            assert isinstance(record, dict)
            yield from_record(record)


def _metadata(path: Path) -> dict[str, str]:
    with path.open("rb") as fo:
        return {k: v for k, v in fastavro.reader(fo).metadata.items() if k.startswith("ploy.")}


# -- the sink ------------------------------------------------------------------------------------


class _OpenFile:
    """The file a partition is being archived into, under its temporary name."""

    def __init__(self, directory: Path, schema: Any, metadata: dict[str, str],
                 partition: int, first: int):
        self.directory, self.partition, self.first, self.last = directory, partition, first, first
        self.count = 0
        self.tmp = directory / f".p{partition}-{first}.avro.tmp"
        self.fo: IO[bytes] = self.tmp.open("wb")
        self.writer = Writer(self.fo, schema, codec=CODEC,
                             metadata={**metadata, "ploy.first_offset": str(first)})
        self.opened_at = time.monotonic()
        self.unsynced = False
        self._flushed = self.fo.tell()  # the file's size up to the open block
        self._block = 0

    def follows(self, offset: int) -> bool:
        """Whether ``offset`` goes on this file's contiguous run of offsets."""
        return self.count == 0 or offset == self.last + 1

    def write(self, record: dict[str, Any], offset: int) -> None:
        self.writer.write(record)
        self.last, self.count, self.unsynced = offset, self.count + 1, True

    def sync(self) -> None:
        """End the open block and fsync: what was written survives a crash from now on."""
        if self.unsynced:
            self.writer.flush()
            self.fo.flush()
            os.fsync(self.fo.fileno())
            self.unsynced = False
            self._flushed, self._block = self.fo.tell(), 0

    def size(self) -> int:
        """Bytes so far, the open block's too. The file's own position is asked only once
        the writer has flushed a block to it: a system call per record lets go of the
        interpreter lock, and getting it back behind the event loop is slow."""
        block = int(cast(Any, self.writer).io.tell())
        if block <= self._block:  # a write that ends no block always adds to it
            self._flushed = self.fo.tell()
        self._block = block
        return self._flushed + block

    def close(self) -> Path:
        """Flush, fsync, rename to ``p<partition>-<first>-<last>.avro``."""
        self.writer.flush()
        self.fo.flush()
        os.fsync(self.fo.fileno())
        self.fo.close()
        final = self.directory / f"p{self.partition}-{self.first}-{self.last}.avro"
        os.replace(self.tmp, final)
        _fsync_dir(self.directory)
        return final

    def discard(self) -> None:
        self.fo.close()
        self.tmp.unlink(missing_ok=True)


class ArchiveSink(SinkThread):
    """One ``kind: archive`` sink, archiving the partitions this process owns.

    In ``ploy dev`` that is every partition. In a cluster each partition is
    archived by its owner: point ``dir`` at storage every worker shares, and
    the worker that takes a partition over closes what a killed owner left
    open (:func:`recover_open_files`) and goes on after the last closed file.
    Starting a partition: close its files a crash left open, follow it from
    the offset after its last closed file. Stopping one: close its open file.
    Each step:

    1. Poll the events topic (every record, claims and fenced ones too: the
       archive is the log).
    2. Append each event to its partition's open file, opening one at the
       first record after a roll or a gap in the offsets.
    3. Close (rename) every file that reached ``roll_bytes`` or ``roll_seconds``.
    4. Every ``SYNC_INTERVAL_S``, write and fsync the open files' new events.
    A failure discards the open files and reads again from the closed ones
    (at start, :func:`recover_open_files` closes what a crash left open).
    """

    def __init__(self, engine: Engine, sink: ArchiveSinkConfig):
        super().__init__()
        self.sink = sink
        self.directory = Path(sink.dir)
        self.name = f"archive sink {self.directory}"
        self.log = engine.runtime.log
        self.schema = cast(dict[str, Any], self.log.codec.writer)
        self.namespace = str(self.schema["name"]).rsplit(".", 1)[0] + "."
        self.metadata = {"ploy.topic": self.log.topic,
                         "ploy.partitions": str(self.log.partitions)}
        self.files: dict[int, _OpenFile] = {}
        self.closed = 0
        self.synced_at = time.monotonic()

    def setup(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._check_topic()
        self.tail = EventTail(self.log, "sink.archive", batched=True)  # ARCHIVE_SYNC_S holds

    def start_partition(self, partition: int) -> None:
        recover_open_files(self.directory, partition)
        position = archived_positions(self.directory).get(partition, 0)
        self.tail.add(partition, position, 0)  # every record goes in: no fencing here

    def stop_partition(self, partition: int) -> None:
        if partition in self.files:
            self._close(partition)
        self.tail.remove(partition)

    def _check_topic(self) -> None:
        for files in archive_files(self.directory).values():
            topic = _metadata(files[-1].path).get("ploy.topic")
            if topic is not None and topic != self.log.topic:
                raise ArchiveError(str(self.directory), f"holds the archive of topic '{topic}',"
                                   f" not '{self.log.topic}'")
            return

    def step(self) -> None:
        # Step 1.
        for record in self.tail.poll(POLL_S):
            # Step 2.
            p = record.partition
            file = self.files.get(p)
            if file is not None and not file.follows(record.offset):
                self._close(p)
                file = None
            if file is None:
                file = self.files[p] = _OpenFile(self.directory, self.schema, {
                    **self.metadata, "ploy.partition": str(p)}, p, record.offset)
            file.write(to_record(record.event, self.namespace), record.offset)
            if file.size() >= self.sink.roll_bytes:
                self._close(p)
        # Step 3.
        now = time.monotonic()
        for p, file in list(self.files.items()):
            if now - file.opened_at >= self.sink.roll_seconds:
                self._close(p)
        # Step 4.
        if now - self.synced_at >= SYNC_INTERVAL_S:
            for file in self.files.values():
                file.sync()
            self.synced_at = now

    def _close(self, partition: int) -> None:
        path = self.files.pop(partition).close()
        self.closed += 1
        logger.debug("%s: closed %s", self.name, path.name)

    def recover(self) -> None:
        for file in self.files.values():
            file.discard()
        self.files.clear()
        archived = archived_positions(self.directory)
        self.tail.rewind(Position({p: archived.get(p, 0) for p in self.tail.partitions}, {}))

    def finish(self) -> None:
        for p in list(self.files):
            self._close(p)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- restore -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Restored:
    """What :func:`restore` appended: events per partition, and whether offsets are the same."""

    counts: dict[int, int]
    offsets_preserved: bool

    @property
    def events(self) -> int:
        return sum(self.counts.values())


def restore(log: EventLog, directory: Path, *, timeout_s: float = 120.0) -> Restored:
    """Append the archive in ``directory`` to ``log``'s topic, which must be empty.

    1. List the closed files by partition; check that the topic has as many
       partitions as the archived one (an execution's partition is its id's
       hash modulo the count).
    2. Check that the topic is empty: read every partition to its end.
    3. Append each partition's events to the same partition, file after file,
       in order, and wait for every acknowledgement.

    Returns:
        The count per partition, and whether every event kept its offset (the
        archive is contiguous from offset 0, as one written by the sink from
        the start of the log is).

    Raises:
        ArchiveError: Different partition counts, overlapping files.
        TopicNotEmptyError: The topic already holds events.
    """
    # Step 1.
    files = archive_files(directory)
    where = str(directory)
    if not files:
        return Restored({}, True)
    for p, series in files.items():
        archived = _metadata(series[0].path).get("ploy.partitions")
        if p >= log.partitions or (archived is not None and int(archived) != log.partitions):
            count = archived or f"more than {p}"
            raise ArchiveError(where, f"the archived topic had {count} partitions, "
                               f"'{log.topic}' has {log.partitions}; an execution's partition "
                               "depends on the count, so they must be equal")
    # Step 2.
    batches = log.read_until_end(dict.fromkeys(range(log.partitions), 0))
    try:
        found = next(batches, None)
    finally:
        getattr(batches, "close", lambda: None)()  # ends the generator's consumer
    if found:
        raise TopicNotEmptyError(where, log.topic, min(found))
    # Step 3.
    acks = Batch(make_producer(log), f"restore {where}")
    counts: dict[int, int] = {}
    preserved = True
    for p, series in sorted(files.items()):
        counts[p] = 0
        for file in series:
            if file.first != counts[p]:
                preserved = False
            for event in read_events(file.path):
                acks.produce(log.topic, log.codec.encode(event), event.execution_id.encode(),
                             partition=p)
                counts[p] += 1
            if counts[p] != file.last + 1:
                preserved = False
    acks.wait(timeout_s)
    logger.info("restored %d events from %s into %s", sum(counts.values()), where, log.topic)
    return Restored(counts, preserved)


# -- ploy dev ------------------------------------------------------------------------------------


def dev_archive_dir(config: Config) -> Path:
    """Where ``ploy dev`` archives: ``<state_dir>/<prefix>.archive``."""
    return Path(config.state_dir) / f"{config.kafka.topic_prefix}.archive"


def dev_restore(config: Config, archive_dir: Path | None = None) -> tuple[Config, int]:
    """Restore ``ploy dev``'s archive into a fresh embedded broker; archive from then on.

    Call it after the embedded broker started (``config`` names it) and
    before the engine starts; it blocks (run it in a thread from async code).

    1. Close the archive files a ``ploy dev`` killed left open
       (:func:`recover_open_files`), then restore the archive into the empty
       events topic.
    2. Clamp the sinks' positions to the restored log (events after the last
       closed archive file died with the old broker).
    3. If the restored offsets differ from the archived ones, move the old
       archive aside (``<dir>.replaced-<time>``): the sink then archives the
       restored topic from offset 0 again.

    Sources need nothing here: a source topic on a fresh broker has a new
    topic id, so a source drops its old offsets and its new records' keys
    differ from those of the restored executions.

    Returns:
        ``config`` plus an archive sink into ``archive_dir`` (default
        :func:`dev_archive_dir`), and the number of events restored.
    """
    directory = archive_dir or dev_archive_dir(config)
    state = connectors_dir(config)
    # Step 1.
    recover_open_files(directory)
    kafka = config.kafka
    assert kafka.bootstrap_servers, "dev_restore runs after the embedded broker started"
    log = EventLog(kafka.bootstrap_servers, kafka.topic_prefix, kafka.partitions,
                   extra=kafka.config, connect_timeout_s=kafka.connect_timeout_s)
    try:
        restored = restore(log, directory)
    finally:
        log.close()
    # Step 2.
    for name in position_file_names(state):
        _clamp(StateFile(state / name), restored.counts)
    # Step 3.
    if not restored.offsets_preserved:
        aside = directory.with_name(f"{directory.name}.replaced-{int(time.time())}")
        shutil.move(directory, aside)
        logger.warning("restored offsets differ from the archive's; moved it to %s", aside)
    return _with_archive_sink(config, directory), restored.events


def _clamp(state: StateFile, ends: dict[int, int]) -> None:
    doc = state.load()
    if not doc:
        return
    offsets = load_position(state).offsets
    doc["offsets"] = str_keys({p: min(o, ends.get(p, 0)) for p, o in offsets.items()})
    state.save(doc)


def _with_archive_sink(config: Config, directory: Path) -> Config:
    if any(getattr(s, "dir", None) == directory for s in config.sinks):
        return config
    sink = ArchiveSinkConfig(kind="archive", dir=directory, roll_bytes=DEV_ROLL_BYTES,
                             roll_seconds=DEV_ROLL_SECONDS)
    return config.model_copy(update={"sinks": [*config.sinks, sink]})
