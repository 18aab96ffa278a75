"""Where connectors keep their progress: small JSON files in the state directory.

A connector's position in a topic is written only after what it did with the
records before that position is acknowledged (a trigger appended, a record
produced, a webhook answered), so a crash repeats work and never skips it.
Each file is replaced atomically (write a temporary file, fsync, rename), so
a crash mid-write leaves the previous version, never half of one.

Layout, under ``<state_dir>/<prefix>.connectors/``:

    source-<topic>.json      a source's topic id and next offset per partition
    topic-<topic>.json       a single worker's copy of a topic sink's positions
    webhook-<hash>.json      a single worker's copy of a webhook sink's positions

Sinks keep their positions in Kafka (:mod:`connectors.positions`); the two
copies exist for ``ploy dev``, whose in-memory broker forgets committed
offsets when it stops.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from engine.config import Config


def connectors_dir(config: Config) -> Path:
    """``<state_dir>/<prefix>.connectors``: every connector's state file."""
    return Path(config.state_dir) / f"{config.kafka.topic_prefix}.connectors"


class StateFile:
    """One JSON document, read once at start and replaced atomically on save."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict[str, Any]:
        """The saved document, or ``{}`` when there is none yet."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        return data if isinstance(data, dict) else {}

    def save(self, data: dict[str, Any]) -> None:
        """Replace the file with ``data``: fsynced before the rename, so never torn."""
        write_atomically(self.path, json.dumps(data, sort_keys=True).encode())


def write_atomically(path: Path, content: bytes) -> None:
    """Write ``content`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def int_keys(mapping: object) -> dict[int, int]:
    """A JSON object of ``{"<partition>": offset}`` as ints (JSON keys are strings)."""
    if not isinstance(mapping, dict):
        return {}
    return {int(k): int(v) for k, v in mapping.items()}


def str_keys(mapping: dict[int, int]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(mapping.items())}


def position_file_names(directory: Path) -> list[str]:
    """The state files that hold a position in ``<prefix>.events`` (topic and webhook sinks)."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.glob("*.json")
                  if p.name.startswith(("topic-", "webhook-")))
