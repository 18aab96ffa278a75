"""Every RocksDB key of the view, in one place.

Each partition has its own RocksDB directory (``<state_dir>/<prefix>/p<N>``)
so a partition's state moves with the partition. Inside it, keys are a
one-letter keyspace and fixed parts; integers are fixed-width big-endian so
that byte order is numeric order (timers sort by wake time, history by offset).
Execution ids never contain NUL, which separates an id from what follows.
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
CREATED = b"c:"  # c:<created u64><id>          -> b"" (listing, newest first)

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


def skipped(offset: int) -> bytes:
    return SKIPPED + u64(offset)


def active(eid: str) -> bytes:
    return ACTIVE + eid.encode()


def created(created_at: int, eid: str) -> bytes:
    return CREATED + u64(created_at) + eid.encode()


def prefix_of(space: bytes, eid: str) -> bytes:
    """The prefix of every key of one execution in a per-execution keyspace."""
    return space + eid.encode() + SEP
