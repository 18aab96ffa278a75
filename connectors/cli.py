"""``ploy archive restore DIR [--dir APP]``: the connectors' commands of the ``ploy`` CLI.

``engine.cli.build_parser`` calls :func:`add_commands` with its subparsers;
each command sets ``run``, which ``engine.cli.main`` calls with the parsed
arguments. Errors are ``PloyError`` subclasses, which ``main`` prints as one
``ploy: error: ...`` line (exit 2).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from connectors.archive import archive_files, restore
from connectors.errors import ArchiveError
from engine.config import load_config
from engine.errors import ConfigError
from engine.log import EventLog


def add_commands(subparsers: Any) -> None:
    """Add ``ploy archive restore`` to the ``ploy`` parser's subcommands."""
    archive = subparsers.add_parser(
        "archive", help="work with archives of the log (Avro container files)",
        description="work with archives of the log written by a 'kind: archive' sink")
    actions = archive.add_subparsers(dest="archive_command", metavar="ACTION", required=True,
                                     parser_class=type(archive))
    p = actions.add_parser(
        "restore", help="append an archive into the app's (empty) events topic",
        description="append the archive in DIR into <prefix>.events, which must be empty, "
        "keeping each event's partition and order; then start the worker (or 'ploy rebuild') "
        "to fold the view from it")
    p.add_argument("archive_dir", metavar="DIR", help="the archive directory (p<N>-*.avro)")
    p.add_argument("--dir", metavar="APP",
                   help="the app's directory, holding ploy.yaml (default: the current one)")
    p.set_defaults(run=run_restore)


def run_restore(args: argparse.Namespace) -> int:
    """``ploy archive restore``: 0 when restored; errors raise ``PloyError``."""
    directory = Path(args.archive_dir)
    if not directory.is_dir():
        raise ArchiveError(str(directory), "is not a directory")
    if not archive_files(directory):
        raise ArchiveError(str(directory), "holds no archive files (p<N>-<first>-<last>.avro)")
    config = load_config(Path(args.dir or "."))
    kafka = config.kafka
    if not kafka.bootstrap_servers:
        raise ConfigError(str(config.path or "ploy.yaml"), "kafka.bootstrap_servers",
                          "is not set: restore needs the Kafka to restore into "
                          "(ploy dev restores its own archive when it starts)")
    logging.getLogger("ploy.kafka").setLevel(logging.CRITICAL)  # librdkafka's retries: noise
    log = EventLog(kafka.bootstrap_servers, kafka.topic_prefix, kafka.partitions,
                   extra=kafka.config, connect_timeout_s=kafka.connect_timeout_s,
                   replication_factor=kafka.replication_factor)
    try:
        restored = restore(log, directory)
    finally:
        log.close()
    partitions = len(restored.counts)
    print(f"restored {restored.events} events into {log.topic} ({partitions} partitions)")
    return 0
