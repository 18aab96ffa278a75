"""The PloyError tree: structured arguments in, a message that says what happened out."""

from __future__ import annotations

from pathlib import Path

import pytest

import engine.errors
from engine.errors import CommandError, PloyError, RebuildError, StateLockedError


def test_every_error_is_drawn_in_the_tree() -> None:
    tree = engine.errors.__doc__ or ""
    errors = [name for name, value in vars(engine.errors).items()
              if isinstance(value, type) and issubclass(value, PloyError)
              and value is not PloyError]
    assert errors and all(f"── {name}" in tree for name in errors), tree


def test_rebuild_errors_keep_their_inputs() -> None:
    locked = StateLockedError(Path("/s/ploy.events/p0"), "IO error: lock held")
    assert (locked.path, locked.cause) == (Path("/s/ploy.events/p0"), "IO error: lock held")
    assert str(locked) == ("the view at /s/ploy.events/p0 is in use by a running worker "
                           "(RocksDB lock held); stop it first")
    gone = RebuildError("ploy.events", 3, 120)
    assert (gone.topic, gone.partition, gone.low_watermark) == ("ploy.events", 3, 120)
    assert str(gone) == ("cannot rebuild topic 'ploy.events' partition 3: the log starts at "
                         "offset 120, not 0 (records were deleted by retention)")


def test_a_command_error_is_a_ploy_error() -> None:
    with pytest.raises(PloyError, match="no ploy.yaml in /x"):
        raise CommandError("no ploy.yaml in /x")
