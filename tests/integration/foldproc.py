"""A child process that folds a topic into views, slowly, so a test can SIGKILL it.

Usage: python foldproc.py SERVERS PREFIX STATE_DIR PROGRESS_FILE BATCH
Writes the total folded offset count to PROGRESS_FILE after every batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

from engine.log import EventLog
from engine.view import PartitionView


def fold_all(servers: str, prefix: str, state: Path, batch: int = 5000,
             progress: Path | None = None) -> dict[int, PartitionView]:
    log = EventLog(servers, prefix)
    views = {p: PartitionView(state / f"p{p}", log.topic, p) for p in range(log.partitions)}
    start = {p: v.next_offset for p, v in views.items()}
    for by_partition in log.read_until_end(start, batch=batch):
        for p, records in by_partition.items():
            _, failure = views[p].apply(records)
            assert failure is None, failure
        if progress is not None:
            tmp = progress.with_suffix(".tmp")
            tmp.write_text(str(sum(v.next_offset for v in views.values())))
            tmp.replace(progress)  # the parent never reads a half-written number
    log.close()
    return views


if __name__ == "__main__":
    servers, prefix, state, progress, batch = sys.argv[1:6]
    for view in fold_all(servers, prefix, Path(state), int(batch), Path(progress)).values():
        view.close()
