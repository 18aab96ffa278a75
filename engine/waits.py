"""Waiting for events, in the fold: ``WaitStarted`` and ``EventSent`` -> writes. Pure.

An execution waits (``ctx.step.wait_for_event``, ``ctx.step.invoke``) for an
event of a type whose data matches an object of dotted paths -> values. The
match is resolved against the log, so there is no race between an event and
the wait that it answers:

1. ``EventSent`` is kept for the lookback (``E:`` keys, by type and time) for
   ``RETENTION_MS``, under its source and id (``D:``, as CloudEvents identifies an
   event): a (source, id) seen before changes nothing.
   It is delivered at once to every waiter of its partition that matches it
   (``W:`` keys, by type, match paths and values: one point lookup per shape of
   match, not a scan of every waiter), or, with a ``target``, to that
   execution only. A broadcast event is appended to every partition, so each
   partition's fold sees it where its waiters are.
2. ``WaitStarted`` first looks back: the earliest kept event of its type at or
   after ``since`` that matches, is for everyone or for this execution, and
   that this execution has not received yet (``R:``). Else it registers a waiter.
3. Delivery records the event on the wait and in the execution's history at
   the event's own offset, once; the execution runs again. A timer
   (``TimerFired`` with the wait's key) ends a wait with no event.

Counts per partition (``m:events``): received, duplicates, delivered, and
dropped_unmatched (kept for the whole retention and never delivered).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from orjson import OPT_SORT_KEYS, dumps, loads

from engine import keys
from engine.events import Event, EventSent, WaitStarted
from engine.models import ExecutionStatus

if TYPE_CHECKING:
    from engine.fold import Record, Tx

RETENTION_MS = 7 * 24 * 3600 * 1000  # how long an event is kept for a later wait's lookback
WAITING = ExecutionStatus.WAITING.value
RECEIVED = "received"
TIMED_OUT = "timed_out"
WAIT_KINDS = ("wait", "invoke")
_MISSING: Any = object()
_LEN = struct.Struct(">I")


def canonical(value: Any) -> bytes:
    """A JSON value as the bytes matches compare: compact, keys sorted."""
    return dumps(value, option=OPT_SORT_KEYS)


def lookup(data: Any, path: str) -> Any:
    """The value at a dotted ``path`` in ``data`` (``_MISSING`` if there is none)."""
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return _MISSING
        data = data[part]
    return data


def matches(match: dict[str, Any], data: Any) -> bool:
    """Every path of ``match`` is in ``data`` with an equal JSON value."""
    for path, want in match.items():
        found = lookup(data, path)
        if found is _MISSING or canonical(found) != canonical(want):
            return False
    return True


def shape(match: dict[str, Any]) -> bytes:
    """The sorted paths of a match: waiters with one shape are found by one lookup."""
    return canonical(sorted(match))


def values_of(paths: list[str], data: Any) -> bytes | None:
    """The values at ``paths`` in ``data`` as a waiter key holds them (None: one is missing)."""
    found = [lookup(data, p) for p in paths]
    if any(v is _MISSING for v in found):
        return None
    return canonical(found)


def _stats(tx: Tx) -> Record:
    return tx.get(keys.EVENT_STATS) or {"received": 0, "duplicates": 0, "delivered": 0,
                                         "dropped_unmatched": 0}


# -- rows of kept events: JSON (for matching) then the raw record (for histories) ------------

def _row(fields: Record, raw: bytes) -> bytes:
    text = dumps(fields)
    return _LEN.pack(len(text)) + text + raw


def _unrow(value: bytes) -> tuple[Record, bytes]:
    n = _LEN.unpack_from(value)[0]
    return loads(value[4:4 + n]), value[4 + n:]


# -- the fold's two entry points ----------------------------------------------------------------

def wait_started(tx: Tx, ex: Record, event: Event) -> None:
    """Rule 2 (an execution's event: fenced like any runtime event)."""
    body = event.body
    assert isinstance(body, WaitStarted)
    eid = ex["id"]
    key = keys.sleep(eid, body.wait)
    if tx.get(key, tx.is_new(eid)) is not None:
        return  # appended twice (a replay after a lost ack): the first one holds
    wait = {
        "key": body.wait,
        "kind": "invoke" if body.child_id else "wait",
        "seq": ex["seq"],
        "status": WAITING,
        "event_type": body.event_type,
        "match": loads(body.match),
        "since": body.since,
        "wake_at": body.timeout_at,
        "child_id": body.child_id,
        "cancel_child": body.cancel_child,
        "started_at": event.timestamp,
        "ended_at": None,
        "event": None,
    }
    ex["seq"] += 1
    if ExecutionStatus(ex["status"]).terminal:
        wait.update(status=ex["status"], ended_at=event.timestamp)
        tx.put(key, wait)
        return
    found = _look_back(tx, eid, wait)
    if found is not None:
        row_key, fields, raw = found
        _deliver(tx, ex, wait, fields, raw, event.timestamp)
        tx.put_raw(row_key, _row(fields, raw))  # now marked matched
        stats = _stats(tx)
        stats["delivered"] += 1
        tx.put(keys.EVENT_STATS, stats)
        return
    tx.put(key, wait)
    ex["status"] = WAITING
    ex["waits"] = [*open_waits(ex), body.wait]
    _register(tx, eid, wait)
    if body.timeout_at is not None:
        tx.put_raw(keys.timer(body.timeout_at, eid, body.wait), b"")


def open_waits(ex: Record) -> list[str]:
    """Keys of the waits of ``ex`` still waiting (several: parallel invokes)."""
    return list(ex.get("waits") or ())


def event_sent(tx: Tx, event: Event, offset: int, raw: bytes) -> None:
    """Rule 1 (a client event: never fenced)."""
    body = event.body
    assert isinstance(body, EventSent)
    stats = _stats(tx)
    tx.put(keys.EVENT_STATS, stats)
    id_key = keys.event_id(body.source, body.id)
    if tx.raw(id_key) is not None:
        stats["duplicates"] += 1
        return
    stats["received"] += 1
    _prune(tx, body.type, event.timestamp, stats)
    fields = {"id": body.id, "type": body.type, "source": body.source, "time": body.time,
              "data": body.data, "target": body.target, "timestamp": event.timestamp,
              "offset": offset, "matched": False}
    data = loads(body.data)
    for eid, wait_key in _waiters(tx, body, data):
        ex = tx.get(keys.execution(eid))
        wait = tx.get(keys.sleep(eid, wait_key))
        if ex is None or wait is None or not _may_receive(tx, eid, wait, fields, data):
            continue
        _deliver(tx, ex, wait, fields, raw, event.timestamp)
        stats["delivered"] += 1
        tx.put(keys.execution(eid), ex)
    tx.put_raw(id_key, b"")
    tx.put_raw(keys.event(body.type, event.timestamp, offset), _row(fields, raw))


def _waiters(tx: Tx, body: EventSent, data: Any) -> list[tuple[str, str]]:
    """(execution id, wait key) of every waiter this event may be for."""
    if body.target is not None:
        ex = tx.get(keys.execution(body.target))
        return [] if ex is None else [(body.target, w) for w in open_waits(ex)]
    found: list[tuple[str, str]] = []
    type_prefix = keys.WAIT_SHAPE + body.type.encode() + keys.SEP
    for shape_key, _ in tx.scan(type_prefix):
        paths = shape_key[len(type_prefix):]
        values = values_of(loads(paths), data)
        if values is None:
            continue
        prefix = (keys.WAITER + body.type.encode() + keys.SEP + paths + keys.SEP + values
                  + keys.SEP)
        found += [keys.parse_waiter(k) for k, _ in tx.scan(prefix)]
    return found


def _may_receive(tx: Tx, eid: str, wait: Record, fields: Record, data: Any) -> bool:
    return (wait["status"] == WAITING and wait.get("kind") in WAIT_KINDS
            and wait["event_type"] == fields["type"]
            and fields["target"] in (None, eid)
            and fields["timestamp"] >= wait["since"]
            and matches(wait["match"], data)
            and tx.raw(keys.received(eid, fields["source"], fields["id"])) is None)


def _look_back(tx: Tx, eid: str, wait: Record) -> tuple[bytes, Record, bytes] | None:
    """The earliest kept event this new wait receives, if any."""
    prefix = keys.EVENT + wait["event_type"].encode() + keys.SEP
    # (a since before 1970, from another writer: every kept event is after it)
    for row_key, value in tx.scan(prefix, prefix + keys.u64(max(wait["since"], 0))):
        fields, raw = _unrow(value)
        if _may_receive(tx, eid, wait, fields, loads(fields["data"])):
            return row_key, fields, raw
    return None


def _deliver(tx: Tx, ex: Record, wait: Record, fields: Record, raw: bytes, ts: int) -> None:
    """Rule 3: ``wait`` of ``ex`` receives the event; the execution runs again."""
    eid = ex["id"]
    tx.touch(eid, ex["status"])
    fields["matched"] = True
    _end(tx, ex, wait, ts, status=RECEIVED, event={
        k: fields[k] for k in ("id", "type", "source", "time", "data", "offset")})
    tx.put_raw(keys.received(eid, fields["source"], fields["id"]), b"")
    tx.put_raw(keys.history(eid, fields["offset"]), raw)
    ex["events"] += 1
    ex["updated_at"] = ts


def timed_out(tx: Tx, ex: Record, wait: Record, ts: int) -> None:
    """The wait's timer fired first: it ends with no event."""
    _end(tx, ex, wait, ts, status=TIMED_OUT)


def _end(tx: Tx, ex: Record, wait: Record, ts: int, **changes: Any) -> None:
    """A wait ends: its waiter is forgotten, and the execution runs again (by replay),
    ``waiting`` still while other waits of it are open."""
    eid = ex["id"]
    waits = open_waits(ex)
    if wait["key"] in waits:
        unregister(tx, eid, wait)
        waits.remove(wait["key"])
        ex["waits"] = waits
    wait.update(ended_at=ts, **changes)
    tx.put(keys.sleep(eid, wait["key"]), wait)
    if ex["status"] == WAITING and not waits:
        ex["status"] = ExecutionStatus.RUNNING.value
    tx.woken.append(eid)


def end_all(tx: Tx, ex: Record, status: str, ts: int) -> None:
    """The execution ended (a cancel): its open waits end with it."""
    for key in open_waits(ex):
        wait = tx.get(keys.sleep(ex["id"], key))
        if wait is not None:
            unregister(tx, ex["id"], wait)
            wait.update(status=status, ended_at=ts)
            tx.put(keys.sleep(ex["id"], key), wait)
    ex["waits"] = []


def unregister(tx: Tx, eid: str, wait: Record) -> None:
    """Forget a waiter (it received, timed out, or its execution ended)."""
    waiter_key, shape_key = _waiter_keys(eid, wait)
    tx.delete(waiter_key)
    count = _count(tx, shape_key) - 1
    if count > 0:
        tx.put_raw(shape_key, keys.u64(count))
    else:
        tx.delete(shape_key)
    if wait.get("wake_at") is not None:
        tx.delete(keys.timer(wait["wake_at"], eid, wait["key"]))


def _register(tx: Tx, eid: str, wait: Record) -> None:
    waiter_key, shape_key = _waiter_keys(eid, wait)
    tx.put_raw(waiter_key, b"")
    tx.put_raw(shape_key, keys.u64(_count(tx, shape_key) + 1))


def _waiter_keys(eid: str, wait: Record) -> tuple[bytes, bytes]:
    """The keys a registered wait holds: its waiter key and its match shape's count."""
    paths = shape(wait["match"])
    values = canonical([wait["match"][p] for p in sorted(wait["match"])])
    return (keys.waiter(wait["event_type"], paths, values, eid, wait["key"]),
            keys.wait_shape(wait["event_type"], paths))


def _count(tx: Tx, key: bytes) -> int:
    raw = tx.raw(key)
    return 0 if raw is None else keys.read_u64(raw)


def _prune(tx: Tx, event_type: str, now: int, stats: Record) -> None:
    """Drop the kept events of ``event_type`` older than the retention (oldest first)."""
    prefix = keys.EVENT + event_type.encode() + keys.SEP
    cutoff = now - RETENTION_MS
    if cutoff <= 0:
        return
    for row_key, value in tx.scan(prefix, None, prefix + keys.u64(cutoff)):
        fields, _ = _unrow(value)
        if not fields["matched"]:
            stats["dropped_unmatched"] += 1
        tx.delete(row_key)
        tx.delete(keys.event_id(fields["source"], fields["id"]))
