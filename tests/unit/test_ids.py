"""Event and execution ids: random, unique, and never a parent's in a forked child."""

from __future__ import annotations

import os
import re

from engine.events import new_event_id, new_execution_id


def test_ids_are_32_hex_digits_and_unique() -> None:
    ids = [new_event_id() for _ in range(5000)] + [new_execution_id() for _ in range(5000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_child_draws_ids_of_its_own() -> None:
    new_event_id()  # the parent has bytes drawn ahead
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.write(write, (new_event_id() + new_execution_id()).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    parent = new_event_id() + new_execution_id()
    assert len(child) == 64 and child != parent
    assert child[:32] != parent[:32] and child[32:] != parent[32:]
