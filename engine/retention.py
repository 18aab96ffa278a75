"""Retention of the view: finished executions leave it, the log keeps them.

With ``retention`` set (``ploy.yaml``: ``retention: 30d``; off by default) the
fold removes an execution from the view once it ended more than the retention
before the event being folded. The decision uses event timestamps only, never
a clock, so the view stays a function of the log (and of the retention):
a rebuild with the same retention is byte-identical. Rules:

1. Every execution that finishes gets a key in the index of ended executions,
   ordered by end time (``keys.ENDED``), whatever the retention.
2. When folding any event with the retention set, the executions whose end is
   before ``event.timestamp - retention`` are removed, oldest first, at most
   :data:`PER_EVENT` per event (a backlog drains over the following events).
3. Removing one deletes all its keys (its record, steps, sleeps, logs, history,
   listing keys) and leaves a tombstone (``keys.GONE``): the fold ignores any
   later event of that id (a late step, a cancel, a second trigger of its
   idempotency key) instead of taking it for a log that is not ours.
4. A record ``keys.RETENTION`` keeps the oldest end not yet removed, so an
   event with nothing due costs one cached read and no scan, and the last key
   removed, so a scan starts after it and never walks deleted keys. An end
   older than that key (writers' clocks apart by more than the retention) is
   indexed just after it, to be removed next.

Running, sleeping and waiting executions are never removed: only finished ones
are indexed. ``history`` of a removed execution reads its partition of the
log (``engine.queries``); as-of and export read the log anyway.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine import keys

if TYPE_CHECKING:
    from engine.fold import Record, Tx

PER_EVENT = 8  # removals per folded event, at most


def _state(tx: Tx) -> Record:
    return tx.get(keys.RETENTION) or {"next_at": None, "after": ""}


def ended(tx: Tx, eid: str, ended_at: int) -> None:
    """Rule 1 (and rule 4's floor): index a finished execution by its end time."""
    state = _state(tx)
    after = bytes.fromhex(state["after"])
    key = keys.ended(ended_at, eid)
    if after and key <= after:
        key = keys.ended(keys.read_u64(after[2:10]) + 1, eid)
    tx.put_raw(key, b"")
    at = keys.read_u64(key[2:10])
    if state["next_at"] is None or at < state["next_at"]:
        tx.put(keys.RETENTION, {**state, "next_at": at})


def expire(tx: Tx, timestamp: int) -> None:
    """Rule 2: remove the executions that ended more than the retention before
    ``timestamp``, oldest first, at most PER_EVENT of them."""
    if tx.retention_ms is None:
        return
    state = _state(tx)
    cutoff = timestamp - tx.retention_ms
    if state["next_at"] is None or state["next_at"] >= cutoff:
        return  # nothing due: no scan
    after = bytes.fromhex(state["after"])
    # One scan: the due ones, and the first key after them (the oldest end left).
    found = tx.first(keys.ENDED, after, keys.end_of(keys.ENDED), PER_EVENT + 1)
    limit = keys.ENDED + keys.u64(cutoff)
    due = [key for key in found[:PER_EVENT] if key < limit]
    for key in due:
        remove(tx, key[10:].decode())
        tx.delete(key)
        after = key
    rest = found[len(due):]
    tx.put(keys.RETENTION, {"next_at": keys.read_u64(rest[0][2:10]) if rest else None,
                            "after": after.hex()})


def remove(tx: Tx, eid: str) -> None:
    """Rule 3: delete every key of ``eid`` and leave its tombstone."""
    ex = tx.get(keys.execution(eid))
    if ex is None:
        return
    workflow, created = ex["workflow"], ex["created_at"]
    for status in {None, ex["status"], tx.status_before(eid)}:
        for key in keys.listing_keys(workflow, status, created, eid):
            tx.delete(key)
    tx.delete(keys.created(created, eid))
    tx.delete(keys.execution(eid))
    for space in (keys.STEP, keys.SLEEP, keys.LOG, keys.HISTORY, keys.RECEIVED):
        prefix = keys.prefix_of(space, eid)
        tx.delete_range(prefix, keys.end_of(prefix))
    tx.put_raw(keys.gone(eid), b"")


def is_gone(tx: Tx, eid: str) -> bool:
    """Whether retention removed ``eid`` (rule 3: its events are ignored). Read only
    once something was removed: a view that never removed one pays nothing."""
    return bool(_state(tx)["after"]) and tx.raw(keys.gone(eid)) is not None
