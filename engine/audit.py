"""The ``ploy`` commands of audit and recovery.

    ploy export --out DIR [--format avro|jsonl] [--workflow W] [--since T] [--until T]
    ploy import DIR          an export into this app's empty events topic
    ploy view --as-of POINT status ID | list | history ID   (the API's GET /as-of)
    ploy rerun ID [--from-step NAME] | --workflow W --status S --since T [--dry-run]
    ploy replay-check --worker NEW_CODE_DIR   new code against recorded histories (CI)
    ploy erase SUBJECT --reason TEXT   destroy a data subject's key (``engine.erasure``)

``engine.cli.build_parser`` calls :func:`add_commands` with its subparsers.
``export``, ``import`` and ``replay-check`` read and write the topic of the
app's ploy.yaml (``--dir``) directly, as ``ploy rebuild`` does; ``view`` and
``rerun`` and ``erase`` ask a running server's engine API, as ``ploy status`` does. Errors
are ``PloyError`` subclasses, printed by ``engine.cli.main`` as one ``ploy:
error: ...`` line (exit 2).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.asof import as_of, parse_time, to_the_end
from engine.codec import default_codec
from engine.config import Config, load_config
from engine.erasure import KeyStore
from engine.errors import CommandError
from engine.export import FORMATS, export_log, fold_export, import_log
from engine.log import EventLog
from engine.replaycheck import Verdict, follow, replay_check
from engine.view import PartitionView

__all__ = ["add_commands"]


def add_commands(commands: Any) -> None:
    """Add the commands of the module docstring to the ``ploy`` parser's subcommands."""
    _add_export(commands)
    _add_view(commands)
    _add_rerun(commands)
    _add_replay_check(commands)
    _add_erase(commands)


def _add_export(commands: Any) -> None:
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
    p.add_argument("--readable", action="store_true", help="open payloads sealed with a data "
                   "subject's key (needs the key store of ploy.yaml; the export then holds "
                   "personal data that a later 'ploy erase' cannot reach)")
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


def _add_replay_check(commands: Any) -> None:
    p = commands.add_parser(
        "replay-check", help="replay recorded executions on new worker code (appends nothing)",
        description="replay the newest recorded executions (folded from the log into a scratch "
        "view) on the workflow code in --worker, returning recorded step outcomes without "
        "running steps; report executions whose step names or order diverge, with the first "
        "divergent step. Exit status 1 if any diverged or failed (for CI)")
    p.add_argument("--worker", required=True, metavar="NEW_CODE_DIR",
                   help="the app directory (ploy.yaml + code) of the new code")
    p.add_argument("--workflow", metavar="W", help="only this workflow (or binding)")
    p.add_argument("--limit", type=int, default=1000, metavar="N",
                   help="the N newest executions (default: 1000)")
    p.add_argument("--json", action="store_true", help="print every verdict as JSON")
    p.add_argument("--dir", metavar="APP", help="the app whose Kafka holds the histories "
                   "(default: NEW_CODE_DIR's ploy.yaml)")
    p.add_argument("--histories", metavar="EXPORT_DIR", help="read the histories from a "
                   "'ploy export' (all, or --workflow) instead of Kafka: for CI")
    p.add_argument("--outputs", action="store_true", help="also compare each completed "
                   "execution's output with what the new code returns from the recorded steps")
    p.add_argument("--follow", action="store_true", help="a shadow consumer of the live log: "
                   "replay each execution whenever it ends, sleeps or waits, and print each "
                   "divergence as it happens, until Ctrl-C or SIGTERM (exit 1 if any)")
    p.set_defaults(run=_cmd_replay_check)


def _add_rerun(commands: Any) -> None:
    from engine.cli import _add_client

    p = commands.add_parser(
        "rerun", help="rerun ended executions from a step with today's code",
        description="start a new execution that replays the source's steps before --from-step "
        "(default: its first step that did not complete) and runs the rest with the code "
        "deployed now; the source is untouched and both record the lineage. Give an ID, or "
        "select executions with --workflow/--status/--since (try --dry-run first)")
    p.add_argument("id", nargs="?", metavar="ID", help="the execution to rerun")
    p.add_argument("--from-step", metavar="NAME", help="the step to run again (and all after)")
    p.add_argument("--workflow", metavar="W", help="bulk: executions of this workflow")
    p.add_argument("--status", metavar="S", help="bulk: with this status (e.g. failed)")
    p.add_argument("--since", metavar="T", help="bulk: created at or after T (ISO-8601 or "
                   "epoch ms)")
    p.add_argument("--limit", type=int, default=1000, metavar="N", help="bulk: at most N "
                   "(default: 1000)")
    p.add_argument("--dry-run", action="store_true", help="say what would be rerun, do nothing")
    p.add_argument("--reason", help="why (kept on the log with who asked)")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    _add_client(p)
    p.set_defaults(run=_cmd_rerun)


def _add_erase(commands: Any) -> None:
    from engine.cli import _add_client

    p = commands.add_parser(
        "erase", help="destroy a data subject's key: its payloads become unreadable",
        description="destroy the key that seals the payloads of every execution triggered "
        "with --subject SUBJECT, and append a SubjectErased record (who and why) to the log: "
        "from then on no view, history, rebuild, export or archive shows those payloads; "
        "the structure of each history stays")
    p.add_argument("subject", metavar="SUBJECT")
    p.add_argument("--reason", required=True, help="why (kept on the log with who asked)")
    _add_client(p)
    p.set_defaults(run=_cmd_erase)


def _add_view(commands: Any) -> None:
    from engine.cli import _add_client

    view = commands.add_parser(
        "view", help="status, list or history as the log stood at a point (--as-of)",
        description="answer status, list or history for the whole system as it stood at "
        "--as-of: p0:120,p1:88 (each partition through that offset; those not named are "
        "left out), an offset of a one-partition topic, or a time (ISO-8601, UTC unless "
        "zoned); the server folds the log up to there into a scratch view")
    view.add_argument("--as-of", required=True, metavar="POINT")
    queries = view.add_subparsers(dest="view_query", metavar="QUERY", required=True,
                                  parser_class=type(view))
    p = queries.add_parser("status", help="one execution as it stood")
    p.add_argument("id", metavar="ID")
    p = queries.add_parser("history", help="one execution's events up to the point")
    p.add_argument("id", metavar="ID")
    p = queries.add_parser("list", help="executions as they stood, newest first")
    p.add_argument("--workflow", metavar="W")
    p.add_argument("--status", metavar="S")
    p.add_argument("--limit", type=int, default=20, metavar="N")
    for p in queries.choices.values():
        p.add_argument("--json", action="store_true", help="print the API's JSON")
        _add_client(p)
        p.set_defaults(run=_cmd_view)


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
                              until=until, on_progress=_progress_bar("exporting"),
                              keys=KeyStore(config.key_dir) if args.readable else None)
    finally:
        log.close()
    print(f"exported {exported.events} events of {log.topic} to {args.out} "
          f"({exported.format}, {exported.partitions} partitions)")
    return 0


def _cmd_erase(args: argparse.Namespace) -> int:
    from engine.cli import _client, terminal_safe
    from engine.client import quote
    from engine.skips import operator

    payload = _client(args).expect("POST", f"/subjects/{quote(args.subject)}/erase",
                                   {"reason": args.reason, "actor": operator()})
    key = "its key destroyed" if payload["key_destroyed"] else "its key was already gone"
    print(terminal_safe(f"erased subject {args.subject}: {key}; recorded at partition "
                        f"{payload['partition']} offset {payload['offset']}"))
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


def _cmd_view(args: argparse.Namespace) -> int:
    from engine.cli import _client, _json, _print_lines, format_execution, terminal_safe

    query: dict[str, Any] = {"at": args.as_of}
    if args.view_query == "list":
        query.update({k: v for k, v in (("workflow", args.workflow), ("status", args.status),
                                        ("limit", args.limit)) if v is not None})
    else:
        query["id"] = args.id
    client = _client(args)
    payload: dict[str, Any] = client.expect(
        "GET", "/as-of?" + urllib.parse.urlencode(query),
        not_found=f"no execution '{query.get('id')}' as of {args.as_of}")
    if args.json:
        print(_json(payload, indent=2))
        return 0
    at = ",".join(f"p{p}:{last}" for p, last in payload["at"].items() if last >= 0)
    print(terminal_safe(f"as of {at or 'the start'}"))
    if args.view_query == "status":
        _print_lines(format_execution(payload["execution"]))
    elif args.view_query == "history":
        _print_lines(_history_lines(payload["history"]))
    elif payload["executions"]:
        _print_lines(_list_lines(payload["executions"]))
    else:
        print("no executions")
    return 0


def _cmd_rerun(args: argparse.Namespace) -> int:
    from engine.cli import _client, _json, _print_lines
    from engine.client import quote

    bulk = args.workflow is not None or args.status is not None or args.since is not None
    if (args.id is None) == (not bulk):
        raise CommandError("ploy rerun takes an execution ID or a selection "
                           "(--workflow, --status, --since), not both")
    client = _client(args)
    from engine.skips import operator

    body: dict[str, Any] = {"from_step": args.from_step, "dry_run": args.dry_run,
                            "reason": args.reason, "actor": operator()}
    if bulk:
        body.update(workflow=args.workflow, status=args.status, since=args.since,
                    limit=args.limit)
        payload = client.expect("POST", "/rerun", body)
        reruns, failed = payload["reruns"], payload["failed"]
    else:
        reruns = [client.expect("POST", f"/executions/{quote(args.id)}/rerun", body,
                                not_found=f"no execution '{args.id}' at {client.url}")]
        payload, failed = {"dry_run": args.dry_run, "reruns": reruns, "failed": []}, []
    if args.json:
        print(_json(payload, indent=2))
    else:
        _print_lines(_rerun_lines(reruns, failed, args.dry_run))
    return 1 if failed else 0


def _rerun_lines(reruns: list[dict[str, Any]], failed: list[dict[str, Any]],
                 dry_run: bool) -> Iterator[str]:
    for made in reruns:
        step = made["from_step"] or "(after its last step)"
        if dry_run:
            yield (f"would rerun {made['source']} from {step}, replaying {made['copied']} "
                   "events")
        else:
            yield (f"rerun {made['execution_id']} of {made['source']} from {step} "
                   f"(replays {made['copied']} events)")
    for failure in failed:
        yield f"skipped {failure['source']}: {failure['error']}"
    if len(reruns) + len(failed) != 1:
        yield f"{'would rerun' if dry_run else 'reran'} {len(reruns)} executions"


def _cmd_replay_check(args: argparse.Namespace) -> int:
    from engine.app import load_app
    from engine.cli import _json, _print_lines

    worker, new_config = load_app(_app_dir(args.worker))
    config = _config(args.dir) if args.dir else new_config
    workflow = _workflow_name(config, args.workflow)
    if args.follow:
        return _follow(config, worker, workflow, args.outputs)
    with _histories(config, args.histories) as views:
        verdicts = asyncio.run(replay_check(views, worker, workflow=workflow,
                                            limit=args.limit, keys=KeyStore(config.key_dir),
                                            outputs=args.outputs))
    bad = [v for v in verdicts if v.outcome not in ("ok", "erased")]
    erased = sum(v.outcome == "erased" for v in verdicts)
    if args.json:
        print(_json([v.to_json() for v in verdicts], indent=2))
    else:
        if bad:
            _print_lines(_verdict_line(v) for v in bad)
        print(f"replayed {len(verdicts)} executions: {len(verdicts) - len(bad) - erased} ok, "
              f"{sum(v.outcome == 'diverged' for v in bad)} diverged, "
              f"{sum(v.outcome == 'failed' for v in bad)} failed"
              + (f", {erased} erased (not replayed)" if erased else ""))
    return 1 if bad else 0


@contextlib.contextmanager
def _histories(config: Config, export_dir: str | None) -> Iterator[list[PartitionView]]:
    """Views of every recorded execution: a scratch fold of an export, or of the log."""
    if export_dir is not None:
        with tempfile.TemporaryDirectory(prefix="ploy-replay-") as scratch:
            views = fold_export(Path(export_dir), Path(scratch), default_codec())
            try:
                yield views
            finally:
                for view in views:
                    view.close()
        return
    log = _kafka_log(config, "replay-check")
    try:
        with as_of(log, to_the_end(log)) as folded:
            yield list(folded.views.values())
    finally:
        log.close()


def _follow(config: Config, worker: Any, workflow: str | None, outputs: bool) -> int:
    """``replay-check --follow``: report divergences of the live log until a signal."""
    import signal
    import threading

    from engine.cli import terminal_safe

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def report(verdict: Verdict) -> None:
        print(terminal_safe(_verdict_line(verdict)), flush=True)

    log = _kafka_log(config, "replay-check")
    print(f"following {log.topic}: every divergence is printed as it happens (Ctrl-C stops)",
          flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="ploy-replay-follow-") as scratch:
            bad = asyncio.run(follow(log, worker, Path(scratch), report, stop.is_set,
                                     workflow=workflow, keys=KeyStore(config.key_dir),
                                     outputs=outputs))
    finally:
        log.close()
    print(f"stopped: {bad} diverged or failed", flush=True)
    return 1 if bad else 0


def _verdict_line(v: Verdict) -> str:
    where = f"{v.execution_id} ({v.workflow}, {v.status})"
    if v.outcome == "failed":
        return f"FAILED   {where}: {v.error}"
    if v.position is None and v.error:  # --outputs
        return f"DIVERGED {where}: {v.error}"
    recorded = f"'{v.recorded}'" if v.recorded else "the end"
    asked = f"'{v.asked}'" if v.asked else "the end"
    return f"DIVERGED {where} at step {v.position + 1 if v.position is not None else '?'}: " \
           f"recorded {recorded}, new code {asked}"


def _app_dir(value: str) -> Path:
    directory = Path(value)
    if not (directory / "ploy.yaml").is_file():
        raise CommandError(f"no ploy.yaml in {directory.resolve()}")
    return directory


def _history_lines(events: list[dict[str, Any]]) -> Iterator[str]:
    """As ``ploy history`` prints them."""
    from engine.cli import _decoded, _iso, _json

    for event in events:
        yield (f"p{event['partition']}@{event['offset']}  {_iso(event['timestamp'])}  "
               f"{event['type']:<18} {_json(_decoded(event.get('body') or {}))}")


def _list_lines(executions: list[dict[str, Any]]) -> Iterator[str]:
    """As ``ploy list`` prints them."""
    from engine.cli import _duration, _iso, _table

    rows = [[e["execution_id"], e["workflow"], e["status"], _iso(e.get("created_at")),
             _duration(e.get("duration_ms"))] for e in executions]
    return _table(["EXECUTION", "WORKFLOW", "STATUS", "CREATED", "DURATION"], rows)
