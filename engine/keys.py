"""Every RocksDB key of the view, in one place.

Each partition has its own RocksDB directory (``<state_dir>/<prefix>/p<N>``)
so a partition's state moves with the partition. Inside it, keys are a
one-letter keyspace and fixed parts; integers are fixed-width big-endian so
that byte order is numeric order (timers sort by wake time, history by offset).
Execution ids, workflow names and statuses never contain NUL, which separates
them from what follows.

Listing indexes (``n:``, ``x:``, ``w:``, ``y:``) store the creation time
inverted (``2**64 - 1 - created_at``), so that a forward scan yields the newest
first. Forward, because a forward scan can be stopped at the index's end by
an iterator upper bound; rocksdict (0.3.29) has no working lower bound
(``ReadOptions.set_iterate_lower_bound`` sets the upper one), so a backward
scan that runs out of matches walks on into whatever keyspace precedes it,
deleted keys included.
"""

from __future__ import annotations

import struct

NEXT_OFFSET = b"m:next_offset"  # the partition's next offset to fold (8 bytes BE)
CLAIM = b"m:claim"  # the partition's current claim: {"epoch", "worker", "offset", "fenced"} (JSON)
SKIPPED = b"k:"  # k:<offset u64>  -> an operator's skip of an unreadable record (JSON)

EXECUTION = b"e:"  # e:<id>                     -> execution record (JSON)
STEP = b"s:"  # s:<id>\0<step key>              -> step record with every attempt (JSON)
SLEEP = b"z:"  # z:<id>\0<sleep key>            -> sleep record (JSON)
LOG = b"l:"  # l:<id>\0<seq u32>                -> log entry (JSON)
HISTORY = b"h:"  # h:<id>\0<offset u64>         -> the raw record as it is on the log
TIMER = b"t:"  # t:<wake_at u64><id>\0<sleep>   -> b"" (due timers, ordered by time)
ACTIVE = b"a:"  # a:<id>                        -> b"" while the execution is not finished
CREATED = b"c:"  # c:<created u64><id>          -> b"" (every execution, oldest first)
LISTED = b"n:"  # n:<~created u64><id>          -> b"" (every execution, newest first)
BY_STATUS = b"x:"  # x:<status>\0<~created u64><id>            -> b"" (the fold keeps it exact)
BY_WORKFLOW = b"w:"  # w:<workflow>\0<~created u64><id>        -> b""
BY_WORKFLOW_STATUS = b"y:"  # y:<workflow>\0<status>\0<~created u64><id> -> b""
SCHEDULE = b"S:"  # S:<schedule name>             -> the schedule's record (JSON, engine.schedules)
# Events for waiting executions (``engine.events_in``): the lookback, the waiters, dedup.
EVENT = b"E:"  # E:<type>\0<time u64><offset u64>      -> an event kept for the lookback (JSON)
EVENT_ID = b"D:"  # D:<source>\0<event id>         -> b"" (seen: a repeat is ignored)
WAITER = b"W:"  # W:<type>\0<paths>\0<values>\0<id>\0<wait> -> b"" (who waits for what)
WAIT_SHAPE = b"V:"  # V:<type>\0<paths>              -> count of waiters matching on those paths
RECEIVED = b"R:"  # R:<id>\0<source>\0<event id>  -> b"" (an execution received this event)
EVENT_STATS = b"m:events"  # {"received", "duplicates", "delivered", "dropped_unmatched"} (JSON)
# Retention of the view (``engine.retention``): finished executions by end time, a
# tombstone per execution it removed, and where its removal stands.
ENDED = b"u:"  # u:<ended_at u64><id>          -> b"" (finished executions, oldest end first)
GONE = b"g:"  # g:<id>                         -> b"" (removed by retention; the log has it)
RETENTION = b"m:retention"  # {"next_at": oldest end not removed (None: none), "after": key}
SCANNED = (EVENT, WAITER, WAIT_SHAPE, ENDED)  # keyspaces the fold scans (engine.fold.Tx.scan)
OWED = b"o:"  # o:<id>        -> b"" (cancelled; its children and parent not told yet)
RERUN = b"r:"  # r:<source id>\0<offset u64>   -> the id of a rerun of it, triggered there
INDEXES = b"m:indexes"  # the indexes' version: present once they cover every execution
INDEXES_VERSION = b"2"  # 2: with the index of ended executions (engine.retention)

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
SEP = b"\x00"


def u64(n: int) -> bytes:
    """Fixed-width big-endian, so byte order is numeric order."""
    return _U64.pack(n)


def read_u64(b: bytes) -> int:
    """Inverse of :func:`u64`."""
    return int(_U64.unpack(b)[0])


def execution(eid: str) -> bytes:
    return EXECUTION + eid.encode()


def step(eid: str, key: str) -> bytes:
    return STEP + eid.encode() + SEP + key.encode()


def sleep(eid: str, key: str) -> bytes:
    return SLEEP + eid.encode() + SEP + key.encode()


def log(eid: str, seq: int) -> bytes:
    return LOG + eid.encode() + SEP + _U32.pack(seq)


def history(eid: str, offset: int) -> bytes:
    return HISTORY + eid.encode() + SEP + u64(offset)


def timer(wake_at: int, eid: str, sleep_key: str) -> bytes:
    return TIMER + u64(wake_at) + eid.encode() + SEP + sleep_key.encode()


def parse_timer(key: bytes) -> tuple[int, str, str]:
    """(wake_at, execution id, sleep key) of a timer key."""
    wake_at = read_u64(key[2:10])
    eid, sleep_key = key[10:].split(SEP, 1)
    return wake_at, eid.decode(), sleep_key.decode()


def schedule(name: str) -> bytes:
    return SCHEDULE + name.encode()
def event(event_type: str, timestamp: int, offset: int) -> bytes:
    return EVENT + event_type.encode() + SEP + u64(timestamp) + u64(offset)


def waiter(event_type: str, paths: bytes, values: bytes, eid: str, wait: str) -> bytes:
    return (WAITER + event_type.encode() + SEP + paths + SEP + values + SEP + eid.encode()
            + SEP + wait.encode())


def parse_waiter(key: bytes) -> tuple[str, str]:
    """(execution id, wait key) of a waiter key (the last two NUL-separated parts)."""
    eid, wait = key.rsplit(SEP, 2)[1:]
    return eid.decode(), wait.decode()


def wait_shape(event_type: str, paths: bytes) -> bytes:
    return WAIT_SHAPE + event_type.encode() + SEP + paths


def event_id(source: str, event_id: str) -> bytes:
    return EVENT_ID + source.encode() + SEP + event_id.encode()


def received(eid: str, source: str, event_id: str) -> bytes:
    return RECEIVED + eid.encode() + SEP + source.encode() + SEP + event_id.encode()


def skipped(offset: int) -> bytes:
    return SKIPPED + u64(offset)


def rerun(source: str, offset: int) -> bytes:
    return RERUN + source.encode() + SEP + u64(offset)


def ended(ended_at: int, eid: str) -> bytes:
    return ENDED + u64(ended_at) + eid.encode()


def gone(eid: str) -> bytes:
    return GONE + eid.encode()


def active(eid: str) -> bytes:
    return ACTIVE + eid.encode()


def created(created_at: int, eid: str) -> bytes:
    return CREATED + u64(created_at) + eid.encode()


_NEWEST_FIRST = (1 << 64) - 1


def newest_first(created_at: int) -> bytes:
    """The inverted, fixed-width creation time of the listing indexes: newer sorts first."""
    return u64(_NEWEST_FIRST - created_at)


def listing_prefix(status: str | None = None, workflow: str | None = None) -> bytes:
    """The prefix of the listing index that answers ``status`` and ``workflow`` (each optional)."""
    if workflow is None:
        return LISTED if status is None else BY_STATUS + status.encode() + SEP
    if status is None:
        return BY_WORKFLOW + workflow.encode() + SEP
    return BY_WORKFLOW_STATUS + workflow.encode() + SEP + status.encode() + SEP


def listing(prefix: bytes, created_at: int, eid: str) -> bytes:
    """The key of ``eid`` in the listing index that starts with ``prefix``."""
    return prefix + newest_first(created_at) + eid.encode()


def parse_listing(prefix: bytes, key: bytes) -> tuple[int, str]:
    """(created_at, execution id) of a key of the listing index ``prefix``."""
    at = len(prefix)
    return _NEWEST_FIRST - read_u64(key[at:at + 8]), key[at + 8:].decode()


def listing_keys(workflow: str, status: str | None, created_at: int, eid: str) -> list[bytes]:
    """An execution's keys in the listing indexes: with ``status`` None, the two that never
    change (all, by workflow); else the two that move with its status (by status, by both).
    The fold writes them for every execution: the parts are joined once here, the same
    bytes as :func:`listing` over :func:`listing_prefix`."""
    tail = _U64.pack(_NEWEST_FIRST - created_at) + eid.encode()
    wf = workflow.encode() + SEP
    if status is None:
        return [LISTED + tail, BY_WORKFLOW + wf + tail]
    st = status.encode() + SEP
    return [BY_STATUS + st + tail, BY_WORKFLOW_STATUS + wf + st + tail]


def end_of(prefix: bytes) -> bytes:
    """The first key after every key that starts with ``prefix`` (an iterator upper bound)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        raise ValueError("a prefix of 0xff bytes only has no end")
    return stripped[:-1] + bytes([stripped[-1] + 1])


def prefix_of(space: bytes, eid: str) -> bytes:
    """The prefix of every key of one execution in a per-execution keyspace."""
    return space + eid.encode() + SEP
