"""The ``ploy`` command.

    ploy dev [DIR]           engine + HTTP; an embedded broker unless Kafka is configured
    ploy worker [DIR]        engine on the configured Kafka, in the group, serving its API
    ploy serve [DIR]         routes, dashboard and API only: queries go to the owners
    ploy trigger BINDING     start an execution through a running server's engine API
    ploy status ID           one execution: status, steps, attempts, error
    ploy list                recent executions
    ploy history ID          every event of an execution (the audit trail)
    ploy cancel ID           stop an execution
    ploy skip --partition P --offset O --reason R   step over a corrupt record (audited)
    ploy schedule list|pause|resume|trigger-now [NAME]   the schedules of ploy.yaml
    ploy rebuild [DIR]       drop the view and refold it from the topic
    ploy export / import / view --as-of / rerun / replay-check / erase   audit, recovery
                             and erasure (``engine.audit``)
    ploy types [DIR]         write ploy_env.py, which types ``ctx.env``'s bindings

A mistake the user can fix (no ploy.yaml, bad JSON, an unknown id, a server
or Kafka that does not answer within the bounded wait) prints one line,
``ploy: error: ...``, on stderr and exits 2.

Executions carry untrusted text (inputs, outputs, errors, log lines, cancel
reasons) and a terminal obeys control sequences in what it prints (clear the
screen, set the title, move the cursor to fake a line). So every
human-readable line goes through :func:`terminal_safe`, which writes control
characters (C0, DEL, C1), bidirectional overrides and lone surrogates as
visible escapes; the newlines of the CLI's own layout stay. ``--json`` output
is JSON with the same characters as ``\\uXXXX`` escapes, so it stays valid JSON
and is as safe in a terminal. A reader that closes the pipe early
(``ploy status ID | head``) ends the command quietly, as for any Unix tool.

The client commands talk to a running server's engine API through
``engine.client``; ``ploy types`` renders its module with ``engine.typegen``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import sys
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from connectors import dev_archive_dir, dev_restore
from connectors.cli import add_commands as add_connector_commands
from engine import collector
from engine.app import SLOTS_DIR, Engine, http_server, load_app
from engine.audit import add_commands as add_audit_commands
from engine.builder import Worker
from engine.client import ApiClient, error_message, quote
from engine.config import Config, load_config
from engine.dashboard import format_duration
from engine.errors import CommandError, PloyError
from engine.http import API, admin_enabled
from engine.rebuild import clear_state, rebuild
from engine.typegen import render_env_module

__all__ = ["main"]

DEFAULT_URL = "http://127.0.0.1:8787"
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a tool killed by SIGPIPE
# What a terminal may act on or that cannot be written as UTF-8: C0 but for the
# space, DEL and C1 controls; bidirectional embeddings, overrides and isolates
# (they reorder what is shown); lone surrogates.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
                     "\ud800-\udfff]")
# What json.dumps(ensure_ascii=False) leaves raw (it escapes C0 in strings, and its
# indentation newlines are JSON's own syntax).
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
                             "\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")  # noqa: S104 - names, not a bind


# -- the parser -------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"ploy: error: {message} (see '{self.prog} --help')\n")


def _add_app_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", nargs="?", metavar="DIR",
                   help="the app's directory, holding ploy.yaml (default: the current one)")


def _add_client(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="the server (default: http.host/port of ploy.yaml in the "
                   f"current directory or --dir, else {DEFAULT_URL})")
    p.add_argument("--dir", help="the app's directory whose ploy.yaml gives the default --url")
    p.add_argument("--token", help="admin bearer token (default: $PLOY_ADMIN_TOKEN)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="seconds to wait for the server (default: 10)")


def build_parser() -> argparse.ArgumentParser:
    """The ``ploy`` parser; each subcommand's ``run`` is the function that does it."""
    parser = _Parser(prog="ploy", description="Durable workflows, event-sourced on Kafka.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     parser_class=_Parser)

    def command(name: str, run: Callable[[argparse.Namespace], int], help: str,
                ) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help, description=help)
        p.set_defaults(run=run)
        return p

    p = command("dev", _cmd_dev, "run the app locally: engine, HTTP routes, dashboard and API; "
                "an embedded Kafka-protocol broker unless Kafka is configured")
    _add_app_dir(p)
    p.add_argument("--host", help="listen address (default: http.host of ploy.yaml, "
                   "else 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port, 0 for any free one "
                   "(default: http.port of ploy.yaml, else 8787)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))

    p = command("worker", _cmd_worker, "run the engine on the configured Kafka until "
                "SIGTERM, with the other workers of the group; it serves its routes and API "
                "(on --port, else a free port), where the others ask about its partitions")
    _add_app_dir(p)
    p.add_argument("--host", help="HTTP listen address (default: http.host of ploy.yaml)")
    p.add_argument("--port", type=int, help="serve the routes, dashboard and API on this port")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))

    p = command("serve", _cmd_serve, "serve the routes, dashboard and API of a scaled-out app "
                "without running workflows: each query goes to its partition's owner (or, "
                "with --replica, to this process's own fold of every partition)")
    _add_app_dir(p)
    p.add_argument("--host", help="HTTP listen address (default: http.host of ploy.yaml)")
    p.add_argument("--port", type=int, help="HTTP port (default: http.port of ploy.yaml)")
    p.add_argument("--replica", action="store_true",
                   help="fold every partition here (a read replica) instead of asking owners")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))

    p = command("trigger", _cmd_trigger, "start an execution through a binding of ploy.yaml; "
                "prints its id")
    p.add_argument("binding", metavar="BINDING", help="a binding name of ploy.yaml")
    p.add_argument("--input", default="{}", metavar="JSON",
                   help="the workflow input as JSON, @FILE, or - for stdin (default: {})")
    p.add_argument("--idempotency-key", metavar="K",
                   help="the same key gives the same execution")
    p.add_argument("--subject", metavar="S", help="the data subject (a user id) whose key "
                   "seals the execution's payloads; 'ploy erase S' makes them unreadable")
    _add_client(p)

    p = command("send-event", _cmd_send_event, "send an event to the executions waiting for "
                "it (ctx.step.wait_for_event), or to one execution; prints its id")
    p.add_argument("type", metavar="TYPE", help="the event type, e.g. payment.settled")
    p.add_argument("--data", default="null", metavar="JSON",
                   help="the event's data as JSON, @FILE, or - for stdin (default: null)")
    p.add_argument("--id", metavar="ID", help="the event's id: a repeat with the same source "
                   "and id is ignored (default: a new one)")
    p.add_argument("--source", metavar="S", help="who sends it (default: cli)")
    p.add_argument("--execution", metavar="EXECUTION_ID",
                   help="only this execution (else every matching waiter)")
    _add_client(p)

    p = command("status", _cmd_status, "show one execution: status, steps, attempts, error")
    p.add_argument("id", metavar="ID", help="execution id")
    p.add_argument("--json", action="store_true", help="print the execution as JSON")
    _add_client(p)

    p = command("list", _cmd_list, "list executions, newest first")
    p.add_argument("--workflow", metavar="W", help="only this workflow")
    p.add_argument("--status", metavar="S", help="only this status (queued, running, "
                   "sleeping, waiting, completed, failed, cancelled)")
    p.add_argument("--limit", type=int, default=20, metavar="N", help="at most N (default: 20)")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    _add_client(p)

    p = command("history", _cmd_history, "every event of an execution with its partition, "
                "offset, time and body (the audit trail)")
    p.add_argument("id", metavar="ID", help="execution id")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    _add_client(p)

    p = command("cancel", _cmd_cancel, "cancel a queued, running or sleeping execution")
    p.add_argument("id", metavar="ID", help="execution id")
    p.add_argument("--reason", help="why (kept on the log with who asked)")
    _add_client(p)

    p = command("complete-step", _cmd_complete_step, "complete a stuck (running or retrying) "
                "step with an output you give; the execution goes on with it")
    p.add_argument("id", metavar="ID", help="execution id")
    p.add_argument("step", metavar="STEP", help="the step's key, as ploy status shows it")
    p.add_argument("--output", default="null", metavar="JSON",
                   help="the step's output as JSON, @FILE, or - for stdin (default: null)")
    p.add_argument("--reason", required=True, help="why (kept on the log with who asked)")
    _add_client(p)

    p = command("retry-now", _cmd_retry_now, "end a retrying step's backoff wait: its next "
                "attempt starts now")
    p.add_argument("id", metavar="ID", help="execution id")
    p.add_argument("step", metavar="STEP", help="the step's key, as ploy status shows it")
    p.add_argument("--reason", required=True, help="why (kept on the log with who asked)")
    _add_client(p)

    p = command("workers", _cmd_workers, "each partition's worker (its claim on the log), "
                "epoch and lag")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    _add_client(p)

    p = command("skip", _cmd_skip, "step over the corrupt record a partition is stopped at "
                "(appends an audited RecordSkipped marker)")
    p.add_argument("--partition", type=int, required=True, metavar="P")
    p.add_argument("--offset", type=int, required=True, metavar="O",
                   help="the offset the partition is stopped at (ploy workers shows it)")
    p.add_argument("--reason", required=True, help="why (kept on the log for the audit)")
    _add_client(p)

    p = command("schedule", _cmd_schedule, "list the schedules of ploy.yaml, or pause, resume "
                "or trigger one now (with who and why, on the log)")
    p.add_argument("action", choices=("list", "pause", "resume", "trigger-now"))
    p.add_argument("name", nargs="?", metavar="NAME", help="the schedule (not for list)")
    p.add_argument("--reason", help="why (kept on the log for the audit)")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    _add_client(p)

    p = command("rebuild", _cmd_rebuild, "delete the view and refold it from the topic "
                "(stop the workers first)")
    _add_app_dir(p)

    p = command("types", _cmd_types, "generate a typed env module for ctx.env "
                "(the counterpart of env.d.ts)")
    _add_app_dir(p)
    p.add_argument("--out", default="ploy_env.py", metavar="FILE",
                   help="output file, relative to DIR (default: ploy_env.py)")
    add_connector_commands(commands)
    add_audit_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ploy``; returns the exit status (0 ok, 2 a user error, 130 Ctrl-C,
    141 when the reader of stdout went away)."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
        sys.stdout.flush()  # here, where a closed pipe is handled, not at exit
        return code
    except PloyError as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        print(f"ploy: error: {terminal_safe(lines[0].rstrip(':'))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader is gone: write nothing more, and keep the interpreter's
        # final flush of stdout from failing again (the recipe of the docs of
        # the signal module).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def terminal_safe(text: str) -> str:
    """``text`` with what a terminal would act on written as visible escapes.

    ``\\n``, ``\\r`` and ``\\t`` by name, other controls as ``\\xNN``, and
    bidirectional controls and lone surrogates as ``\\uXXXX``. Idempotent: an
    escape is plain text.
    """
    return _UNSAFE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}")


def _json(value: Any, **options: Any) -> str:
    """JSON text that is safe to print: the unsafe characters as ``\\uXXXX`` escapes.

    They can only be inside strings (JSON's own syntax is ASCII), where the
    escape is the same character to any JSON reader.
    """
    text = json.dumps(value, ensure_ascii=False, **options)
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _print_lines(lines: Iterable[str]) -> None:
    print("\n".join(terminal_safe(line) for line in lines))


# -- dev and worker ---------------------------------------------------------------


def _app_dir(value: str | None) -> Path:
    """DIR, which must hold a ploy.yaml (a missing one is an error, not defaults)."""
    directory = Path(value or ".")
    if not (directory / "ploy.yaml").is_file():
        raise CommandError(f"no ploy.yaml in {directory.resolve()}")
    return directory


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


class _DashboardLinks(logging.Filter):
    """Ends each ``ploy.workflow`` line about an execution that failed or was cancelled
    with that execution's dashboard URL, so the terminal of ``ploy dev`` links to it."""

    def __init__(self, base: str):
        super().__init__()
        self.base = base

    def filter(self, record: logging.LogRecord) -> bool:
        eid = getattr(record, "ended_execution", None)
        if isinstance(eid, str):
            record.msg = f"{record.getMessage()}  {self.base}/__ploy/executions/{quote(eid)}"
            record.args = ()
        return True


def _link_dashboard(base: str) -> None:
    """Install :class:`_DashboardLinks` for ``base`` (in place of an earlier run's)."""
    workflow_log = logging.getLogger("ploy.workflow")
    for old in [f for f in workflow_log.filters if isinstance(f, _DashboardLinks)]:
        workflow_log.removeFilter(old)
    workflow_log.addFilter(_DashboardLinks(base))


def _listen(host: str, port: int) -> socket.socket:
    """Bind the HTTP socket before anything starts, so a taken port fails fast and clearly."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _url_host(host: str) -> str:
    """A host for a URL a user can open: a wildcard address becomes loopback."""
    if host in _WILDCARD_HOSTS:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host




def _advertised(config: Config, port: int) -> str:
    """The engine API address other workers use to reach this one."""
    if config.http.advertised_url:
        return config.http.advertised_url
    host = config.http.host
    if host in _WILDCARD_HOSTS:
        host = socket.gethostname()
    return f"http://{_url_host(host)}:{port}"


class _Run:
    """What ``ploy dev`` / ``ploy worker`` started, stopped in reverse order."""

    def __init__(self, mode: str, directory: Path, args: argparse.Namespace):
        self.mode, self.directory, self.args = mode, directory, args
        self.stop = asyncio.Event()
        self.stack = contextlib.AsyncExitStack()
        self.broker: Any = None
        self.notes: list[str] = []

    def config(self, **overrides: Any) -> Config:
        return load_config(self.directory, host=self.args.host, port=self.args.port,
                           **overrides)

    async def embedded_broker(self, config: Config) -> Config:
        """Start a broker for ``ploy dev``; its log is in memory, so the view starts over."""
        from engine.broker import EmbeddedBroker

        state_path = config.state_dir / f"{config.kafka.topic_prefix}.events"
        if clear_state(state_path):
            self.notes.append(f"cleared the view at {state_path}: the embedded broker "
                              "starts with an empty log (refilled from the archive)")
        for old in config.state_dir.glob("tansu-*.log"):
            old.unlink(missing_ok=True)
        self.broker = EmbeddedBroker(log_dir=config.state_dir)
        self.stack.callback(self.broker.stop)
        await asyncio.to_thread(self.broker.start)
        return self.config(bootstrap_servers=self.broker.bootstrap_servers)

    async def serve_http(self, engine: Engine, sock: socket.socket, host: str) -> None:
        server = http_server(engine, host, lifespan="on")
        task = asyncio.create_task(server.serve(sockets=[sock]), name="ploy-http")

        async def stop_server() -> None:
            server.should_exit = True
            await asyncio.wait({task}, timeout=10)

        self.stack.push_async_callback(stop_server)
        while not server.started:
            if task.done():
                await task
                raise CommandError(f"the HTTP server on {host} exited at start")
            await asyncio.sleep(0.01)

    def banner(self, worker: Worker, config: Config, address: tuple[str, int] | None) -> None:
        names = ", ".join(sorted(worker.workflows)) or "no workflows"
        lines = [f"ploy {self.mode}: {names} from {config.root / config.main}"]
        if address is not None:
            base = f"http://{_url_host(address[0])}:{address[1]}"
            lines.append(f"  app        {base}/")
            if admin_enabled(config.http.host, config.http.admin_token):
                lines.append(f"  dashboard  {base}/__ploy/")
                _link_dashboard(base)
                lines.append(f"  api        {base}{API}/")
            else:
                lines.append("  dashboard  off: a non-loopback address needs PLOY_ADMIN_TOKEN")
        where = (f"embedded broker, in memory; log {self.broker.log_path}"
                 if self.broker is not None else "configured")
        lines.append(f"  kafka      {config.kafka.bootstrap_servers} ({where})")
        lines.append(f"  topic      {config.kafka.topic_prefix}.events")
        lines.append(f"  state      {config.state_dir}")
        lines += [f"  note       {note}" for note in self.notes]
        lines.append("press Ctrl-C to stop" if self.mode == "dev" else "SIGTERM stops")
        print("\n".join(lines), flush=True)

    async def run(self) -> int:
        """1. Load the app. 2. Bind HTTP. 3. Kafka. 4. Engine. 5. HTTP. 6. Wait, stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        # Step 1. Everything that can be wrong in the app fails here, before any start.
        worker, config = load_app(self.directory, host=self.args.host, port=self.args.port)
        collector.tune_for_serving()
        if self.mode != "dev" and not config.kafka.bootstrap_servers:
            raise CommandError(f"ploy {self.mode} needs Kafka: set kafka.bootstrap_servers in "
                               "ploy.yaml or KAFKA_BOOTSTRAP_SERVERS (ploy dev starts an "
                               "embedded broker)")
        # Step 2. A worker always serves: the others ask it about its partitions. Without
        # --port it takes a free port, so several workers share a host.
        port = config.http.port if self.mode != "worker" or self.args.port is not None else 0
        sock = _listen(config.http.host, port)
        async with self.stack:
            if sock is not None:
                self.stack.callback(sock.close)
            # Step 3.
            if not config.kafka.bootstrap_servers:
                config = await self.embedded_broker(config)
                config, restored = await asyncio.to_thread(dev_restore, config)
                if restored:
                    self.notes.append(f"restored {restored} events from the archive at "
                                      f"{dev_archive_dir(config)}")
            # Step 4.
            if self.mode == "serve":
                engine = Engine(worker, config, runs=False, replica=self.args.replica)
            else:
                engine = Engine(worker, config, scale_out=self.mode == "worker")
            self.stack.push_async_callback(engine.stop)
            await engine.start()
            # Step 5.
            address = sock.getsockname()[:2]
            await self.serve_http(engine, sock, config.http.host)
            if self.mode == "worker":
                engine.runtime.advertise(_advertised(config, address[1]))
            self.banner(worker, engine.config, address)  # a worker: its own state slot
            # Step 6.
            await self.stop.wait()
            print(f"ploy {self.mode}: stopping (running steps finish)", flush=True)
        print(f"ploy {self.mode}: stopped", flush=True)
        return 0


def run_serving(main: Coroutine[Any, Any, int]) -> int:
    """Run a serving command on uvloop where it is installed (a dependency on Linux and
    macOS: libuv's event loop, cheaper per socket event and per wake-up from another
    thread than asyncio's own); elsewhere on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _cmd_dev(args: argparse.Namespace) -> int:
    directory = _app_dir(args.dir)
    _configure_logging(args.log_level)
    return run_serving(_Run("dev", directory, args).run())


def _cmd_serve(args: argparse.Namespace) -> int:
    directory = _app_dir(args.dir)
    _configure_logging(args.log_level)
    return run_serving(_Run("serve", directory, args).run())


def _cmd_worker(args: argparse.Namespace) -> int:
    directory = _app_dir(args.dir)
    _configure_logging(args.log_level)
    return run_serving(_Run("worker", directory, args).run())


# -- client commands --------------------------------------------------------------


def _client(args: argparse.Namespace) -> ApiClient:
    token = args.token or os.environ.get("PLOY_ADMIN_TOKEN") or None
    if args.url:
        return ApiClient(args.url, token, args.timeout)
    if args.dir is not None:
        _app_dir(args.dir)
    config = load_config(args.dir)  # None: ploy.yaml of the cwd, else the defaults
    url = f"http://{_url_host(config.http.host)}:{config.http.port}"
    return ApiClient(url, token or config.http.admin_token, args.timeout)


def _read_input(text: str, source: str = "--input") -> Any:
    if text == "-":
        text, source = sys.stdin.read(), "stdin"
    elif text.startswith("@"):
        try:
            text, source = Path(text[1:]).read_text(encoding="utf-8"), text[1:]
        except OSError as exc:
            raise CommandError(f"cannot read {text[1:]}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CommandError(f"{source} is not valid JSON: {exc}") from None


def _cmd_trigger(args: argparse.Namespace) -> int:
    value = _read_input(args.input)  # before any network: bad JSON costs nothing
    client = _client(args)
    body = {"input": value, "idempotency_key": args.idempotency_key, "subject": args.subject}
    status, payload = client.call("POST", f"/trigger/{quote(args.binding)}", body)
    if status == 404:
        known = payload.get("bindings") if isinstance(payload, dict) else None
        bound = f" (bound in ploy.yaml: {', '.join(known) or 'none'})" if known is not None else ""
        raise CommandError(f"unknown binding '{args.binding}'{bound}")
    if status == 422:
        raise CommandError(f"invalid input: {error_message(payload)}")
    if status >= 400:
        raise CommandError(f"trigger failed ({status}): {error_message(payload)}")
    print(terminal_safe(str(payload["execution_id"])))
    return 0


def _cmd_send_event(args: argparse.Namespace) -> int:
    data = _read_input(args.data, "--data")
    body = {"type": args.type, "data": data, "id": args.id, "source": args.source or "cli",
            "execution_id": args.execution}
    status, payload = _client(args).call("POST", "/events", body)
    if status == 404:
        raise CommandError(f"no execution '{args.execution}'")
    if status >= 400:
        raise CommandError(f"send-event failed ({status}): {error_message(payload)}")
    print(terminal_safe(str(payload["id"])))
    return 0


def _get_execution(client: ApiClient, eid: str) -> dict[str, Any]:
    execution: dict[str, Any] = client.expect(
        "GET", f"/executions/{quote(eid)}", not_found=f"no execution '{eid}' at {client.url}")
    return execution


def _cmd_status(args: argparse.Namespace) -> int:
    execution = _get_execution(_client(args), args.id)
    if args.json:
        print(_json(execution, indent=2))
    else:
        _print_lines(format_execution(execution))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    query = {k: v for k, v in (("workflow", args.workflow), ("status", args.status),
                                ("limit", args.limit)) if v is not None}
    payload = _client(args).expect("GET", "/executions?" + urllib.parse.urlencode(query))
    if args.json:
        print(_json(payload, indent=2))
        return 0
    rows = [[e.get("execution_id", ""), e.get("workflow", ""), e.get("status", ""),
             _iso(e.get("created_at")), _duration(e.get("duration_ms"))]
            for e in payload.get("executions", [])]
    if not rows:
        print("no executions")
        return 0
    _print_lines(_table(["EXECUTION", "WORKFLOW", "STATUS", "CREATED", "DURATION"], rows))
    return 0


def _cmd_history(args: argparse.Namespace) -> int:
    client = _client(args)
    payload = client.expect("GET", f"/executions/{quote(args.id)}/history",
                            not_found=f"no execution '{args.id}' at {client.url}")
    if args.json:
        print(_json(payload, indent=2))
        return 0
    _print_lines(f"p{event['partition']}@{event['offset']}  {_iso(event['timestamp'])}  "
                 f"{event['type']:<18} {_json(_decoded(event.get('body') or {}))}"
                 for event in payload.get("events", []))
    return 0


def _decoded(body: dict[str, Any]) -> dict[str, Any]:
    """An event body with its user payloads (JSON text inside the event) decoded."""
    out = dict(body)
    for key in ("input", "output", "data"):
        if isinstance(out.get(key), str):
            with contextlib.suppress(ValueError):
                out[key] = json.loads(out[key])
    return out


def _cmd_cancel(args: argparse.Namespace) -> int:
    from engine.skips import operator

    client = _client(args)
    not_found = f"no execution '{args.id}' at {client.url}"
    payload = client.expect("POST", f"/executions/{quote(args.id)}/cancel",
                            {"reason": args.reason, "actor": operator()}, not_found=not_found)
    execution = _get_execution(client, args.id)  # an unknown id is an error, a finished one not
    if payload.get("cancelled"):
        by = f" (by {execution['cancel_actor']})" if execution.get("cancel_actor") else ""
        print(terminal_safe(f"cancelled {args.id}{by}"))
        return 0
    print(terminal_safe(f"{args.id} already finished ({execution.get('status')})"))
    return 0


def _cmd_complete_step(args: argparse.Namespace) -> int:
    output = _read_input(args.output, "--output")
    return _resolve_step(args, "complete-step", {"output": output})


def _cmd_retry_now(args: argparse.Namespace) -> int:
    return _resolve_step(args, "retry-now", {})


def _resolve_step(args: argparse.Namespace, route: str, extra: dict[str, Any]) -> int:
    from engine.skips import operator

    client = _client(args)
    body = {"step": args.step, "reason": args.reason, "actor": operator(), **extra}
    status, payload = client.call("POST", f"/executions/{quote(args.id)}/{route}", body)
    if status == 404:
        raise CommandError(f"no execution '{args.id}' at {client.url}")
    if status >= 400:
        raise CommandError(error_message(payload))
    done = "done" if payload.get("resolved") else "not taken (the step ended meanwhile)"
    print(terminal_safe(f"{route} {args.id} step {args.step}: {done}"))
    return 0


def _cmd_skip(args: argparse.Namespace) -> int:
    from engine.skips import operator

    payload = _client(args).expect("POST", f"/partitions/{args.partition}/skip", {
        "offset": args.offset, "reason": args.reason, "actor": operator()})
    print(terminal_safe(f"skipped partition {payload['partition']} offset {payload['offset']} "
                        f"(marker at offset {payload['marker_offset']}, by {payload['actor']})"))
    return 0


def _cmd_schedule(args: argparse.Namespace) -> int:
    from engine.skips import operator

    client = _client(args)
    if args.action == "list":
        payload = client.expect("GET", "/schedules")
        if args.json:
            print(_json(payload, indent=2))
            return 0
        rows = [[s["name"], s["binding"], s["cron"] or f"every {_duration(s['every_ms'])}",
                 "paused" if s["paused"] else "active", _iso(s["last_fire_at"]),
                 _iso(s["next_fire_at"]), str(s["fired"]), str(s["skipped"])]
                for s in payload["schedules"]]
        _print_lines(_table(["NAME", "BINDING", "WHEN", "STATE", "LAST", "NEXT", "FIRED",
                             "SKIPPED"], rows))
        return 0
    if not args.name:
        raise CommandError(f"ploy schedule {args.action} needs the schedule's NAME")
    action = "trigger" if args.action == "trigger-now" else args.action
    payload = client.expect("POST", f"/schedules/{quote(args.name)}/{action}",
                            {"reason": args.reason, "actor": operator()},
                            not_found=f"unknown schedule '{args.name}'")
    if args.json:
        print(_json(payload, indent=2))
    elif action == "trigger":
        print(terminal_safe(payload["execution_id"]))
    else:
        print(terminal_safe(f"{args.name} {'paused' if payload['paused'] else 'resumed'}"))
    return 0


def _cmd_workers(args: argparse.Namespace) -> int:
    payload = _client(args).expect("GET", "/workers")
    if args.json:
        print(_json(payload, indent=2))
        return 0
    print(terminal_safe(f"group {payload['group']} on {payload['topic']}"))
    rows = [("PARTITION", "WORKER", "EPOCH", "END", "COMMITTED", "LAG", "FENCED")]
    for p in payload["partitions"]:
        lag = "-" if p["lag"] is None else str(p["lag"])
        committed = "-" if p["committed_offset"] is None else str(p["committed_offset"])
        state = " STALLED" if p["stalled"] else " CLAIMING" if p.get("claiming") else ""
        if p.get("skipped"):
            state += f" ({len(p['skipped'])} skipped)"
        rows.append((str(p["partition"]), terminal_safe(p["worker"] or "(unclaimed)") + state,
                     str(p["epoch"]), str(p["end_offset"]), committed, lag,
                     str(p["fenced_events"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


# -- formatting -------------------------------------------------------------------


def _iso(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _duration(ms: int | None) -> str:
    return "-" if ms is None else format_duration(ms)


def _compact(value: Any, limit: int = 200) -> str:
    text = _json(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error(error: dict[str, Any] | None) -> str:
    return "-" if not error else f"{error.get('type')}: {error.get('message')}"


def _table(header: list[str], rows: list[list[str]]) -> Iterator[str]:
    cells = [[terminal_safe(str(cell)) for cell in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        yield "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()


def format_execution(ex: dict[str, Any]) -> list[str]:
    """A readable summary of an Execution's JSON: status, each step and attempt, error.

    Each line is :func:`terminal_safe`: user text cannot break the layout.
    """
    lines = [
        f"execution  {ex['execution_id']}",
        f"workflow   {ex['workflow']}",
        f"status     {ex['status']}",
        f"created    {_iso(ex.get('created_at'))}",
        f"duration   {_duration(ex.get('duration_ms'))}",
    ]
    if ex.get("error"):
        lines.append(f"error      {_error(ex['error'])}")
    if ex.get("cancel_reason"):
        lines.append(f"reason     {ex['cancel_reason']}")
    if ex.get("version") or ex.get("patches"):
        patched = f" (patched: {', '.join(ex['patches'])})" if ex.get("patches") else ""
        lines.append(f"version    {ex.get('version') or '-'}{patched}")
    lines += _links(ex)
    lines.append(f"input      {_compact(ex.get('input'))}")
    if ex.get("status") == "completed":
        lines.append(f"output     {_compact(ex.get('output'))}")
    steps = ex.get("steps") or []
    if steps:
        lines.append("steps")
        rows = []
        for step in steps:
            attempts = step.get("attempts") or []
            kind = step.get("kind")
            count = str(len(attempts)) if kind == "step" else ""
            detail = _step_detail(step)
            rows.append([step["key"], step["status"], count, _duration(step.get("duration_ms")),
                         detail])
            if len(attempts) > 1 or step.get("status") == "failed":
                rows += [[f"  attempt {a['attempt']}", "failed" if a.get("error") else "ok", "",
                          _duration(a.get("duration_ms")), _error(a.get("error"))
                          if a.get("error") else ""] for a in attempts]
        lines += ["  " + line for line in _table(
            ["STEP", "STATUS", "ATTEMPTS", "DURATION", "ERROR"], rows)]
    for entry in ex.get("logs") or []:
        data = "" if entry.get("data") is None else "  " + _compact(entry["data"])
        lines.append(f"log        {_iso(entry.get('timestamp'))} {entry.get('level')} "
                     f"{entry.get('message')}{data}")
    return [terminal_safe(line) for line in lines]


def _links(ex: dict[str, Any]) -> list[str]:
    """Who cancelled it, its parent, what it waits for, its rerun lineage."""
    lines = []
    if ex.get("cancel_actor"):
        lines.append(f"cancelled  by {ex['cancel_actor']}")
    if ex.get("parent_id"):
        lines.append(f"parent     {ex['parent_id']} (step {ex.get('parent_step')})")
    for wait in ex.get("waiting_for") or []:
        what = (f"child {wait['child_id']}" if wait.get("child_id") else
                f"event {wait['event_type']} {_compact(wait.get('match') or {})}")
        until = f" until {_iso(wait['until'])}" if wait.get("until") else ""
        lines.append(f"waiting    {wait['step']}: {what}{until}")
    if ex.get("rerun_of"):
        by = (f", by {ex['rerun_actor']}" + (f": {ex['rerun_reason']}" if ex.get("rerun_reason")
                                             else "")) if ex.get("rerun_actor") else ""
        lines.append(f"rerun of   {ex['rerun_of']} (its events before offset "
                     f"{ex.get('rerun_offset')} replayed{by})")
    if ex.get("reruns"):
        lines.append(f"reruns     {', '.join(ex['reruns'])}")
    return lines


def _step_detail(step: dict[str, Any]) -> str:
    """The last column of a step's row: its error, a sleep's wake time, what a wait got."""
    kind = step.get("kind")
    if kind == "sleep":
        return f"until {_iso(step.get('wake_at'))}"
    if kind == "invoke":
        return f"child {step.get('child_id')}"
    if kind == "wait":
        got = step.get("output")
        return f"event {got['id']}" if isinstance(got, dict) else ""
    resolved = step.get("resolved")
    if resolved:
        return f"{resolved['action']} by {resolved['actor']}: {resolved.get('reason') or ''}"
    return _error(step.get("error")) if step.get("error") else ""


# -- rebuild and types ------------------------------------------------------------


def _progress_bar(doing: str = "rebuilding") -> Callable[[int, int], None]:
    """A progress bar on stderr when it is a terminal, else silence: events done (folded,
    exported, ...: ``doing``) of the estimated total, the rate over the last few seconds,
    and the time left at that rate."""
    tty = sys.stderr.isatty()
    window: list[tuple[float, int]] = []  # (when, done) of the last RATE_WINDOW_S seconds
    state = {"shown_at": 0.0, "finished": False}

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        window.append((now, done))
        while now - window[0][0] > _RATE_WINDOW_S:
            window.pop(0)
        finished = done >= total
        if not tty or state["finished"] or (now - state["shown_at"] < 0.1 and not finished):
            return
        state["shown_at"], state["finished"] = now, finished
        share = done / total if total else 1.0
        bar = "#" * int(share * 30)
        since, before = window[0]
        rate = (done - before) / (now - since) if now > since else 0.0
        left = "" if finished or rate <= 0 else f" ETA {_clock(max(total - done, 0) / rate)}"
        end = "\n" if finished else ""
        sys.stderr.write(f"\r{doing} [{bar:<30}] {done:,}/{total:,} events {share:4.0%} "
                         f"{rate:,.0f} events/s{left}\x1b[K{end}")
        sys.stderr.flush()

    return show


_RATE_WINDOW_S = 3.0


def _clock(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``) of a duration, for an ETA."""
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _cmd_rebuild(args: argparse.Namespace) -> int:
    from engine.log import EventLog

    directory = _app_dir(args.dir)
    logging.getLogger("ploy.kafka").setLevel(logging.CRITICAL)  # librdkafka's retries: noise
    config = load_config(directory)
    kafka = config.kafka
    if not kafka.bootstrap_servers:
        raise CommandError("ploy rebuild needs Kafka: set kafka.bootstrap_servers in ploy.yaml "
                           "or KAFKA_BOOTSTRAP_SERVERS (the embedded broker of ploy dev keeps "
                           "no log to rebuild from once it stops)")
    log = EventLog(kafka.bootstrap_servers, kafka.topic_prefix, kafka.partitions,
                   extra=kafka.config, connect_timeout_s=kafka.connect_timeout_s,
                   replication_factor=kafka.replication_factor)
    try:
        # The workers' own views (one state slot each) are caches of what they own: drop
        # them too (refused while a worker holds one), they refold when claimed.
        for slot in sorted((config.state_dir / SLOTS_DIR).glob(f"*/{log.topic}")):
            clear_state(slot)
        events, seconds = rebuild(log, config.state_dir / log.topic, _progress_bar(),
                                  retention_ms=config.retention_ms)
    finally:
        log.close()
    rate = events / seconds if seconds > 0 else 0.0
    print(f"rebuilt {events} events in {seconds:.2f} s ({rate:,.0f} events/s)")
    return 0


def _cmd_types(args: argparse.Namespace) -> int:
    directory = _app_dir(args.dir)
    worker, config = load_app(directory)
    out = Path(args.out)
    if not out.is_absolute():
        out = config.root / out
    out.write_text(render_env_module(worker, config), encoding="utf-8")
    print(f"wrote {out} ({len(config.workflow)} bindings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
