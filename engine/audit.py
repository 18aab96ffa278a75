"""The ``ploy`` commands of audit and recovery.

    ploy export --out DIR [--format avro|jsonl] [--workflow W] [--since T] [--until T]
    ploy import DIR          an export into this app's empty events topic
    ploy view --as-of POINT status ID | list | history ID

``engine.cli.build_parser`` calls :func:`add_commands` with its subparsers.
Export and import read and write the topic of the app's ploy.yaml (``--dir``)
directly, as ``ploy rebuild`` does; ``view`` asks a running server's engine
API, as ``ploy status`` does. Errors are ``PloyError`` subclasses, printed by
``engine.cli.main`` as one ``ploy: error: ...`` line (exit 2).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from engine.asof import parse_time
from engine.config import Config, load_config
from engine.errors import CommandError
from engine.export import FORMATS, export_log, import_log
from engine.log import EventLog

__all__ = ["add_commands"]


def add_commands(commands: Any) -> None:
    """Add ``export``, ``import`` and ``view`` to the ``ploy`` parser's subcommands."""
    p = commands.add_parser(
        "export", help="write the events of the log to files (Avro or JSON lines)",
        description="write every selected event of <prefix>.events, with its partition and "
        "offset, to one file per partition in --out, plus manifest.json; Avro files are "
        "object container files Spark, DuckDB or fastavro read as they are")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write (a new or "
                   "empty directory)")
    p.add_argument("--format", default="avro", choices=FORMATS, help="default: avro")
    p.add_argument("--workflow", metavar="W", help="only this workflow (or binding)")
    p.add_argument("--since", metavar="T", help="only events at or after T (ISO-8601 or "
                   "epoch ms)")
    p.add_argument("--until", metavar="T", help="only events before T")
    p.add_argument("--dir", metavar="APP", help="the app's directory, holding ploy.yaml "
                   "(default: the current one)")
    p.set_defaults(run=_cmd_export)

    p = commands.add_parser(
        "import", help="append an export into this app's empty events topic",
        description="append the export in DIR into <prefix>.events, which must be empty and "
        "have as many partitions, each event on its partition in order; then start a "
        "worker or run 'ploy rebuild'")
    p.add_argument("export_dir", metavar="DIR", help="a directory written by ploy export")
    p.add_argument("--dir", metavar="APP", help="the app's directory, holding ploy.yaml "
                   "(default: the current one)")
    p.set_defaults(run=_cmd_import)


def _kafka_log(config: Config, command: str) -> EventLog:
    """The app's event log on its configured Kafka (not the embedded broker of ploy dev)."""
    kafka = config.kafka
    if not kafka.bootstrap_servers:
        raise CommandError(f"ploy {command} needs Kafka: set kafka.bootstrap_servers in "
                           "ploy.yaml or KAFKA_BOOTSTRAP_SERVERS")
    logging.getLogger("ploy.kafka").setLevel(logging.CRITICAL)  # librdkafka's retries: noise
    return EventLog(kafka.bootstrap_servers, kafka.topic_prefix, kafka.partitions,
                    extra=kafka.config, connect_timeout_s=kafka.connect_timeout_s,
                    replication_factor=kafka.replication_factor)


def _config(app: str | None) -> Config:
    directory = Path(app or ".")
    if app is not None and not (directory / "ploy.yaml").is_file():
        raise CommandError(f"no ploy.yaml in {directory.resolve()}")
    return load_config(directory)


def _workflow_name(config: Config, name: str | None) -> str | None:
    """A binding name of ploy.yaml stands for its workflow."""
    if name is None or name not in config.workflow:
        return name
    return config.workflow[name].name


def _cmd_export(args: argparse.Namespace) -> int:
    from engine.cli import _progress_bar

    config = _config(args.dir)
    since = None if args.since is None else parse_time(args.since)
    until = None if args.until is None else parse_time(args.until)
    log = _kafka_log(config, "export")
    try:
        exported = export_log(log, Path(args.out), args.format,
                              workflow=_workflow_name(config, args.workflow), since=since,
                              until=until, on_progress=_progress_bar("exporting"))
    finally:
        log.close()
    print(f"exported {exported.events} events of {log.topic} to {args.out} "
          f"({exported.format}, {exported.partitions} partitions)")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from engine.cli import _progress_bar

    config = _config(args.dir)
    log = _kafka_log(config, "import")
    try:
        imported = import_log(log, Path(args.export_dir), on_progress=_progress_bar("importing"))
    finally:
        log.close()
    print(f"imported {imported.events} events into {log.topic} "
          f"({imported.partitions} partitions); start a worker or run 'ploy rebuild'")
    return 0
